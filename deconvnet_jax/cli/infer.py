"""Segment a folder of images (or single files) with a checkpoint from train.py.

  python infer.py --checkpoint runs/default --input photos/ --output out/
  python infer.py --checkpoint runs/voc_s2 --fcn-checkpoint runs/fcn --input photos/ --output out/

Instance-wise by default (SPEC.md section 3): top-K proposals, each segmented
by the network in fixed-size batches, scores pasted back (max), softmax, dense
CRF (in parallel processes). For each image it writes OUT/NAME.png (VOC-palette
class indices, readable by VOC tools) and OUT/NAME_overlay.jpg, optionally
OUT/NAME_prob.npy; at the end OUT/index.html, a gallery with a class legend.
Files that fail are reported and the rest go on; the exit status is 1 if any
failed. Existing outputs are kept unless --overwrite, so a run killed midway
finishes the rest when run again. One infer.py at a time writes into an output
folder (a second is refused, naming the first's pid); a full disk stops the run
with exit status 2 and no half-written file. BatchNorm is folded into
the convolutions on load (the same function, fewer ops; --no-fold keeps it); a
checkpoint folded by `batchnorm.py fold` loads as it is.
"""

import argparse
import collections
import concurrent.futures
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from deconvnet_jax import checkpoints, configs, crf
from deconvnet_jax.box_files import HELP as BOX_FILES_HELP, BoxFileError, BoxFiles
from deconvnet_jax.images import IMAGE_SUFFIXES, ImageError, load_rgb, save_atomic, save_npy_atomic
from deconvnet_jax.inference import (PROPOSALS, PROPOSALS_HELP, InferenceConfig, Segmenter, add_test_time_arguments,
                                     test_time_options)
from deconvnet_jax.locks import LockError, folder_lock
from deconvnet_jax.data.voc import read_index_png
from deconvnet_jax.viz import error_map, gallery_html, overlay, palette_image


def parse_args(argv=None):
  d = InferenceConfig()
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", type=Path, help="train.py work dir of DeconvNet (or a step folder in it)")
  p.add_argument("--fcn-checkpoint", type=Path, help="an FCN-8s checkpoint: ensemble (EDeconvNet)")
  p.add_argument("--input", type=Path, nargs="+", required=True, help="image files and/or folders")
  p.add_argument("--output", type=Path, required=True)
  p.add_argument("--recursive", action="store_true", help="descend into sub-folders")
  p.add_argument("--mode", choices=["instance", "whole"], default=d.mode,
                 help="instance: proposals (the paper); whole: one forward over the whole image")
  p.add_argument("--top-k", type=int, default=d.top_k, help="proposals per image")
  p.add_argument("--proposals", choices=PROPOSALS, default=d.proposals,
                 help=PROPOSALS_HELP)
  p.add_argument("--min-size", type=float, help="drop proposals with a side under this (px); "
                                                "default 112 px scaled to the image")
  p.add_argument("--proposals-from", type=Path, metavar="DIR|FILE",
                 help="use these proposals instead of the generator's (ID: each image's file name without "
                      "suffix): " + BOX_FILES_HELP)
  p.add_argument("--input-size", type=int, help="proposal crop side fed to the network "
                                                "(default: the crop size the checkpoint trained on)")
  p.add_argument("--batch-size", type=int, default=d.batch_size, help="proposals per forward")
  p.add_argument("--dtype", choices=["float32", "bfloat16"],
                 help="compute dtype (default: the checkpoint's). bfloat16 on TPUs, recent GPUs and CPUs with "
                      "bf16 units (avx512_bf16, amx_bf16: see README, Benchmark)")
  p.add_argument("--aggregation", choices=["max", "mean"], default=d.aggregation)
  p.add_argument("--no-crf", action="store_true", help="skip the dense CRF")
  p.add_argument("--crf-processes", type=int, help="parallel CRF processes (default: all cores)")
  p.add_argument("--max-side", type=int, default=1024,
                 help="larger images are segmented at this longer side and the labels scaled back "
                      "(probabilities stay at the reduced size); not with --tile")
  add_test_time_arguments(p)
  p.add_argument("--save-prob", action="store_true", help="also write NAME_prob.npy [H, W, K] float16")
  p.add_argument("--ground-truth", type=Path, help="folder of class-index PNGs named like the images "
                 "(e.g. VOC2012/SegmentationClass): adds NAME_error.png and error maps to the gallery")
  p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
  p.add_argument("--no-fold", action="store_true", help="keep BatchNorm as separate layers (by default it "
                 "is folded into the convolutions on load: the same function, fewer ops)")
  p.add_argument("--debug", action="store_true", help="report each new compilation")
  return p.parse_args(argv)


