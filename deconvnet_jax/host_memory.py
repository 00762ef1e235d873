"""Host memory for XLA's CPU backend: glibc's malloc on transparent huge pages, or told to keep what is freed.

XLA's CPU runtime allocates a program's buffers (hundreds of MB to GB) afresh on
every call, from its worker threads. glibc serves allocations that large with
`mmap` and unmaps them on `free`, so every call touches fresh pages, which the
kernel must fault in and zero: 666,000 page faults (2.7 GB) per paper-network
train step at batch 2 on a 2-core AMD EPYC. Two cures, measured equal in speed
(paper step, batch 4, float32, XLA's path on a Zen 3 EPYC: 11.4-13.1 s and
11.5-12.9 s a step against 15.6-17.9 s on glibc's defaults):

- huge pages (the default where it is possible): glibc's own tunable
  `glibc.malloc.hugetlb=1` (glibc 2.35+) has it ask the kernel for transparent
  huge pages for what it maps, 512 times fewer faults. glibc reads tunables
  only when a process starts, so `configure_process` restarts the program once
  with `GLIBC_TUNABLES` set (the same command line, the same PID, by `exec`).
  Memory is given back as usual: the resident size stays at a step's need.
- reuse (`reuse_freed_memory`): one arena, no `mmap`, no trimming; freed buffers
  are reused once the heap has grown to a step's size. The heap can fragment:
  on XLA's path it grew in 4.5 GB jumps (7.3 -> 11.8 -> 16.3 GB, and past 24 GB
  in another run, where the kernel killed it). Used where huge pages are not
  possible (transparent huge pages off, an older glibc) and where asked.

The command-line programs call `configure_process()` first thing. It acts where
the CPU is the compute device: not where a TPU or GPU plugin for JAX is
installed (there the host runs the input pipeline's threads), unless asked.
`DECONVNET_MALLOC=huge_pages` or `reuse` asks for one, `system` leaves glibc's
own settings. A process that preloads another allocator (tcmalloc, jemalloc)
keeps it: their `mallopt` ignores these, and so does the tunable.
"""

import ctypes
import os
import pkgutil
import sys
from pathlib import Path

ENV = "DECONVNET_MALLOC"
# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
# One arena (threads' own arenas map large blocks whatever the settings), no mmap, and a trim threshold of -1: never
# give the top of the heap back (a threshold of INT_MAX, 2 GB, still returned the paper step's buffers every time).
SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))


TUNABLE = "glibc.malloc.hugetlb=1"
MODES = ("huge_pages", "reuse", "system")


def configure_process() -> str:
  """A program's first call: sets up glibc's malloc for XLA on the CPU and returns the mode in force.

  "huge_pages" restarts the process once (`os.execve` of the same command line, with `TUNABLE` added to
  `GLIBC_TUNABLES`): call this before reading input or starting threads. Where that is not possible it falls back
  to "reuse". "system": nothing changed (off Linux, with an accelerator plugin, another allocator preloaded, the
  user's own `glibc.malloc.hugetlb` setting left as it is, or asked).
  """
  choice = os.environ.get(ENV, "").lower()
  if choice and choice not in MODES:
    raise ValueError(f"{ENV}={choice!r}: one of {', '.join(MODES)}, or unset for the default")
  if (choice == "system" or not _glibc_version() or (not choice and accelerator_plugin_installed())
      or any(name in os.environ.get("LD_PRELOAD", "") for name in ("jemalloc", "tcmalloc", "mimalloc"))):
    return "system"
  tunables = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t]
  hugetlb = [t for t in tunables if t.startswith("glibc.malloc.hugetlb=")]
  if hugetlb:  # this process was restarted here, or the user chose
    return "system" if hugetlb[-1].endswith("=0") else "huge_pages"
  if choice != "reuse" and huge_pages_possible() and sys.argv[0] not in ("", "-"):  # not a prompt or stdin
    sys.stdout.flush()
    sys.stderr.flush()
    try:
      os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]],
                {**os.environ, "GLIBC_TUNABLES": ":".join([*tunables, TUNABLE])})
    except OSError:
      pass  # could not restart: reuse instead
  return "reuse" if _keep_freed_memory() else "system"


def huge_pages_possible() -> bool:
  """glibc 2.35+ (it knows the tunable) and the kernel's transparent huge pages not off."""
  version = _glibc_version()
  if not version or tuple(int(p) for p in version.split(".")[:2]) < (2, 35):
    return False
  try:
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
  except OSError:
    return False
  return "[never]" not in mode


def _glibc_version() -> str | None:
  """glibc's version on Linux ("2.36"), else None (musl, other systems)."""
  if not sys.platform.startswith("linux"):
    return None
  libc = ctypes.CDLL(None)
  if not hasattr(libc, "gnu_get_libc_version"):
    return None
  libc.gnu_get_libc_version.restype = ctypes.c_char_p
  return libc.gnu_get_libc_version().decode()


def reuse_freed_memory() -> bool:
  """Sets glibc's malloc to keep freed memory for reuse; True if it did.

  Call it before JAX's thread pools start (before the first computation): a
  thread that already has its own arena keeps it. False, and nothing changed,
  off Linux, without glibc, with `DECONVNET_MALLOC=system`, or (unless
  `DECONVNET_MALLOC=reuse`) where an accelerator plugin is installed.
  """
  choice = os.environ.get(ENV, "").lower()
  if choice == "system" or not _glibc_version():  # musl and others: no mallopt to speak of
    return False
  if choice != "reuse" and accelerator_plugin_installed():
    return False
  return _keep_freed_memory()


def _keep_freed_memory() -> bool:
  """glibc's `mallopt` with SETTINGS, whatever DECONVNET_MALLOC says (the callers have decided); True if it took."""
  libc = ctypes.CDLL(None)
  libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  return all(libc.mallopt(param, value) == 1 for param, value in SETTINGS)


def accelerator_plugin_installed() -> bool:
  """Whether JAX could find a TPU or GPU here (libtpu, jax_cuda*/jax_rocm* plugins), without importing JAX.

  `JAX_PLATFORMS=cpu` says it will not use one.
  """
  if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
    return False
  return any(m.name == "libtpu" or m.name.startswith(("jax_cuda", "jax_rocm")) for m in pkgutil.iter_modules())
