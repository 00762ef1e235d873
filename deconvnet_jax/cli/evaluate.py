"""mIoU of a checkpoint on a split of VOC, a prepared TFDS dataset or COCO, for inference variants side by side.

  python evaluate.py --checkpoint runs/voc_s2 --data VOCdevkit/VOC2012 --split val
  python evaluate.py --checkpoint runs/voc_s2 --tfds ~/tensorflow_datasets --split val
  python evaluate.py --checkpoint runs/coco_voc --coco COCO --split val2017   # the checkpoint's class map
  python evaluate.py --checkpoint runs/default            # the val split of the data it trained on

Variants: whole-image forward, DeconvNet (instance-wise), DeconvNet+CRF, and with
--fcn-checkpoint EDeconvNet, EDeconvNet+CRF and FCN-8s alone; with --curve, the
DeconvNet mIoU for each number of proposals per image (the paper's figure). The
confusion matrix is the VOC devkit's (255 ignored, mean over classes present).
Per-image results are cached (per set of settings), so an interrupted run resumes where it stopped.
Writes to --output (default: the checkpoint) results.md (mIoU, pixel accuracy, mean
class accuracy, frequency-weighted IoU, per-class IoU), results.json, confusion/VARIANT.png
and .json (the row-normalised confusion matrix, and its counts), and curve.png.
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from deconvnet_jax import aggregate, checkpoints, configs, crf, metrics
from deconvnet_jax.box_files import HELP as BOX_FILES_HELP, BoxFileError, BoxFiles
from deconvnet_jax.data import sources
from deconvnet_jax.images import atomic_path, save_atomic, save_text_atomic
from deconvnet_jax.inference import (PROPOSALS, PROPOSALS_HELP, InferenceConfig, Segmenter, add_test_time_arguments,
                                     test_time_options)
from deconvnet_jax.labels import DataError, Example
from deconvnet_jax.plots import confusion_plot, line_plot

PAPER = {"FCN-8s": 62.2, "DeconvNet": 69.6, "DeconvNet+CRF": 70.5, "EDeconvNet": 71.7,
         "EDeconvNet+CRF": 72.5}  # VOC 2012 test, mean IoU % (SPEC.md section 5)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", type=Path, required=True)
  p.add_argument("--fcn-checkpoint", type=Path)
  sources.add_arguments(p, "the data the checkpoint trained on")
  p.add_argument("--split", help="default: the validation split of the data (val; COCO: val2017)")
  p.add_argument("--limit", type=int, help="only the first N images of the split")
  p.add_argument("--top-k", type=int, default=InferenceConfig().top_k)
  p.add_argument("--proposals", choices=PROPOSALS, nargs="+", default=[InferenceConfig().proposals],
                 help="one or more, side by side: " + PROPOSALS_HELP)
  p.add_argument("--curve", type=int, nargs="*", help="also score these proposal counts, e.g. 1 2 5 10 20 50")
  p.add_argument("--proposals-from", type=Path, metavar="DIR|FILE",
                 help="proposals from elsewhere: " + BOX_FILES_HELP)
  p.add_argument("--input-size", type=int)
  p.add_argument("--chunk", type=int, default=8, help="images whose CRFs run in parallel at a time")
  p.add_argument("--crf-processes", type=int)
  p.add_argument("--output", type=Path, help="folder for results.md / results.json / cache")
  add_test_time_arguments(p)
  return p.parse_args(argv)


class Evaluator:
  """Per-image confusion matrices of every variant, for one checkpoint and one or more proposal generators."""

  def __init__(self, model, fcn, config: InferenceConfig, curve: list[int], generators: list[str]):
    self.k = model.config.num_classes
    self.whole = Segmenter(model, dataclasses.replace(config, mode="whole"))
    self.instance = {g: Segmenter(model, dataclasses.replace(config, proposals=g)) for g in generators}
    self.fcn = Segmenter(fcn, dataclasses.replace(config, mode="whole")).net if fcn is not None else None
    self.curve = curve

  def network_part(self, ex: Example, boxes=None) -> tuple[dict, dict]:
    """(confusion matrices of the variants without CRF, probabilities awaiting the CRF).

    boxes: the image's proposals from a box file (None: the generator's).
    """
    k, hw, seconds = self.k, ex.label.shape, Segmenter.new_seconds()
    conf = lambda pred: metrics.confusion_matrix(ex.label, pred, k)
    # One whole-image forward serves the "whole image" row and the network-guided proposals.
    logits = self.whole.whole_scores(ex.image)  # [H, W, K], with the test-time options
    out = {"whole image": conf(aggregate.softmax(logits).argmax(-1).astype(np.uint8))}
    to_refine = {}
    fcn_scores = self.fcn.whole_image(ex.image) if self.fcn is not None else None
    if fcn_scores is not None:
      out["FCN-8s"] = conf(fcn_scores.argmax(-1))
    for generator, segmenter in self.instance.items():
      name = variant_name(generator, len(self.instance))
      maps, squares = segmenter.proposal_maps(ex.image, seconds, boxes, logits)
      scores = segmenter.combine(maps, squares, hw, seconds)
      out[name("DeconvNet")] = conf(scores.argmax(-1))
      for n in self.curve:  # proposals come best first: the top n are a prefix
        out[name("DeconvNet", n)] = conf(segmenter.combine(maps[:n], squares[:n], hw, seconds).argmax(-1))
      to_refine[name("DeconvNet+CRF")] = aggregate.softmax(scores)
      if fcn_scores is not None:
        eprob = aggregate.softmax(aggregate.ensemble(scores, fcn_scores))
        out[name("EDeconvNet")] = conf(eprob.argmax(-1))
        to_refine[name("EDeconvNet+CRF")] = eprob
    return out, to_refine


def variant_name(generator: str, generators: int):
  """name(variant, proposals=None): e.g. "DeconvNet, 5 proposals"; with several generators,
  "DeconvNet (edge_boxes), 5 proposals"."""
  def name(variant: str, proposals: int | None = None) -> str:
    return (variant + (f" ({generator})" if generators > 1 else "")
            + (f", {proposals} proposals" if proposals is not None else ""))
  return name


def open_split(args, train_config: configs.TrainConfig, num_classes: int):
  """(split to score, its name): of the named data, else the checkpoint's; COCO keeps images without objects."""
  data = train_config.data
  if args.coco is not None and args.class_map is None:  # the class map the checkpoint learned
    args.class_map = data.coco_class_map if data.kind == "coco" else ("coco" if num_classes == 81 else "voc")
  data = sources.resolve_data(sources.from_arguments(args, data))
  split = args.split or data.val_split
  ds = sources.open_split(data, split, num_classes, training=False)
  if len(ds.class_names) != num_classes:
    raise DataError(f"{ds.name} has {len(ds.class_names)} classes, the checkpoint {num_classes}"
                    + ("; pass --class-map" if data.kind == "coco" else ""))
  return (sources.Subset(ds, args.limit) if args.limit is not None else ds), split


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    return evaluate(args)
  except (checkpoints.CheckpointError, DataError, BoxFileError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


def evaluate(args) -> int:
  model, meta = checkpoints.load_model(args.checkpoint)
  fcn = checkpoints.load_model(args.fcn_checkpoint)[0] if args.fcn_checkpoint else None
  train_config = configs.train_config(meta)
  try:
    tta = test_time_options(args)
  except ValueError as e:
    raise DataError(str(e)) from e
  config = InferenceConfig(top_k=max([args.top_k, *(args.curve or [])]), proposals=args.proposals[0],
                           input_size=args.input_size or train_config.crop, crf=False, **tta)
  if args.proposals_from is not None and len(args.proposals) > 1:
    raise DataError("--proposals-from replaces the generator: give one --proposals, not several")
  evaluator = Evaluator(model, fcn, config, sorted(args.curve or []), args.proposals)
  ds, split = open_split(args, train_config, evaluator.k)
  out_dir = args.output or Path(args.checkpoint)
  box_source = BoxFiles(args.proposals_from) if args.proposals_from is not None else None
  # Results depend on the settings as well as the image: each set of settings has its own cache.
  settings = {"config": dataclasses.asdict(config), "proposals": args.proposals, "curve": sorted(args.curve or []),
              "fcn": str(args.fcn_checkpoint), "proposals_from": str(args.proposals_from)}
  cache = out_dir / "cache" / split / configs.json_digest(settings)
  cache.mkdir(parents=True, exist_ok=True)
  user_boxes = lambda ex: None if box_source is None else box_source.boxes(ex.image_id, *ex.label.shape)[0]
  ids = [ds.image_id(i) for i in range(len(ds))]
  todo = [j for j, i in enumerate(ids) if not (cache / f"{i}.npz").exists()]
  if len(todo) < len(ids):
    print(f"resuming: {len(ids) - len(todo)} of {len(ids)} images already scored in {cache}")

  with tqdm(total=len(ids), initial=len(ids) - len(todo), desc=f"evaluating {ds.name}",
            dynamic_ncols=True) as bar:
    for start in range(0, len(todo), args.chunk):
      chunk = [ds[j] for j in todo[start:start + args.chunk]]
      parts = [evaluator.network_part(ex, user_boxes(ex)) for ex in chunk]
      for name in parts[0][1] if parts else ():
        refined = crf.dense_crf_many([ex.image for ex in chunk], [p[1][name] for p in parts],
                                     processes=args.crf_processes)
        for ex, (confs, _), prob in zip(chunk, parts, refined):
          confs[name] = metrics.confusion_matrix(ex.label, prob.argmax(-1), evaluator.k)
      for ex, (confs, _) in zip(chunk, parts):
        with atomic_path(cache / f"{ex.image_id}.npz") as tmp:
          np.savez(tmp, **confs)
      bar.update(len(chunk))

  totals: dict[str, np.ndarray] = {}
  for image_id in ids:
    with np.load(cache / f"{image_id}.npz") as confs:
      for name in confs.files:
        totals[name] = totals.get(name, 0) + confs[name]
  rows = {name: metrics.summary(c) for name, c in totals.items()}
  table = results_table(rows)
  print(f"{len(ids)} images of {ds.name}\n{table}")
  save_text_atomic(table + "\n\n" + class_table(rows, meta["class_names"]) + "\n", out_dir / "results.md")
  save_text_atomic(json.dumps(
      {"split": split, "data": ds.name, "images": len(ids), "variants": rows, "class_names": meta["class_names"]},
      indent=2), out_dir / "results.json")
  write_confusion(out_dir / "confusion", totals, meta["class_names"], ds.name)
  if args.curve:
    xs = sorted(args.curve)
    series = {g: [100 * rows[variant_name(g, len(args.proposals))("DeconvNet", n)]["miou"] for n in xs]
              for g in args.proposals}
    save_atomic(line_plot(xs, series, f"DeconvNet mIoU against proposals per image ({ds.name})",
                          "proposals per image", "mIoU %"), out_dir / "curve.png")
  return 0


def results_table(rows: dict) -> str:
  lines = ["| variant | mIoU % | pixel acc % | mean class acc % | f.w. IoU % | paper (VOC 2012 test) |",
           "|---|---:|---:|---:|---:|---:|"]
  for name, r in rows.items():
    lines.append(f"| {name} | {100 * r['miou']:.1f} | {100 * r['pixel_acc']:.1f} | {100 * r['mean_class_acc']:.1f} "
                 f"| {100 * r['fw_iou']:.1f} | {PAPER.get(name, '')} |")
  return "\n".join(lines)


def class_table(rows: dict, class_names) -> str:
  """Per-class IoU %, a column per variant; classes in neither ground truth nor prediction left out."""
  lines = ["| class | " + " | ".join(rows) + " |", "|---|" + "---:|" * len(rows)]
  for c, name in enumerate(class_names):
    ious = [r["iou"][c] for r in rows.values()]
    if any(x is not None for x in ious):
      lines.append(f"| {name} | " + " | ".join("" if x is None else f"{100 * x:.1f}" for x in ious) + " |")
  return "\n".join(lines)


def write_confusion(folder: Path, totals: dict, class_names, data_name: str) -> None:
  """FOLDER/VARIANT.json (counts and row-normalised shares) and FOLDER/VARIANT.png for every variant."""
  for name, conf in totals.items():
    stem = "".join(c if c.isalnum() else "_" for c in name).strip("_")
    rows = metrics.normalized_rows(conf)
    save_text_atomic(json.dumps(
        {"variant": name, "class_names": list(class_names), "rows": "ground truth", "columns": "prediction",
         "counts": conf.tolist(), "normalized": [[None if np.isnan(v) else round(float(v), 5) for v in r] for r in rows]}),
        folder / f"{stem}.json")
    save_atomic(confusion_plot(rows, class_names, f"{name} on {data_name}"), folder / f"{stem}.png")


if __name__ == "__main__":  # python -m deconvnet_jax.cli.evaluate
  from deconvnet_jax.cli import run_as_main
  run_as_main(main)
