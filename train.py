"""Train DeconvNet on VOC (+ SBD: train_aug), a prepared TFDS dataset, COCO, or generated data.

Runs deconvnet_jax/cli/train.py, as the installed `deconvnet-train` command does; `--help` says more.
"""

import sys

if __name__ == "__main__":
  # Imported here, not above: worker processes (the CRF's) re-import this file, and need none of it.
  from deconvnet_jax.cli import start_train
  sys.exit(start_train())
