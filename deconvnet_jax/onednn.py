"""oneDNN's convolutions on the CPU through XLA's FFI (optional: `pip install deconvnet-jax[onednn]`).

XLA's CPU backend converts bfloat16 convolutions to float32, and its float32
convolution gradients trail oneDNN's: conv1_2 (224x224, 64 -> 64, batch 4)
took 86 / 130 / 300 ms (forward / input gradient / weight gradient) in XLA
against 69 / 75 / 105 in oneDNN, and 34 / 36 / 59 in bfloat16 on avx512_bf16,
in one run on a 2-core AMD EPYC; the paper network's train step ran 1.6x
(float32) and 1.8-2.3x (bfloat16) faster than on XLA's. With the `onednn-cpu-gomp` and
`onednn-devel-cpu-gomp` wheels installed, `onednn_conv.cc` is compiled once
(about 6 s, the system's g++) into a cache folder, and `conv.conv2d` calls it
on the CPU. Without them, or with DECONVNET_ONEDNN=0, XLA's convolutions run.

Padding of k or more zeros a side (FCN-8s's conv1_1 pads 100) stays XLA's:
the FCN-8s train step crashed in oneDNN 3.2 with it. The custom calls are opaque to XLA's partitioner (it would gather a sharded
batch onto every device), so they are used only in a process with one CPU
device, and never in exported programs (`portable`).
"""

import contextlib
import ctypes
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from functools import cache
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ENV = "DECONVNET_ONEDNN"  # "0": never use oneDNN
# Forward FLOPs from which a convolution is oneDNN's: below, each call's kernel reorder and thread start-up
# are not repaid, and the small test model's programs stay as they were.
MIN_FLOPS = 1e8
SOURCE = Path(__file__).with_name("onednn_conv.cc")
_TARGETS = ("Forward", "BackwardData", "BackwardWeights")
_PREFIX = "deconvnet_onednn_conv_"
LAYOUTS = ("HWIO", "OIHW")  # kernel layouts, in onednn_conv.cc's numbering
_portable = threading.local()


@contextlib.contextmanager
def portable():
  """Within this block, programs traced use XLA's own convolutions only (e.g. for jax.export)."""
  before = getattr(_portable, "on", False)
  _portable.on = True
  try:
    yield
  finally:
    _portable.on = before


def usable(pad: int, kernel, *arrays, layout: str = "HWIO") -> bool:
  """Whether a convolution of these operands runs on oneDNN: built and loaded, one CPU device, not
  `portable`, float32 operands or bfloat16 ones on a CPU with bf16 units, a square k x k kernel (what
  onednn_conv.cc handles) with at most k - 1 zeros of padding a side, and at least MIN_FLOPS of work."""
  kh, kw = kernel.shape[:2] if layout == "HWIO" else kernel.shape[2:]
  dtypes = {jnp.dtype(a.dtype) for a in (kernel, *arrays)}
  # Without bf16 units oneDNN emulates bfloat16 or falls back to reference kernels (not measured).
  supported = {jnp.dtype(jnp.float32)} | ({jnp.dtype(jnp.bfloat16)} if cpu_has_bf16() else set())
  flops = 2 * np.prod(arrays[0].shape[:3]) * np.prod(kernel.shape)  # about 2 * B*H*W * k*k*Ci*Co
  return (not getattr(_portable, "on", False) and len(dtypes) == 1 and dtypes <= supported and
          kh == kw > pad and flops >= MIN_FLOPS and _single_cpu() and loaded())


@cache
def cpu_has_bf16() -> bool:
  """Whether the CPU has bfloat16 arithmetic units (Linux: /proc/cpuinfo's flags)."""
  try:
    flags = open("/proc/cpuinfo", encoding="utf-8").read()
  except OSError:
    return True  # not Linux: let the run show it
  return "avx512_bf16" in flags or "amx_bf16" in flags


@cache
def _single_cpu() -> bool:
  return len(jax.devices("cpu")) == 1