def find_inputs(paths: list[Path], recursive: bool) -> list[tuple[Path, Path]]:
  """(file, output name relative to its input root, without suffix) for every input image.

  Files whose names differ only in the suffix (a.png, a.jpg) would share outputs: theirs keep the
  suffix in the name (a_png, a_jpg), with a note.
  """
  found = []
  for root in paths:
    if root.is_dir():
      files = root.rglob("*") if recursive else root.glob("*")
      found += [(f, f.relative_to(root).with_suffix("")) for f in sorted(files)
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
    else:
      found.append((root, Path(root.stem)))
  names = collections.Counter(name for _, name in found)
  shared = {name for name, n in names.items() if n > 1}
  if shared:
    print(f"note: {len(shared)} output name(s) shared by several inputs (e.g. {sorted(shared)[0]}): their "
          "outputs keep the file's suffix, e.g. NAME_jpg.png", file=sys.stderr)
  return [(f, name.with_name(f"{name.name}_{f.suffix.lstrip('.').lower()}") if name in shared else name)
          for f, name in found]


def shrink(image: np.ndarray, max_side: int) -> np.ndarray:
  """The image with its longer side at most max_side (aspect kept)."""
  h, w = image.shape[:2]
  if max(h, w) <= max_side:
    return image
  scale = max_side / max(h, w)
  size = (max(1, round(w * scale)), max(1, round(h * scale)))
  return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))


def user_boxes(source: BoxFiles, name: str, image: np.ndarray, small: np.ndarray) -> np.ndarray:
  """The image's boxes from the user's files, [K, 4] (y0, x0, y1, x1), scaled to the segmented size."""
  boxes, _ = source.boxes(name, *image.shape[:2])
  return boxes * (small.shape[0] / image.shape[0])


