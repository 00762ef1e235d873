"""Segment a folder of images (or single files) with a checkpoint from train.py.

Runs deconvnet_jax/cli/infer.py, as the installed `deconvnet-infer` command does; `--help` says more.
"""

import sys

if __name__ == "__main__":
  # Imported here, not above: worker processes (the CRF's) re-import this file, and need none of it.
  from deconvnet_jax.cli import start_infer
  sys.exit(start_infer())
