"""mIoU of a checkpoint on a split of VOC, a prepared TFDS dataset or COCO, for inference variants side by side.

Runs deconvnet_jax/cli/evaluate.py, as the installed `deconvnet-evaluate` command does; `--help` says more.
"""

import sys

if __name__ == "__main__":
  # Imported here, not above: worker processes (the CRF's) re-import this file, and need none of it.
  from deconvnet_jax.cli import start_evaluate
  sys.exit(start_evaluate())
