"""The command-line programs. `python train.py` (top level) and `deconvnet-train` (installed) both start here.

`run` sets up glibc's malloc for XLA's CPU backend first (`host_memory.configure_process`, which may restart the
process once, before JAX is imported), then calls the program's `main`. The `start_*` functions are what the
top-level scripts and the installed commands call. Tests call `main(argv)` in-process.
"""

import importlib

from deconvnet_jax.host_memory import configure_process


def run(program: str) -> int:
  """`deconvnet_jax.cli.<program>.main()` in a process set up for it."""
  configure_process()
  return importlib.import_module(f"deconvnet_jax.cli.{program}").main()


def start_train() -> int:
  return run("train")


def start_infer() -> int:
  return run("infer")


def start_evaluate() -> int:
  return run("evaluate")


def start_export() -> int:
  return run("export")


def start_batchnorm() -> int:
  return run("batchnorm")


def start_convert_caffe() -> int:
  return run("convert_caffe")
