"""mIoU of a checkpoint on a split of VOC, a prepared TFDS dataset or COCO, for inference variants side by side.

Runs deconvnet_jax/cli/evaluate.py, as the installed `deconvnet-evaluate` command does; `--help` says more.
"""

import sys

from deconvnet_jax.cli.evaluate import main

if __name__ == "__main__":
  sys.exit(main())
