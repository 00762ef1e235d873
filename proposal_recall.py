"""Recall of the object proposals on a split: how many ground-truth objects the top K cover.

  python proposal_recall.py --data VOCdevkit/VOC2012 --split val
  python proposal_recall.py --tfds ~/tensorflow_datasets --split val --min-size 0
  python proposal_recall.py                      # the generated dataset's val split

Prints the seconds per image and recall@K (IoU >= --recall-iou) for K = 1, 2, 5, 10, 20, 50.
"""

import argparse
import sys
import time

import numpy as np

from deconvnet_jax import proposals
from deconvnet_jax.data import sources
from deconvnet_jax.labels import DataError


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sources.add_arguments(p)
  p.add_argument("--split", default="val")
  p.add_argument("--limit", type=int, help="only the first N images of the split")
  p.add_argument("--top-k", type=int, default=50)
  p.add_argument("--min-size", type=float, default=None,
                 help="smallest proposal side in px (default: 112 scaled to the image; 0: none)")
  p.add_argument("--iou-threshold", type=float, default=0.7, help="NMS threshold")
  p.add_argument("--generator", choices=("windows", "selective_search"), default="windows")
  p.add_argument("--random-ranking", action="store_true",
                 help="baseline: the sliding windows in a seeded random order, no objectness, no NMS")
  p.add_argument("--recall-iou", type=float, default=0.5)
  return p, p.parse_args(argv)


def main(argv=None) -> int:
  parser, args = parse_args(argv)
  try:
    split = sources.open_split(sources.resolve_data(sources.from_arguments(args)), args.split, training=False)
  except DataError as e:
    parser.exit(2, f"error: {e}\n")
  if args.limit is not None:
    split = sources.Subset(split, args.limit)
  rng = np.random.default_rng(0)
  found, gt, seconds = [], [], 0.0
  for i in range(len(split)):
    example = split[i]
    start = time.perf_counter()
    if args.random_ranking:
      height, width = example.image.shape[:2]
      min_size = proposals.default_min_size(height, width) if args.min_size is None else args.min_size
      windows = proposals.sliding_windows(height, width, min_size=min_size)
      boxes = windows[rng.permutation(len(windows))[:args.top_k]]
    else:
      boxes, _ = proposals.propose(example.image, args.top_k, args.min_size, args.iou_threshold,
                                   args.generator)
    seconds += time.perf_counter() - start
    found.append(boxes)
    gt.append(example.boxes)
  print(f"{split.name}: {len(gt)} images, {sum(len(g) for g in gt)} objects, "
        f"{seconds / max(len(gt), 1):.4f} s per image")
  for k in sorted({k for k in (1, 2, 5, 10, 20, 50) if k <= args.top_k} | {args.top_k}):
    print(f"recall@{k} (IoU >= {args.recall_iou}): "
          f"{proposals.recall([p[:k] for p in found], gt, args.recall_iou):.3f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
