"""Host memory that XLA's CPU backend can reuse: glibc's malloc told to keep what is freed.

XLA's CPU runtime allocates a program's buffers (hundreds of MB to GB) afresh on
every call, from its worker threads. glibc serves allocations that large from
threads with `mmap` and unmaps them on `free`, so every call touches fresh
pages, which the kernel must fault in and zero: 666,000 page faults (2.7 GB) per
paper-network train step at batch 2 on a 2-core AMD EPYC. With one arena, no
`mmap` and no trimming, freed buffers are reused once the heap has grown to a
step's size: no faults, and the paper step at batch 4 went from 3.58 to 2.29 s
an image (README, *Benchmark*). The process keeps its peak heap in exchange.

The command-line programs call `reuse_freed_memory()` before JAX starts. It
acts where the CPU is the compute device: not where a TPU or GPU plugin for JAX
is installed (there the host runs the input pipeline's threads, which one arena
would make queue for malloc's lock), unless `DECONVNET_MALLOC=reuse`.
`DECONVNET_MALLOC=system` leaves glibc's own settings everywhere. A process
that preloads another allocator (tcmalloc, jemalloc) keeps it: their `mallopt`
ignores these.
"""

import ctypes
import os
import pkgutil
import sys

ENV = "DECONVNET_MALLOC"
# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
# One arena (threads' own arenas map large blocks whatever the settings), no mmap, and a trim threshold of -1: never
# give the top of the heap back (a threshold of INT_MAX, 2 GB, still returned the paper step's buffers every time).
SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))


def reuse_freed_memory() -> bool:
  """Sets glibc's malloc to keep freed memory for reuse; True if it did.

  Call it before JAX's thread pools start (before the first computation): a
  thread that already has its own arena keeps it. False, and nothing changed,
  off Linux, without glibc, with `DECONVNET_MALLOC=system`, or (unless
  `DECONVNET_MALLOC=reuse`) where an accelerator plugin is installed.
  """
  choice = os.environ.get(ENV, "").lower()
  if choice == "system" or not sys.platform.startswith("linux"):
    return False
  if choice != "reuse" and accelerator_plugin_installed():
    return False
  libc = ctypes.CDLL(None)
  if not hasattr(libc, "gnu_get_libc_version"):  # musl and others: no mallopt to speak of
    return False
  libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  return all(libc.mallopt(param, value) == 1 for param, value in SETTINGS)


def accelerator_plugin_installed() -> bool:
  """Whether JAX could find a TPU or GPU here (libtpu, jax_cuda*/jax_rocm* plugins), without importing JAX.

  `JAX_PLATFORMS=cpu` says it will not use one.
  """
  if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
    return False
  return any(m.name == "libtpu" or m.name.startswith(("jax_cuda", "jax_rocm")) for m in pkgutil.iter_modules())
