"""The command-line programs. `python train.py` (top level) and `deconvnet-train` (installed) both start here.

`run` sets up glibc's malloc for XLA's CPU backend first (`host_memory.configure_process`, which may restart the
process once, before JAX is imported), then calls the program's `main`. The `start_*` functions are what the
top-level scripts and the installed commands call; `python -m deconvnet_jax.cli.<program>` goes through
`run_as_main`. Tests call `main(argv)` in-process.
"""

import importlib
import sys
from functools import partial

from deconvnet_jax.host_memory import configure_process


def run(program: str) -> int:
  """`deconvnet_jax.cli.<program>.main()` in a process set up for it."""
  configure_process()
  return importlib.import_module(f"deconvnet_jax.cli.{program}").main()


def run_as_main(main) -> None:
  """`python -m deconvnet_jax.cli.<program>`: `run`'s set-up, then `main` of the module already running as __main__."""
  configure_process()
  sys.exit(main())


# The programs' entry points (train.py and `deconvnet-train` call start_train, and so on).
start_train = partial(run, "train")
start_infer = partial(run, "infer")
start_evaluate = partial(run, "evaluate")
start_export = partial(run, "export")
start_batchnorm = partial(run, "batchnorm")
start_convert_caffe = partial(run, "convert_caffe")
