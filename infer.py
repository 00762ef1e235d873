"""Segment a folder of images (or single files) with a checkpoint from train.py.

Runs deconvnet_jax/cli/infer.py, as the installed `deconvnet-infer` command does; `--help` says more.
"""

import sys

from deconvnet_jax.cli.infer import main

if __name__ == "__main__":
  sys.exit(main())
