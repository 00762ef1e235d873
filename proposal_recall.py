"""Recall of the object proposals on a split: how many ground-truth objects the top K cover.

  python proposal_recall.py --data VOCdevkit/VOC2012 --split val
  python proposal_recall.py --tfds ~/tensorflow_datasets --split val --min-size 0
  python proposal_recall.py --generator windows edge_boxes   # one row each
  python proposal_recall.py                      # the generated dataset's val split

Prints a Markdown table: per generator, recall@K for K = 1, 2, 5, 10, 20, 50 at
IoU >= 0.5 and 0.7 (--recall-iou), and the seconds per image. Two yardsticks
may join as rows: random_windows (chance) and oracle_edges (EdgeBoxes given the
ground truth's boundaries as its edge map: what a perfect edge detector gives).
"""

import argparse
import sys
import time

import numpy as np
import tqdm

from deconvnet_jax import edge_boxes, proposals
from deconvnet_jax.data import sources
from deconvnet_jax.labels import DataError


RANDOM = "random_windows"
ORACLE = "oracle_edges"
KS = (1, 2, 5, 10, 20, 50)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sources.add_arguments(p)
  p.add_argument("--split", default="val")
  p.add_argument("--limit", type=int, help="only the first N images of the split")
  p.add_argument("--top-k", type=int, default=50)
  p.add_argument("--min-size", type=float, default=None,
                 help="smallest proposal side in px (default: 112 scaled to the image; 0: none)")
  p.add_argument("--iou-threshold", type=float, help="NMS threshold (default: the generator's)")
  p.add_argument("--generator", nargs="+", choices=(*proposals.GENERATORS, RANDOM, ORACLE), default=["windows"],
                 help=f"one or more; two yardsticks: {RANDOM!r}, the sliding windows in a seeded random "
                      f"order (no objectness, no NMS), and {ORACLE!r}, EdgeBoxes on the ground truth's own "
                      "instance boundaries (the ceiling of any edge map)")
  p.add_argument("--recall-iou", type=float, nargs="+", default=[0.5, 0.7])
  return p, p.parse_args(argv)


def main(argv=None) -> int:
  parser, args = parse_args(argv)
  try:
    split = sources.open_split(sources.resolve_data(sources.from_arguments(args)), args.split, training=False)
  except DataError as e:
    parser.exit(2, f"error: {e}\n")
  if args.limit is not None:
    split = sources.Subset(split, args.limit)
  print(f"{split.name}: {len(split)} images; min size "
        + ("112 px scaled to the image" if args.min_size is None else f"{args.min_size:g} px"))
  ks = sorted({k for k in KS if k <= args.top_k} | {args.top_k})
  print("| generator | IoU | " + " | ".join(f"@{k}" for k in ks) + " | s/image |")
  print("|---|---:|" + "---:|" * len(ks) + "---:|")
  for generator in args.generator:
    found, gt, seconds = run(split, generator, args)
    for iou in args.recall_iou:
      row = [f"{proposals.recall([p[:k] for p in found], gt, iou):.3f}" for k in ks]
      print(f"| {generator} | {iou:g} | " + " | ".join(row) + f" | {seconds:.3f} |", flush=True)
  print(f"{sum(len(g) for g in gt)} objects")
  return 0


def run(split, generator: str, args) -> tuple[list, list, float]:
  """(proposals per image, ground-truth boxes per image, seconds per image) of one generator."""
  rng = np.random.default_rng(0)
  found, gt, seconds = [], [], 0.0
  for i in tqdm.trange(len(split), desc=generator, leave=False, disable=None):
    example = split[i]
    start = time.perf_counter()
    if generator == RANDOM:
      height, width = example.image.shape[:2]
      min_size = proposals.default_min_size(height, width) if args.min_size is None else args.min_size
      windows = proposals.sliding_windows(height, width, min_size=min_size)
      boxes = windows[rng.permutation(len(windows))[:args.top_k]]
    elif generator == ORACLE:
      boxes, _ = proposals.propose(example.image, args.top_k, args.min_size, args.iou_threshold, "edge_boxes",
                                   edges=edge_boxes.boundary_edges(example.instances))
    else:
      boxes, _ = proposals.propose(example.image, args.top_k, args.min_size, args.iou_threshold, generator)
    seconds += time.perf_counter() - start
    found.append(boxes)
    gt.append(example.boxes)
  return found, gt, seconds / max(len(split), 1)


if __name__ == "__main__":
  sys.exit(main())