def write_outputs(out: Path, image, label, prob, save_prob: bool, truth_dir: Path | None = None):
  if label.shape != image.shape[:2]:  # segmented at a reduced size
    label = np.asarray(palette_image(label).resize(image.shape[1::-1], Image.Resampling.NEAREST))
  save_atomic(Image.fromarray(overlay(image, label)), out.parent / f"{out.name}_overlay.jpg", quality=90)
  truth_path = truth_dir / f"{out.name}.png" if truth_dir else None
  if truth_path is not None and truth_path.exists():
    truth = read_index_png(truth_path)
    if truth.shape == label.shape:
      save_atomic(Image.fromarray(error_map(image, label, truth)), out.parent / f"{out.name}_error.png")
    else:
      tqdm.write(f"warning: {truth_path} is {truth.shape[1]}x{truth.shape[0]}, its image "
                 f"{label.shape[1]}x{label.shape[0]}: no error map", file=sys.stderr)
  if save_prob:
    save_npy_atomic(prob.astype(np.float16), out.parent / f"{out.name}_prob.npy")
  save_atomic(palette_image(label), out.parent / f"{out.name}.png")  # last: marks the image done


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.checkpoint is None:
    print("No --checkpoint given. Train one first, e.g. `python train.py` (the small model on the "
          "generated data, a few minutes on a CPU), then pass --checkpoint runs/default.",
          file=sys.stderr)
    return 2
  try:
    model, meta = checkpoints.load_model(args.checkpoint, args.dtype)
    fcn = checkpoints.load_model(args.fcn_checkpoint, args.dtype)[0] if args.fcn_checkpoint else None
  except (checkpoints.CheckpointError, ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  input_size = args.input_size or configs.train_config(meta).crop
  try:
    tta = test_time_options(args)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  config = InferenceConfig(mode=args.mode, top_k=args.top_k, min_size=args.min_size, proposals=args.proposals,
                           input_size=input_size, batch_size=args.batch_size,
                           aggregation=args.aggregation, crf=not args.no_crf, **tta)
  try:
    box_source = BoxFiles(args.proposals_from) if args.proposals_from is not None else None
  except BoxFileError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if box_source is not None and args.mode != "instance":
    print("error: --proposals-from needs --mode instance", file=sys.stderr)
    return 2
  segmenter = Segmenter(model, config, fcn, fold=not args.no_fold)
  inputs = find_inputs(args.input, args.recursive)
  if not inputs:
    print(f"error: no images found in {' '.join(map(str, args.input))}", file=sys.stderr)
    return 2
  if config.crf:
    crf.check_available()

  try:
    with folder_lock(args.output, "infer.py", "choose another --output"):
      return segment_all(args, inputs, segmenter, config, box_source, meta)
  except LockError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except OSError as e:  # a full disk or a read-only folder: every later image would fail the same way
    done = sum(1 for _, name in inputs if (args.output / name.parent / f"{name.name}.png").exists())
    print(f"error: {e.filename or args.output}: cannot write ({e.strerror or e}); {done} of {len(inputs)} "
          "images have complete outputs, and no file is half-written; free space, then run again to finish "
          "the rest", file=sys.stderr)
    return 2


def segment_all(args, inputs, segmenter, config, box_source, meta) -> int:
  """Segments `inputs` into args.output: the loop behind main, with the CRF in a process pool."""
  failed, done, skipped, entries = [], [], 0, []
  totals = dict.fromkeys(("proposals", "network", "aggregation", "crf"), 0.0)
  pool = crf.worker_pool(args.crf_processes) if config.crf else None
  pending = {}

  def finish(future):
    out, image, name, started = pending.pop(future)
    prob = future.result()
    totals["crf"] += time.perf_counter() - started
    write_outputs(out, image, prob.argmax(-1).astype(np.uint8), prob, args.save_prob, args.ground_truth)
    done.append(name)

  try:
    for path, name in tqdm(inputs, desc="images", dynamic_ncols=True):
      out = args.output / name
      out.parent.mkdir(parents=True, exist_ok=True)
      if (out.parent / f"{out.name}.png").exists() and not args.overwrite:
        skipped += 1
        entries.append(name)
        continue
      try:
        image = load_rgb(path)
      except ImageError as e:
        failed.append(str(e))
        continue
      small = image if args.tile else shrink(image, args.max_side)  # tiles: full resolution
      try:
        boxes = user_boxes(box_source, path.stem, image, small) if box_source is not None else None
      except BoxFileError as e:
        failed.append(str(e))
        continue
      compiled = len(segmenter.net.compiled)
      result = segmenter.segment(small, crf=False, boxes=boxes)
      for shape in segmenter.net.compiled[compiled:] if args.debug else ():
        tqdm.write(f"debug: compiled the network for input {shape} ({path})", file=sys.stderr)
      for key in ("proposals", "network", "aggregation"):
        totals[key] += result.seconds[key]
      entries.append(name)
      if pool is None:
        write_outputs(out, image, result.label, result.prob, args.save_prob, args.ground_truth)
        done.append(name)
        continue
      future = pool.submit(crf.dense_crf, small, result.prob, config.crf_params)
      pending[future] = (out, image, name, time.perf_counter())
      while len(pending) > 2 * (args.crf_processes or 2):  # bound memory held by queued images
        finish(next(concurrent.futures.as_completed(pending)))
    for future in list(concurrent.futures.as_completed(pending)):
      finish(future)
  finally:
    if pool is not None:
      pool.shutdown(cancel_futures=True)

  gallery_html(args.output, entries, meta["class_names"], failed, errors=args.ground_truth is not None)
  n = max(len(done), 1)
  split = ", ".join(f"{k} {v / n:.2f}" for k, v in totals.items())
  print(f"{len(done)} segmented, {skipped} skipped (outputs exist; --overwrite to redo), "
        f"{len(failed)} failed; seconds per image: {split} (crf: wall time in the pool); "
        f"gallery: {args.output / 'index.html'}")
  for message in failed:
    print(f"failed: {message}", file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":  # python -m deconvnet_jax.cli.infer
  from deconvnet_jax.cli import run_as_main
  run_as_main(main)
