"""Convert a Caffe .caffemodel (VGG16, FCN-8s, DeconvNet) into a checkpoint that infer.py and train.py read.

  python convert_caffe.py fcn8s-heavy-pascal.caffemodel --kind fcn8s --out runs/fcn8s_caffe
  python convert_caffe.py DeconvNet_trainval_inference.caffemodel --kind deconvnet --out runs/deconvnet_caffe
  python convert_caffe.py stage_2_train_result.caffemodel --kind deconvnet-train --out runs/deconvnet_s2
  python convert_caffe.py VGG_ILSVRC_16_layers.caffemodel --kind vgg16 --model paper --out runs/vgg_init

The configuration (width, fc6 size, classes, BatchNorm) is read from the file;
options that contradict the file stop with an error naming the layer. The
output directory is written only once the whole import has succeeded.
"""

import argparse
import sys
from pathlib import Path

from deconvnet_jax import caffe, checkpoints, configs


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("caffemodel", type=Path)
  p.add_argument("--kind", required=True, choices=caffe.KINDS,
                 help="vgg16: ImageNet VGG16 into a new model's encoder; fcn8s: FCN-8s; deconvnet: the "
                      "released DeconvNet (BN folded); deconvnet-train: a DeconvNet training snapshot")
  p.add_argument("--out", type=Path, required=True, help="work dir to create (must not exist)")
  p.add_argument("--model", choices=sorted(configs.MODELS),
                 help="vgg16: the network whose encoder it initialises (default: a DeconvNet "
                      "of the file's widths)")
  p.add_argument("--num-classes", type=int, help="check (or, for vgg16, set) the number of classes")
  p.add_argument("--batch-norm", choices=["true", "false"],
                 help="deconvnet kinds: keep BatchNorm layers (true) or fold them into the "
                      "convolutions (false); default: fold a folded file, keep statistics to re-estimate")
  p.add_argument("--seed", type=int, default=0, help="vgg16: initialisation of the layers VGG16 lacks")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  overrides = {}
  if args.num_classes is not None:
    overrides["num_classes"] = args.num_classes
  if args.batch_norm is not None:
    overrides["batch_norm"] = args.batch_norm == "true"
  config = configs.model_config(args.model) if args.model else None
  try:
    config = caffe.convert_caffe(args.caffemodel, args.kind, args.out, config, seed=args.seed, **overrides)
  except (caffe.CaffeError, checkpoints.CheckpointError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.out}: {config.arch}, {config.num_classes} classes, width {config.width}, "
        f"fc {config.fc_dim}x{config.fc_kernel}, batch_norm={config.batch_norm}, input caffe_bgr")
  if args.kind == "deconvnet-train" and config.batch_norm:
    print("note: the file holds no BatchNorm statistics; they start at mean 0 / variance 1. "
          f"Re-estimate them (python batchnorm.py reestimate --checkpoint {args.out} --data ... "
          f"--out ...) or fine-tune (train.py --init-from {args.out}) before evaluating.")
  return 0


if __name__ == "__main__":  # python -m deconvnet_jax.cli.convert_caffe
  from deconvnet_jax.cli import run_as_main
  run_as_main(main)
