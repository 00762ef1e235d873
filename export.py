"""Export a checkpoint's inference network with jax.export, for use without this package's model code.

Runs deconvnet_jax/cli/export.py, as the installed `deconvnet-export` command does; `--help` says more.
"""

import sys

if __name__ == "__main__":
  # Imported here, not above: worker processes (the CRF's) re-import this file, and need none of it.
  from deconvnet_jax.cli import start_export
  sys.exit(start_export())
