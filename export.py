"""Export a checkpoint's inference network with jax.export, for use without this package's model code.

Runs deconvnet_jax/cli/export.py, as the installed `deconvnet-export` command does; `--help` says more.
"""

import sys

from deconvnet_jax.cli.export import main

if __name__ == "__main__":
  sys.exit(main())
