"""One XLA compilation cache for a whole test run, shared by its workers and the programs they start.

Many tests train or run the small model in processes of their own (train.py,
infer.py, two "hosts"), each compiling the same train step again: about 12 s
on 2 cores against 3.4 s with the program from JAX's persistent cache. The cache lives
in a fresh folder for the run (not the user's ~/.cache), removed at the end,
so every run still compiles each program once. This file must not import JAX:
the workers read the variable when they import it.

A program reaches another test only if it is compiled first. Tests that run the
same program in different processes are marked `xdist_group` (pyproject.toml
sets `--dist loadgroup`), which runs them in one worker in a fixed order; tests
that only read a trained checkpoint share one module-scoped run.
"""

import os
import shutil
import tempfile

import pytest

_CACHE = "JAX_COMPILATION_CACHE_DIR"
_KEY = pytest.StashKey[str]()


def pytest_configure(config):
  if os.environ.get("PYTEST_XDIST_WORKER") or os.environ.get(_CACHE):
    return  # a worker inherits the controller's folder; a folder the user chose is kept
  directory = tempfile.mkdtemp(prefix="deconvnet-jax-test-xla-")
  os.environ[_CACHE] = directory
  config.stash[_KEY] = directory


def pytest_unconfigure(config):
  directory = config.stash.get(_KEY, None)
  if directory is not None:
    shutil.rmtree(directory, ignore_errors=True)
    del os.environ[_CACHE]

