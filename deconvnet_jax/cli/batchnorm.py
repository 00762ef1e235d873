"""BatchNorm at test time: re-estimate the statistics over training batches, or fold them away.

  python batchnorm.py reestimate --checkpoint runs/voc_s2 --batches 500 --out runs/voc_s2_bn
  python batchnorm.py fold --checkpoint runs/voc_s2_bn --out runs/voc_s2_folded

reestimate: with the network fixed, runs N training batches (made as train.py
makes them; data, stage, crop, batch size and seed default to the checkpoint's
training run) with every BatchNorm on its batch statistics, and writes a new
checkpoint whose statistics are the averages of the per-batch means and
m/(m-1)-corrected variances. Fine-tune from it with train.py --init-from.
fold: writes the same function as a network without BatchNorm (each BN folded
into the conv / deconv before it). infer.py and evaluate.py fold on load, so
this export is for other consumers of the weights.
Both write OUT only when complete; an existing OUT is refused.
"""

import argparse
import dataclasses
import sys
from pathlib import Path

from deconvnet_jax import batchnorm, checkpoints, configs, train_loop, training
from deconvnet_jax.configs import TrainConfig
from deconvnet_jax.data import sources
from deconvnet_jax.labels import DataError

# TrainConfig fields `reestimate` takes from the checkpoint's training run unless given here.
RUN_FIELDS = ("stage", "proposals_per_image", "stage2_iou", "batch_size", "crop", "resize", "seed")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = p.add_subparsers(dest="command", required=True)
  r = commands.add_parser("reestimate", help="re-estimate BatchNorm statistics over training batches")
  r.add_argument("--checkpoint", type=Path, required=True, help="train.py work dir (or a step folder)")
  r.add_argument("--out", type=Path, required=True, help="new work dir for the re-estimated checkpoint")
  r.add_argument("--batches", type=int, default=500, help="training batches to average over (the reference: 500)")
  defaults = "default: the checkpoint's training run"
  sources.add_arguments(r, defaults)
  r.add_argument("--train-split", help=defaults)
  r.add_argument("--stage", type=int, choices=[0, 1, 2], help=defaults)
  r.add_argument("--proposals-per-image", type=int, help=defaults)
  r.add_argument("--stage2-iou", type=float, help=defaults)
  r.add_argument("--batch-size", type=int, help=f"global batch ({defaults})")
  r.add_argument("--crop", type=int, help=defaults)
  r.add_argument("--resize", type=int, help=defaults)
  r.add_argument("--seed", type=int, help=f"batch order ({defaults})")
  f = commands.add_parser("fold", help="fold BatchNorm into the convolutions (an inference export)")
  f.add_argument("--checkpoint", type=Path, required=True, help="train.py work dir (or a step folder)")
  f.add_argument("--out", type=Path, required=True, help="new work dir for the folded checkpoint")
  return p.parse_args(argv)


def data_config(args, meta: dict) -> TrainConfig:
  """The training run's settings, with the data and batch options given on the command line replacing them."""
  cfg = configs.train_config(meta)
  data = sources.from_arguments(args, cfg.data)
  if args.train_split:
    data = dataclasses.replace(data, train_split=args.train_split)
  given = {name: getattr(args, name) for name in RUN_FIELDS if getattr(args, name) is not None}
  return dataclasses.replace(cfg, data=sources.resolve_data(data), **given)


def training_batches(cfg: TrainConfig):
  """Endless host batches {"image", "label"} of cfg.batch_size rows, as train.py draws them from step 0.

  The stage's item list is read from the training run's cache when its work dir is still there.
  """
  split = sources.open_split(cfg.data, cfg.data.train_split, cfg.model.num_classes, training=True)
  cache = cfg.workdir / "items" if cfg.workdir.is_dir() else None
  return train_loop.training_batches(cfg, split, cfg.batch_size, cache_dir=cache)[1]


def reestimate(args) -> dict:
  checkpoints.check_new_dir(args.out)
  meta = checkpoints.read_meta(args.checkpoint)
  if not meta["model"].get("batch_norm", True):
    raise ValueError(f"{args.checkpoint}: the network has no BatchNorm (batch_norm=False: FCN-8s, "
                     "or already folded); nothing to re-estimate")
  cfg = data_config(args, meta)
  mesh = training.make_mesh()
  if cfg.batch_size % mesh.size:
    raise ValueError(f"--batch-size {cfg.batch_size} must be a multiple of the {mesh.size} devices")
  note = {"data": sources.describe(cfg.data), "train_split": cfg.data.train_split, "stage": cfg.stage,
          "batch_size": cfg.batch_size, "crop": cfg.crop, "seed": cfg.seed}
  return batchnorm.reestimate_checkpoint(args.checkpoint, args.out, training_batches(cfg),
                                         args.batches, mesh, note)


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    if args.command == "reestimate":
      meta = reestimate(args)
      print(f"re-estimated BatchNorm statistics over {args.batches} batches of "
            f"{meta['bn_statistics']['batch_size']}: {args.out}")
    else:
      batchnorm.fold_checkpoint(args.checkpoint, args.out)
      print(f"folded BatchNorm into the convolutions: {args.out} (a batch_norm=False network)")
  except (checkpoints.CheckpointError, DataError, train_loop.TrainError, ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":  # python -m deconvnet_jax.cli.batchnorm
  from deconvnet_jax.cli import run_as_main
  run_as_main(main)