@cache
def loaded() -> bool:
  """Builds (once per machine and version) and registers the handlers; False, with a warning saying why,
  where the wheels are installed but the build fails."""
  if os.environ.get(ENV, "1") == "0" or not sys.platform.startswith("linux"):
    return False
  try:
    lib_dir, include_dir = _wheel_dirs()
  except importlib.metadata.PackageNotFoundError:
    return False  # the optional extra is not installed
  try:
    library = ctypes.cdll.LoadLibrary(str(_build(lib_dir, include_dir)))
  except (OSError, subprocess.CalledProcessError) as e:
    detail = getattr(e, "stderr", "") or e
    warnings.warn(f"oneDNN convolutions unavailable, using XLA's: building {SOURCE.name} failed: {detail}")
    return False
  for name in _TARGETS:
    handler = getattr(library, f"DeconvnetOnednnConv{name}")
    jax.ffi.register_ffi_target(_PREFIX + name, jax.ffi.pycapsule(handler), platform="cpu")
  return True


def _wheel_dirs() -> tuple[Path, Path]:
  """(folder of libdnnl.so, folder holding oneapi/dnnl/dnnl.hpp) from the installed wheels."""
  find = lambda dist, suffix: next(Path(importlib.metadata.distribution(dist).locate_file(f)).resolve()
                                   for f in importlib.metadata.distribution(dist).files if str(f).endswith(suffix))
  library = find("onednn-cpu-gomp", "libdnnl.so")
  header = find("onednn-devel-cpu-gomp", "oneapi/dnnl/dnnl.hpp")
  return library.parent, header.parents[2]


def _build(lib_dir: Path, include_dir: Path) -> Path:
  """The compiled handlers, from the cache folder or built into it (atomically: parallel processes may race)."""
  versions = f"{jax.__version__} {importlib.metadata.version('onednn-cpu-gomp')} {lib_dir}"
  digest = hashlib.sha256(SOURCE.read_bytes() + versions.encode()).hexdigest()[:16]
  cache_dir = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "deconvnet_jax"
  target = cache_dir / f"onednn_conv-{digest}.so"
  if target.exists():
    return target
  cache_dir.mkdir(parents=True, exist_ok=True)
  compiler = os.environ.get("CXX") or shutil.which("g++") or "c++"
  with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
    out = Path(tmp) / target.name
    subprocess.run([compiler, "-O2", "-std=c++17", "-shared", "-fPIC", str(SOURCE), f"-I{jax.ffi.include_dir()}",
                    f"-I{include_dir}", f"-L{lib_dir}", "-ldnnl", f"-Wl,-rpath,{lib_dir}", "-o", str(out)],
                   check=True, capture_output=True, text=True)
    os.replace(out, target)
  return target


def _call(name: str, shape, dtype, *args, pad: int, layout: str) -> jax.Array:
  return jax.ffi.ffi_call(_PREFIX + name, jax.ShapeDtypeStruct(shape, dtype))(
      *args, pad=np.int64(pad), kernel_layout=np.int64(LAYOUTS.index(layout)))


def conv(x: jax.Array, kernel: jax.Array, pad: int, layout: str = "HWIO") -> jax.Array:
  """[B, H, W, Ci] (*) kernel ([k, k, Ci, Co] HWIO or [Co, Ci, k, k] OIHW), stride 1, `pad` zeros each side
  -> [B, H', W', Co] in x.dtype."""
  (b, h, w, _), s = x.shape, kernel.shape
  k, co = (s[0], s[3]) if layout == "HWIO" else (s[2], s[0])
  return _call("Forward", (b, h + 2 * pad - k + 1, w + 2 * pad - k + 1, co), x.dtype, x, kernel, pad=pad,
               layout=layout)


def input_gradient(g: jax.Array, kernel: jax.Array, pad: int, x_shape, layout: str = "HWIO") -> jax.Array:
  """d(sum(conv(x, kernel, pad) * g)) / dx: [B, H, W, Ci] in g.dtype."""
  return _call("BackwardData", tuple(x_shape), g.dtype, g, kernel, pad=pad, layout=layout)


def weight_gradient(x: jax.Array, g: jax.Array, kernel_shape, pad: int, layout: str = "HWIO") -> jax.Array:
  """d(sum(conv(x, kernel, pad) * g)) / dkernel: kernel_shape (in `layout`), float32."""
  return _call("BackwardWeights", tuple(kernel_shape), jnp.float32, x, g, pad=pad, layout=layout)
