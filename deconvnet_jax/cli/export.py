"""Export a checkpoint's inference network with jax.export, for use without this package's model code.

  python export.py --checkpoint runs/voc_s2 --out exported/voc_s2
  python -c "from deconvnet_jax.export import load; run = load('exported/voc_s2'); print(run.meta)"

Writes OUT/model.jaxexport (StableHLO: parameters and RGB uint8 [b, S, S, 3] ->
logits float32 [b, S, S, K]; BatchNorm folded and the input normalisation
inside; any batch b), OUT/params.npz and OUT/meta.json (class names, S). S is
the crop size the checkpoint trained on, or --input-size. OUT is written only
when complete; an existing OUT is refused.
"""

import argparse
import sys
from pathlib import Path

from deconvnet_jax import checkpoints, configs
from deconvnet_jax.export import export_model


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", type=Path, required=True, help="train.py work dir (or a step folder)")
  p.add_argument("--out", type=Path, required=True, help="new folder for the export")
  p.add_argument("--input-size", type=int, help="input side S (default: the checkpoint's training crop)")
  args = p.parse_args(argv)
  try:
    model, meta = checkpoints.load_model(args.checkpoint)
    size = args.input_size or configs.train_config(meta).crop
    exported = export_model(model, args.out, meta["class_names"], size, source=str(args.checkpoint))
  except (checkpoints.CheckpointError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"exported {exported['arch']} ({len(exported['class_names'])} classes, input {size}x{size}, any batch) "
        f"to {args.out}")
  return 0


if __name__ == "__main__":  # python -m deconvnet_jax.cli.export
  from deconvnet_jax.cli import run_as_main
  run_as_main(main)
