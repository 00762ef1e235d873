"""Train DeconvNet on VOC (+ SBD: train_aug), a prepared TFDS dataset, COCO, or generated data.

Runs deconvnet_jax/cli/train.py, as the installed `deconvnet-train` command does; `--help` says more.
"""

import sys

from deconvnet_jax.cli.train import main

if __name__ == "__main__":
  sys.exit(main())
