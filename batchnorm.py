"""BatchNorm at test time: re-estimate the statistics over training batches, or fold them away.

Runs deconvnet_jax/cli/batchnorm.py, as the installed `deconvnet-batchnorm` command does; `--help` says more.
"""

import sys

if __name__ == "__main__":
  # Imported here, not above: worker processes (the CRF's) re-import this file, and need none of it.
  from deconvnet_jax.cli import start_batchnorm
  sys.exit(start_batchnorm())
