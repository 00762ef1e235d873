"""Segment a folder of images (or single files) with a checkpoint from train.py.

  python infer.py --checkpoint runs/default --input photos/ --output out/

For each image it writes OUT/NAME.png (VOC-palette class indices, readable by
VOC tools) and OUT/NAME_overlay.jpg, optionally OUT/NAME_prob.npy. Files that
fail are reported and the rest go on; the exit status is 1 if any failed.
This version runs the network on the whole image.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from deconvnet_jax import checkpoints
from deconvnet_jax.images import IMAGE_SUFFIXES, ImageError, load_rgb, save_atomic, save_npy_atomic
from deconvnet_jax.inference import Segmenter
from deconvnet_jax.viz import overlay, palette_image


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", type=Path, help="train.py work dir (or a step folder in it)")
  p.add_argument("--input", type=Path, nargs="+", required=True, help="image files and/or folders")
  p.add_argument("--output", type=Path, required=True)
  p.add_argument("--recursive", action="store_true", help="descend into sub-folders")
  p.add_argument("--save-prob", action="store_true", help="also write NAME_prob.npy [H, W, K] float16")
  p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
  p.add_argument("--debug", action="store_true", help="report each new compilation")
  return p.parse_args(argv)


def find_inputs(paths: list[Path], recursive: bool) -> list[tuple[Path, Path]]:
  """(file, name relative to its input root, without suffix) for every input image."""
  found = []
  for root in paths:
    if root.is_dir():
      files = root.rglob("*") if recursive else root.glob("*")
      found += [(f, f.relative_to(root).with_suffix("")) for f in sorted(files)
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
    else:
      found.append((root, Path(root.stem)))
  return found


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.checkpoint is None:
    print("No --checkpoint given. Train one first, e.g. `python train.py` (the small model on the "
          "generated data, a few minutes on a CPU), then pass --checkpoint runs/default.",
          file=sys.stderr)
    return 2
  try:
    model, meta = checkpoints.load_model(args.checkpoint)
  except (checkpoints.CheckpointError, ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  segmenter = Segmenter(model)
  inputs = find_inputs(args.input, args.recursive)
  if not inputs:
    print(f"error: no images found in {' '.join(map(str, args.input))}", file=sys.stderr)
    return 2
  failed, done, skipped, seconds = [], 0, 0, 0.0
  for path, name in tqdm(inputs, desc="images", dynamic_ncols=True):
    out = args.output / name
    label_path = out.parent / f"{out.name}.png"
    if label_path.exists() and not args.overwrite:
      skipped += 1
      continue
    try:
      image = load_rgb(path)
    except ImageError as e:
      failed.append(str(e))
      continue
    start = time.perf_counter()
    compiled = set(segmenter.shapes_compiled)
    label, prob = segmenter.segment(image)
    seconds += time.perf_counter() - start
    for shape in segmenter.shapes_compiled - compiled if args.debug else ():
      tqdm.write(f"debug: compiled for input shape {shape} ({path})", file=sys.stderr)
    save_atomic(Image.fromarray(overlay(image, label)), out.parent / f"{out.name}_overlay.jpg", quality=90)
    if args.save_prob:
      save_npy_atomic(prob.astype(np.float16), out.parent / f"{out.name}_prob.npy")
    save_atomic(palette_image(label), label_path)  # last: its presence marks the image done
    done += 1
  print(f"{done} segmented, {skipped} skipped (outputs exist; --overwrite to redo), {len(failed)} failed; "
        f"{seconds / max(done, 1):.2f} s per image (network); classes: {', '.join(meta['class_names'])}")
  for message in failed:
    print(f"failed: {message}", file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
