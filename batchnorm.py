"""BatchNorm at test time: re-estimate the statistics over training batches, or fold them away.

Runs deconvnet_jax/cli/batchnorm.py, as the installed `deconvnet-batchnorm` command does; `--help` says more.
"""

import sys

from deconvnet_jax.cli.batchnorm import main

if __name__ == "__main__":
  sys.exit(main())
