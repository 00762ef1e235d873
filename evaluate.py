"""mIoU of a checkpoint on a VOC-layout split, for several inference variants side by side.

  python evaluate.py --checkpoint runs/voc_s2 --data VOCdevkit/VOC2012 --split val
  python evaluate.py --checkpoint runs/default            # generated data's val split

Variants: whole-image forward, DeconvNet (instance-wise), DeconvNet+CRF, and with
--fcn-checkpoint EDeconvNet, EDeconvNet+CRF and FCN-8s alone. The confusion
matrix is the VOC devkit's (255 ignored, mean over classes present). Writes a
Markdown table and JSON next to the checkpoint unless --output says otherwise.
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from deconvnet_jax import aggregate, checkpoints, crf, metrics
from deconvnet_jax.data import voc
from deconvnet_jax.inference import InferenceConfig, Segmenter
from deconvnet_jax.train_loop import DEFAULT_DATA

PAPER = {"FCN-8s": 62.2, "DeconvNet": 69.6, "DeconvNet+CRF": 70.5, "EDeconvNet": 71.7,
         "EDeconvNet+CRF": 72.5}  # VOC 2012 test, mean IoU % (SPEC.md section 5)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", type=Path, required=True)
  p.add_argument("--fcn-checkpoint", type=Path)
  p.add_argument("--data", type=Path, default=DEFAULT_DATA)
  p.add_argument("--split", default="val")
  p.add_argument("--limit", type=int, help="only the first N images of the split")
  p.add_argument("--top-k", type=int, default=InferenceConfig().top_k)
  p.add_argument("--input-size", type=int)
  p.add_argument("--crf-processes", type=int)
  p.add_argument("--output", type=Path, help="folder for results.md / results.json")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  model, meta = checkpoints.load_model(args.checkpoint)
  fcn = checkpoints.load_model(args.fcn_checkpoint)[0] if args.fcn_checkpoint else None
  k = model.config.num_classes
  size = args.input_size or meta.get("train_config", {}).get("crop", 224)
  cfg = InferenceConfig(top_k=args.top_k, input_size=size, crf=False)
  whole = Segmenter(model, dataclasses.replace(cfg, mode="whole"))
  instance = Segmenter(model, cfg)
  fcn_net = Segmenter(fcn, dataclasses.replace(cfg, mode="whole")).net if fcn is not None else None
  ids = voc.read_split(args.data, args.split)[:args.limit]
  conf: dict[str, np.ndarray] = {}
  images, to_refine = [], {}

  def add(name, label, pred):
    conf.setdefault(name, np.zeros((k, k), np.int64))
    conf[name] += metrics.confusion_matrix(label, pred, k)

  for image_id in tqdm(ids, desc=f"evaluating {args.split}", dynamic_ncols=True):
    ex = voc.read_example(args.data, image_id, k)
    add("whole image", ex.label, whole.segment(ex.image).label)
    scores, _ = instance.scores(ex.image)
    prob = aggregate.softmax(scores)
    add("DeconvNet", ex.label, prob.argmax(-1))
    images.append((ex.image, ex.label))
    to_refine.setdefault("DeconvNet+CRF", []).append(prob)
    if fcn_net is not None:
      fcn_scores = fcn_net.whole_image(ex.image)
      add("FCN-8s", ex.label, fcn_scores.argmax(-1))
      eprob = aggregate.softmax(aggregate.ensemble(scores, fcn_scores))
      add("EDeconvNet", ex.label, eprob.argmax(-1))
      to_refine.setdefault("EDeconvNet+CRF", []).append(eprob)
  for name, probs in to_refine.items():
    refined = crf.dense_crf_many([im for im, _ in images], probs, processes=args.crf_processes)
    for (_, label), prob in zip(images, refined):
      add(name, label, prob.argmax(-1))

  rows = {name: {"miou": metrics.mean_iou(c), "pixel_acc": metrics.pixel_accuracy(c),
                 "iou": [None if np.isnan(x) else round(float(x), 4) for x in metrics.iou_per_class(c)]}
          for name, c in conf.items()}
  lines = ["| variant | mIoU % | pixel acc % | paper (VOC 2012 test) |", "|---|---:|---:|---:|"]
  for name, r in rows.items():
    lines.append(f"| {name} | {100 * r['miou']:.1f} | {100 * r['pixel_acc']:.1f} | {PAPER.get(name, '')} |")
  table = "\n".join(lines)
  print(f"{len(ids)} images of {args.data} / {args.split}\n{table}")
  out = args.output or Path(args.checkpoint)
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.md").write_text(table + "\n")
  (out / "results.json").write_text(json.dumps({"split": args.split, "images": len(ids), "variants": rows,
                                                "class_names": meta["class_names"]}, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
