"""Hostile files: random and mutated .caffemodel, .pth, SBD .mat, COCO JSON and image files.

A few hundred cases from a fixed seed: valid files written here (with the other tests' writers),
then truncated, flipped, cut, spliced or replaced by random bytes, plus targeted ones (length
fields that claim 10 GB, zip entries and pickle opcodes that claim more than the file, headers of
100000x100000 pixels, JSON of the wrong types or nested 100000 deep, ...). Every case must read
(and give well-formed arrays) or raise its reader's named error naming the file: no other
exception, no hang (each case runs under a time bound) and no huge allocation (the peak resident
memory a case adds, or tracemalloc's peak where that cannot be measured, and on Linux an
address-space limit that turns a larger allocation, even one never touched, into MemoryError).

A failure names the format, the case index and the mutation; `make_case(fmt, index, seeds)`
rebuilds the case.
"""

import contextlib
import io
import json
import pickletools
import signal
import struct
import sys
import time
import tracemalloc
import zipfile
import zlib

import numpy as np
import pytest
import scipy.io
import scipy.sparse
from PIL import Image

import test_caffe
from deconvnet_jax.caffe import CaffeError, infer_config, load_caffe, read_caffemodel
from deconvnet_jax.data.coco import CocoDataset
from deconvnet_jax.data.voc import (image_size, read_image, read_index_png, read_sbd_example,
                                    read_sbd_instances)
from deconvnet_jax.images import ImageError, load_rgb
from deconvnet_jax.labels import DataError
from deconvnet_jax.weights import read_state_dict
from test_caffe import bvlc_bn, conv_layer, fork_bn, number, record, tag, text, varint, write_net
from test_coco import SPLIT, coco_dict, rect, write_coco
from test_sbd import SBD_TRAIN, draw, write_sbd_image

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning"),
              pytest.mark.filterwarnings("ignore::scipy.io.matlab.MatReadWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin")]

SEED = 20250611
CASES = {"caffemodel": 72, "pth": 110, "mat": 72, "coco": 72, "image": 80}
CASE_SECONDS = 10  # a case that runs longer has hung (they take milliseconds; load_caffe ~1 s)
HEADROOM = 1 << 30  # address space a case may add (Linux): more raises MemoryError
MEMORY = 64 << 20  # peak memory a case may add, plus 4x its file


# ---- generic mutations ----

HOSTILE_INTS = (0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
                10_000_000_000, 1 << 62, (1 << 63) - 1, (1 << 64) - 1)


def pick(rng, items):
  return items[int(rng.integers(len(items)))]


def mutate(rng, data: bytes, magic: bytes = b"", align: int = 1, start: int = 0) -> tuple[str, bytes]:
  """(description, bytes) of one random byte-level mutation of `data`."""
  n = len(data)
  kind = pick(rng, ("truncate", "flip", "flip", "insert", "delete", "splice", "random", "integer",
                    "integer"))
  if kind == "truncate":
    cut = int(rng.integers(0, n))
    return f"truncated to {cut} of {n} bytes", data[:cut]
  if kind == "flip":
    where = sorted(rng.integers(0, n, int(rng.integers(1, 9))).tolist())
    out = bytearray(data)
    for p in where:
      out[p] ^= int(rng.integers(1, 256))
    return f"bytes flipped at {where}", bytes(out)
  if kind == "insert":
    p, k = int(rng.integers(0, n + 1)), int(rng.integers(1, 17))
    return f"{k} random bytes inserted at {p}", data[:p] + rng.bytes(k) + data[p:]
  if kind == "delete":
    p, k = int(rng.integers(0, n)), int(rng.integers(1, 17))
    return f"bytes {p}..{p + k} deleted", data[:p] + data[p + k:]
  if kind == "splice":
    a, k, p = int(rng.integers(0, n)), int(rng.integers(1, 65)), int(rng.integers(0, n))
    return f"bytes {a}..{a + k} copied to {p}", data[:p] + data[a:a + k] + data[p:]
  if kind == "random":
    k = int(rng.integers(0, 4096))
    return f"{len(magic)} magic bytes and {k} random ones", magic + rng.bytes(k)
  value = pick(rng, HOSTILE_INTS)
  fmt = pick(rng, ("<I", ">I", "<Q", "<H", "<i") if align == 1 else ("<I", "<I", "<i"))
  value = value % (1 << 8 * struct.calcsize(fmt))
  if fmt == "<i":
    value -= (value >= 1 << 31) << 32
  p = start + int(rng.integers(0, max(1, (n - start - 8) // align))) * align
  packed = struct.pack(fmt, value)
  return f"{fmt} {value:#x} written at byte {p}", data[:p] + packed + data[p + len(packed):]


# ---- running a case ----

class Hung(BaseException):
  """A case ran past CASE_SECONDS (a BaseException: readers' `except Exception` cannot swallow it)."""


def _status(key: str) -> int | None:
  """A /proc/self/status entry in bytes (Linux), else None."""
  try:
    with open("/proc/self/status") as f:
      return next(int(line.split()[1]) * 1024 for line in f if line.startswith(f"{key}:"))
  except (OSError, StopIteration):
    return None


@contextlib.contextmanager
def peak_memory():
  """Yields a list that receives the memory the block added at its peak: resident memory where
  Linux lets the peak be reset (it counts C allocations too), else tracemalloc's peak."""
  added = []
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")  # resets VmHWM to the current resident size
  except OSError:
    tracemalloc.start()
    try:
      yield added
      added.append(tracemalloc.get_traced_memory()[1])
    finally:
      tracemalloc.stop()
    return
  base = _status("VmRSS")
  yield added
  added.append(_status("VmHWM") - base)


@contextlib.contextmanager
def bounded():
  """Raises Hung after CASE_SECONDS (SIGALRM) and MemoryError past HEADROOM more address space."""
  alarm = hasattr(signal, "setitimer")
  if alarm:
    def hung(*_):
      raise Hung(f"ran past {CASE_SECONDS} s")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
  limit = None
  if sys.platform == "linux" and (vm := _status("VmSize")) is not None:
    import resource  # pylint: disable=import-outside-toplevel
    limit = resource.getrlimit(resource.RLIMIT_AS)
    if limit[1] == resource.RLIM_INFINITY or vm + HEADROOM < limit[1]:
      resource.setrlimit(resource.RLIMIT_AS, (vm + HEADROOM, limit[1]))
  try:
    yield
  finally:
    if limit is not None:
      resource.setrlimit(resource.RLIMIT_AS, limit)
    if alarm:
      signal.setitimer(signal.ITIMER_REAL, 0)
      signal.signal(signal.SIGALRM, previous)


def _chain(e: BaseException):
  while e is not None:
    yield e
    e = e.__cause__ or e.__context__


def attempt(error, path, fn, *args, **kwargs):
  """fn's result, or None where it raised `error` naming `path`; anything else is a failure."""
  try:
    return fn(*args, **kwargs)
  except error as e:
    cause = next((c for c in _chain(e) if isinstance(c, (MemoryError, Hung))), None)
    if cause is not None:  # a huge allocation or a hang, reported as the named error
      raise AssertionError(f"{fn.__name__} raised {type(e).__name__} after {cause!r}") from e
    if str(path) not in str(e):
      raise AssertionError(f"{fn.__name__}'s {type(e).__name__} does not name {path}: {e}") from e
    return None
  except Exception as e:
    raise AssertionError(f"{fn.__name__} raised {type(e).__name__}: {e}") from e


def run_cases(fmt: str, seeds: dict, check) -> None:
  """Runs every case of `fmt` through check(path, data, case); fails listing the bad ones."""
  failures, slowest, largest = [], (-1.0, -1), (-1, -1)
  for index in range(CASES[fmt]):
    description, data, write = make_case(fmt, index, seeds)
    path = write(data)
    start = time.perf_counter()
    problem = None
    with peak_memory() as added:
      try:
        with bounded():
          check(path, data, description)
      except BaseException as e:  # pylint: disable=broad-except
        if isinstance(e, KeyboardInterrupt):
          raise
        problem = f"{type(e).__name__}: {str(e)[:300]}"
    seconds = time.perf_counter() - start
    if problem is None and added[0] > MEMORY + 4 * len(data):
      problem = f"took {added[0] / 2**20:.0f} MiB more memory for a file of {len(data):,} bytes"
    if problem is not None:
      failures.append(f"{fmt} case {index} ({description}; seed {SEED}): {problem}")
    slowest, largest = max(slowest, (seconds, index)), max(largest, (added[0], index))
  print(f"{fmt}: {CASES[fmt]} cases, slowest {slowest[0]:.2f} s (case {slowest[1]}), "
        f"most memory {largest[0] / 2**20:.1f} MiB (case {largest[1]})")
  assert not failures, "\n".join(failures)


def make_case(fmt: str, index: int, seeds: dict):
  """(description, bytes, write(bytes) -> path) of case `index` of `fmt`: a targeted case, or a
  random mutation of a seed, drawn from a generator seeded with (SEED, fmt, index)."""
  rng = np.random.default_rng([SEED, list(CASES).index(fmt), index])
  targeted = seeds["targeted"]
  if index < len(targeted):
    name, data, write = targeted[index]
    return f"targeted: {name}", data, write
  if "structured" in seeds and rng.integers(2):  # a seed's pickle or JSON, mutated in its structure
    name, mutation, assemble = seeds["structured"][int(rng.integers(len(seeds["structured"])))]
    description, data = mutation(rng)
    return f"{name}, {description}", assemble(data), seeds["mutable"][0][2]
  name, data, write, options = seeds["mutable"][int(rng.integers(len(seeds["mutable"])))]
  description, data = mutate(rng, data, **options)
  return f"{name}, {description}", data, write


def writer(path):
  def write(data):
    path.write_bytes(data)
    return path
  return write


# ---- .caffemodel ----

def tiny_net(kind):
  """A Caffe model of `kind` at 1/64 of VGG16's width (fc 4, 3 classes): a few KB."""
  rng = np.random.default_rng(SEED)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(test_caffe, "WIDTH", 1 / 64)
    mp.setattr(test_caffe, "FC", 4)
    if kind == "fcn8s":
      return test_caffe.fcn8s_layers(rng, n=3)
    return test_caffe.deconvnet_layers(rng, bn=fork_bn, n=3)


def caffe_file(*layers: bytes) -> bytes:
  return text(1, "net") + b"".join(record(100, layer) for layer in layers)


def caffe_layer(name, type="Convolution", blobs=(), raw_blobs=(), extra=b""):
  """A V2 LayerParameter; blobs as arrays (packed shape + data) or raw BlobProto bytes."""
  return (text(1, name) + text(2, type) + text(4, name)
          + b"".join(record(7, test_caffe.blob_proto(b)) for b in blobs)
          + b"".join(record(7, b) for b in raw_blobs) + extra)


def blob_bytes(dims, values=()):
  return (record(7, record(1, b"".join(varint(d) for d in dims)))
          + record(5, np.asarray(values, "<f4").tobytes()))


def caffe_targeted():
  ok = caffe_layer("conv1_1", blobs=[np.ones((1, 3, 3, 3), np.float32), np.zeros(1, np.float32)])
  conv5 = caffe_layer("conv5_3", blobs=[np.ones((1, 1, 1, 1), np.float32)])
  fc6 = caffe_layer("fc6", blobs=[np.ones((1, 1, 1, 1), np.float32)])
  alternating = (tag(9, 5) + b"\0\0\x80?" + tag(10, 5) + b"\0\0\x80?") * 100000
  return {
      "a layer whose length claims 10 GB": caffe_file(ok) + tag(100, 2) + varint(10**10) + b"abc",
      "a layer whose length claims 2^63": tag(100, 2) + varint(1 << 63) + ok,
      "a layer whose length claims 2^64 - 1": tag(100, 2) + varint((1 << 64) - 1) + ok,
      "an 11-byte varint": tag(100, 2) + b"\xff" * 10 + b"\x01" + ok,
      "blob data claiming 10 GB": caffe_file(caffe_layer(
          "conv1_1", raw_blobs=[record(7, record(1, varint(4))) + tag(5, 2) + varint(10**10)])),
      "blob shape (2^40, 2^40) over 4 values": caffe_file(caffe_layer(
          "conv1_1", raw_blobs=[blob_bytes((1 << 40, 1 << 40), range(4))])),
      "blob of 65 axes": caffe_file(caffe_layer("conv1_1", raw_blobs=[blob_bytes((1,) * 65, [1])])),
      "blob of 100000 axes of 1": caffe_file(caffe_layer(
          "conv1_1", raw_blobs=[blob_bytes((1,) * 100000, [1])])),
      "empty blob of shape (2^50, 0)": caffe_file(caffe_layer(
          "conv1_1", raw_blobs=[blob_bytes((1 << 50, 0))]), conv5, fc6),
      "empty conv1_1 of 2^20 channels (a wide network from nothing)": caffe_file(caffe_layer(
          "conv1_1", raw_blobs=[blob_bytes((1 << 20, 0, 3, 3))]), conv5, fc6),
      "0-d conv1_1 weights": caffe_file(caffe_layer(
          "conv1_1", raw_blobs=[record(7, b"") + record(5, b"\0\0\x80?")]), conv5, fc6),
      "1-d fc6 weights": caffe_file(ok, conv5, caffe_layer("fc6", blobs=[np.ones(5, np.float32)])),
      "legacy 4-d InnerProduct fc6 of shape (2, 3, 4, 5)": caffe_file(ok, conv5, caffe_layer(
          "fc6", "InnerProduct", blobs=[np.ones((2, 3, 4, 5), np.float32)])),
      "conv1_1 of 4096 channels (a 64x wide network from 440 KB)": caffe_file(caffe_layer(
          "conv1_1", blobs=[np.ones((4096, 3, 3, 3), np.float32)]), conv5, fc6),
      "200000 alternating fixed32 fields (quadratic: a minute)": caffe_file(ok + alternating),
      "wire type 3": caffe_file(ok) + tag(5, 3) + b"\0" * 8,
      "wire type 7 in a layer": caffe_file(ok + tag(3, 7)),
      "field 0": caffe_file(ok) + b"\x00\x01",
      "a BN layer with bn_mode 2^63 and a packed eps": caffe_file(ok, caffe_layer(
          "bn", "BN", extra=record(45, number(3, 1 << 63)) + record(139, record(3, b"\0" * 4)))),
      "a V1 layer holding a V0 layer holding a V0 layer": text(1, "n") + record(2, record(
          1, text(1, "conv1_1") + text(2, "conv") + record(1, text(1, "x")))),
      "a layer name of invalid UTF-8": caffe_file(caffe_layer("conv1_1") + tag(1, 2) + b"\x02\xff\xfe"),
      "only a net name": text(1, "net"),
      "empty": b"",
  }


@pytest.fixture(scope="module")
def caffe_seeds(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("caffe")
  path = tmp / "case.caffemodel"
  fcn8s = write_net(tmp / "fcn8s.caffemodel", tiny_net("fcn8s")).read_bytes()
  deconvnet = write_net(tmp / "deconvnet.caffemodel", tiny_net("deconvnet"), version="V1", packed=False,
                        legacy=True).read_bytes()
  rng = np.random.default_rng(SEED)
  layers = [dict(name="conv1_1", type="Convolution", version="V0", blobs=[np.ones((2, 3, 3, 3), np.float32)]),
            *bvlc_bn(rng, "conv1_1", 2), *conv_layer(rng, "conv5_3", 2, 2, 3, "conv1_1"),
            dict(name="fc6", type="InnerProduct", double=True, blobs=[np.ones((4, 8), np.float32)],
                 bottom=("conv5_3",), top=("fc6",)),
            dict(name="seg-score-voc", type="Convolution", blobs=[np.ones((3, 4, 1, 1), np.float32)])]
  mixed = write_net(tmp / "mixed.caffemodel", layers, packed=False).read_bytes()
  write = writer(path)
  return {"targeted": [(name, data, write) for name, data in caffe_targeted().items()],
          "mutable": [("fcn8s V2 packed", fcn8s, write, {}),
                      ("DeconvNet V1 unpacked legacy", deconvnet, write, {}),
                      ("V0 + BatchNorm + double", mixed, write, {})],
          "fcn8s": fcn8s}


def check_caffe(path, data, description):
  net = attempt(CaffeError, path, read_caffemodel, path)
  if net is None:
    return
  assert net and all(isinstance(k, str) for k in net)
  for layer in net.values():
    assert all(b.dtype == np.float32 and b.ndim <= 32 for b in layer.blobs)
  for kind in ("vgg16", "fcn8s", "deconvnet"):
    config = attempt(CaffeError, path, infer_config, net, kind, path)
    assert config is None or (config.width > 0 and config.fc_dim >= 1 and config.fc_kernel >= 1)
  # Imports (~0.1 s each): of the FCN-8s seed's mutations, and of the wide networks (as the encoder
  # of a network that must be built only once the file's shapes fit).
  kinds = (("fcn8s",) if description.startswith("fcn8s")
           else ("vgg16", "fcn8s") if "wide" in description else ())
  for kind in kinds:
    loaded = attempt(CaffeError, path, load_caffe, path, kind)
    if loaded is not None:
      leaves = [v for group in loaded[1].values() for v in _leaves(group)]
      assert leaves and all(v.dtype == np.float32 for v in leaves)


def _leaves(tree):
  if isinstance(tree, dict):
    for v in tree.values():
      yield from _leaves(v)
  else:
    yield np.asarray(tree)


def test_hostile_caffemodels(caffe_seeds, tmp_path):
  load_caffe(writer(tmp_path / "warm.caffemodel")(caffe_seeds["fcn8s"]), "fcn8s")  # JAX's first trace
  run_cases("caffemodel", caffe_seeds, check_caffe)


# ---- .pth ----

def pk(v) -> bytes:
  """Pickle opcodes that push `v` (None, bool, int, str, tuple; bytes are opcodes as they are)."""
  if isinstance(v, bytes):
    return v
  if v is None:
    return b"N"
  if isinstance(v, bool):
    return b"\x88" if v else b"\x89"
  if isinstance(v, int):  # LONG1
    n = (v.bit_length() + 8) // 8 if v else 0
    return b"\x8a" + bytes([n]) + v.to_bytes(n, "little", signed=True)
  if isinstance(v, str):
    return b"X" + struct.pack("<I", len(v.encode())) + v.encode()
  return b"(" + b"".join(pk(x) for x in v) + b"t"


def glob(module, name) -> bytes:
  return f"c{module}\n{name}\n".encode()


def tensor_pickle(offset=0, size=(2,), stride=(1,), pid=None, storage="FloatStorage", key="0", numel=24):
  """A state dict {"w": tensor} as torch pickles it, whose fields may be anything."""
  if pid is None:
    pid = ("storage", glob("torch", storage), key, "cpu", numel)
  tensor = (glob("torch._utils", "_rebuild_tensor_v2") + b"(" + pk(pid) + b"Q" + pk(offset) + pk(size)
            + pk(stride) + b"\x89}tR")
  return b"\x80\x02}" + pk("w") + tensor + b"s."


HOSTILE_PICKLES = {
    "BINBYTES8 of 8 GB": b"\x80\x04\x8e" + struct.pack("<Q", 1 << 33) + b"x.",
    "BINUNICODE8 of 2^40": b"\x80\x04\x8d" + struct.pack("<Q", 1 << 40) + b"x.",
    "BYTEARRAY8 of 2^40": b"\x80\x05\x96" + struct.pack("<Q", 1 << 40) + b".",
    "BINSTRING of 2 GB": b"\x80\x02T" + struct.pack("<i", 0x7FFFFFFF) + b".",
    "BINUNICODE of 4 GB": b"\x80\x02X" + struct.pack("<I", 0xFFFFFFFF) + b".",
    "LONG4 of 2 GB": b"\x80\x02\x8b" + struct.pack("<i", 0x7FFFFFFF) + b".",
    "LONG_BINPUT 2^32 - 1": b"\x80\x02}r" + struct.pack("<I", 0xFFFFFFFF) + b".",
    "FRAME of 2^62": b"\x80\x04\x95" + struct.pack("<Q", 1 << 62) + b"}.",
    "a million MARKs": b"\x80\x02" + b"(" * 1_000_000 + b"}.",
    "lists nested 100000 deep": b"\x80\x02" + b"]" * 100_000 + b"a" * 99_999 + b".",
    "dicts nested 100000 deep": b"\x80\x02}" + (pk("k") + b"}") * 100_000 + b"s" * 100_000 + b".",
    "builtins.eval by STACK_GLOBAL": b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93" + pk(("1",)) + b"R.",
    "unknown opcode 0xff": b"\x80\x02\xff.",
    "EXT4 of an unregistered code": b"\x80\x02\x84" + struct.pack("<i", 12345) + b".",
    "OrderedDict(5)": b"\x80\x02" + glob("collections", "OrderedDict") + pk((5,)) + b"R.",
    "INT of 5000 digits": b"I" + b"9" * 5000 + b"\n.",
    "None": b"\x80\x02N.",
    "nothing": b"",
    "a state dict with an int key": b"\x80\x02}" + pk(3) + pk("x") + b"s.",
    "tensor at offset -1": tensor_pickle(offset=-1),
    "tensor at offset 2^70": tensor_pickle(offset=1 << 70),
    "tensor of size 2^62": tensor_pickle(size=(1 << 62,)),
    "tensor of 10^6 x 10^6 with stride 0 (a 4 TB copy)": tensor_pickle(size=(10**6, 10**6), stride=(0, 0)),
    "tensor of size ('a',)": tensor_pickle(size=("a",)),
    "tensor of size 5": tensor_pickle(size=5),
    "tensor with more strides than sizes": tensor_pickle(stride=(1, 1)),
    "tensor of stride -1": tensor_pickle(size=(3,), stride=(-1,)),
    "tensor of 65 axes": tensor_pickle(size=(1,) * 65, stride=(1,) * 65),
    "tensor of a missing storage": tensor_pickle(key="missing"),
    "tensor of a BFloat16Storage": tensor_pickle(storage="BFloat16Storage"),
    "tensor of a torch.nn.Module storage": tensor_pickle(storage="nn.Module"),
    "tensor whose persistent id is 5": tensor_pickle(pid=5),
    "tensor whose persistent id is ('storage',)": tensor_pickle(pid=("storage",)),
    "tensor of a storage claiming 2^62 values": tensor_pickle(numel=1 << 62),
    "tensor without arguments": (b"\x80\x02}" + pk("w") + glob("torch._utils", "_rebuild_tensor_v2")
                                 + b")Rs."),
}


def rezip(data: bytes, replace=(), drop=(), deflate=()) -> bytes:
  """The zip `data` with some entries replaced, dropped or deflated (the others stored)."""
  replace, out = dict(replace), io.BytesIO()
  with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
    for info in src.infolist():
      if info.filename not in drop:
        dst.writestr(info.filename, replace.get(info.filename, src.read(info.filename)),
                     zipfile.ZIP_DEFLATED if info.filename in deflate else zipfile.ZIP_STORED)
  return out.getvalue()


def patch_zip(data: bytes, name: str, **fields) -> bytes:
  """`data` with `name`'s local and central headers changed: sizes, method, flags (as numbers)."""
  local = {"flags": (6, "<H"), "method": (8, "<H"), "compress_size": (18, "<I"), "file_size": (22, "<I")}
  central = {"flags": (8, "<H"), "method": (10, "<H"), "compress_size": (20, "<I"), "file_size": (24, "<I")}
  out = bytearray(data)
  info = zipfile.ZipFile(io.BytesIO(data)).getinfo(name)
  at = data.rfind(b"PK\x01\x02" + data[info.header_offset + 4:info.header_offset + 6])
  while not data[at + 46:at + 46 + len(name)] == name.encode():
    at = data.rfind(b"PK\x01\x02", 0, at)
  for key, value in fields.items():
    for base, table in ((info.header_offset, local), (at, central)):
      offset, fmt = table[key]
      struct.pack_into(fmt, out, base + offset, value)
  return bytes(out)


def patch_eocd(data: bytes, **fields) -> bytes:
  """`data` with its end-of-central-directory record changed: entries, size, offset."""
  table = {"entries": (10, "<H"), "size": (12, "<I"), "offset": (16, "<I")}
  out, at = bytearray(data), data.rfind(b"PK\x05\x06")
  for key, value in fields.items():
    struct.pack_into(table[key][1], out, at + table[key][0], value)
  return bytes(out)


def legacy_parts(data: bytes) -> tuple[list[bytes], bytes]:
  """The five pickles of a legacy .pth (magic, protocol, system info, state, storage keys) and the rest."""
  f, parts = io.BytesIO(data), []
  for _ in range(5):
    start = f.tell()
    for _ in pickletools.genops(f):
      pass
    parts.append(data[start:f.tell()])
  return parts, data[f.tell():]


def pickle_mutation(rng, data: bytes) -> tuple[str, bytes]:
  """One opcode of the pickle `data` replaced, given a hostile argument, deleted or repeated."""
  ops = list(pickletools.genops(data))
  k = int(rng.integers(len(ops)))
  op, arg, pos = ops[k]
  end = ops[k + 1][2] if k + 1 < len(ops) else len(data)
  kind = pick(rng, ("opcode", "argument", "delete", "repeat"))
  if kind == "opcode" or (kind == "argument" and op.arg is None):
    code = pick(rng, pickletools.opcodes).code.encode("latin-1")
    return f"pickle opcode {op.name} at {pos} replaced by {code!r}", data[:pos] + code + data[pos + 1:]
  if kind == "argument":
    value = pick(rng, HOSTILE_INTS)
    width = end - pos - 1
    if op.name in ("BINUNICODE", "SHORT_BINUNICODE", "SHORT_BINBYTES", "BINBYTES", "SHORT_BINSTRING",
                   "BINSTRING", "BINBYTES8", "BINUNICODE8"):
      width = {"SHORT": 1, "8": 8}.get("SHORT" if op.name.startswith("SHORT") else op.name[-1], 4)
    packed = (value % (1 << 8 * min(width, 8))).to_bytes(min(width, 8), "little")
    return (f"pickle {op.name} at {pos}: argument {value:#x}",
            data[:pos + 1] + packed + data[pos + 1 + len(packed):])
  if kind == "delete":
    return f"pickle {op.name} at {pos} deleted", data[:pos] + data[end:]
  return f"pickle {op.name} at {pos} repeated", data[:end] + data[pos:end] + data[end:]


@pytest.fixture(scope="module")
def pth_seeds(tmp_path_factory):
  torch = pytest.importorskip("torch")
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  state = {"weight": base, "view": base[1:, ::2], "t": base.t(), "b": torch.ones(3, dtype=torch.float64),
           "i": torch.arange(4).reshape(2, 2), "h": torch.ones(2, dtype=torch.float16),
           "e": torch.zeros(0, 3), "s": torch.tensor(7.0), "flag": torch.tensor([True, False])}
  files = {}
  for name, zip_format in (("zip", True), ("legacy", False)):
    out = io.BytesIO()
    torch.save(state, out, _use_new_zipfile_serialization=zip_format)
    files[name] = out.getvalue()
  path = tmp_path_factory.mktemp("pth") / "case.pth"
  zip_seed, write = files["zip"], writer(path)
  pkl = next(n for n in zipfile.ZipFile(io.BytesIO(zip_seed)).namelist() if n.endswith("data.pkl"))
  storage = pkl.replace("data.pkl", "data/0")
  parts, storages = legacy_parts(files["legacy"])
  code = b"\x80\x02" + glob("os", "mkdir") + pk((str(path.parent / "pwned"),)) + b"R."  # see check_pth
  targeted = {f"data.pkl: {name}": rezip(zip_seed, {pkl: p}) for name, p in HOSTILE_PICKLES.items()}
  targeted |= {
      "data.pkl declaring 4 GB": patch_zip(zip_seed, pkl, compress_size=0xFFFFFFF0, file_size=0xFFFFFFF0),
      "a storage declaring 2 GB": patch_zip(zip_seed, storage, compress_size=0x7FFFFFFF,
                                            file_size=0x7FFFFFFF),
      "data.pkl deflated (but stored)": patch_zip(zip_seed, pkl, method=8),
      "data.pkl bzip2 (but stored)": patch_zip(zip_seed, pkl, method=12),
      "data.pkl lzma (but stored)": patch_zip(zip_seed, pkl, method=14),
      "data.pkl of compression method 99": patch_zip(zip_seed, pkl, method=99),
      "data.pkl encrypted": patch_zip(zip_seed, pkl, flags=1),
      "a storage deflated from 50 MB of zeros": rezip(zip_seed, {storage: bytes(50 << 20)},
                                                      deflate=(storage,)),
      "a storage deflated from 50 MB, declaring 96 bytes": patch_zip(
          rezip(zip_seed, {storage: bytes(50 << 20)}, deflate=(storage,)), storage, file_size=96),
      "65535 zip entries": patch_eocd(zip_seed, entries=0xFFFF),
      "a central directory of 4 GB": patch_eocd(zip_seed, size=0xFFFFFFFF),
      "a central directory at 4 GB": patch_eocd(zip_seed, offset=0xFFFFFFFF),
      "a storage missing": rezip(zip_seed, drop=(storage,)),
      "a storage of 4 bytes": rezip(zip_seed, {storage: b"\0" * 4}),
      "data.pkl: os.mkdir": rezip(zip_seed, {pkl: code}),
      "legacy magic: os.mkdir": b"".join([code, *parts[1:], storages]),
      "legacy system info: os.mkdir": b"".join([*parts[:2], code, *parts[3:], storages]),
      "legacy system info: BINBYTES8 of 8 GB": b"".join([*parts[:2], HOSTILE_PICKLES["BINBYTES8 of 8 GB"],
                                                         *parts[3:], storages]),
      "legacy state: LONG_BINPUT 2^32 - 1": b"".join([*parts[:3], HOSTILE_PICKLES["LONG_BINPUT 2^32 - 1"],
                                                      parts[4], storages]),
      "legacy keys: a list nested 100000 deep": b"".join(
          [*parts[:4], HOSTILE_PICKLES["lists nested 100000 deep"], storages]),
      "legacy keys: 5": b"".join([*parts[:4], b"\x80\x02K\x05.", storages]),
      "legacy storage of 2^62 values": b"".join(parts) + struct.pack("<q", 1 << 62) + storages[8:],
      "legacy storage of -1 values": b"".join(parts) + struct.pack("<q", -1) + storages[8:],
      "legacy storage of 2^40 values": b"".join(parts) + struct.pack("<q", 1 << 40) + storages[8:],
  }
  zip_pkl = zipfile.ZipFile(io.BytesIO(zip_seed)).read(pkl)
  return {"targeted": [(name, data, write) for name, data in targeted.items()],
          "mutable": [("zip", zip_seed, write, dict(magic=b"PK\x03\x04")),
                      ("legacy", files["legacy"], write, dict(magic=parts[0]))],
          "structured": [("zip", lambda rng: pickle_mutation(rng, zip_pkl),
                          lambda p: rezip(zip_seed, {pkl: p})),
                         ("legacy state", lambda rng: pickle_mutation(rng, parts[3]),
                          lambda p: b"".join([*parts[:3], p, parts[4], storages]))]}


def check_pth(path, data, description):
  state = attempt(ValueError, path, read_state_dict, path)
  if (path.parent / "pwned").exists():
    (path.parent / "pwned").rmdir()
    raise AssertionError("the pickle ran os.mkdir")
  if state is not None:
    assert all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in state.items())


def test_hostile_pth(pth_seeds):
  run_cases("pth", pth_seeds, check_pth)


# ---- SBD .mat ----

def mat_element(mdtype: int, payload: bytes) -> bytes:
  return struct.pack("<II", mdtype, len(payload)) + payload + b"\0" * (-len(payload) % 8)


def mat_matrix(kind: int, dims, body: bytes, name: bytes = b"") -> bytes:
  """A MATLAB v5 miMATRIX: class `kind` (1 cell, 2 struct, 6 double, 9 uint8, ...), dims, name, body."""
  return mat_element(14, mat_element(6, struct.pack("<II", kind, 0))
                     + mat_element(5, struct.pack(f"<{len(dims)}i", *dims)) + mat_element(1, name) + body)


def mat_file(*variables: bytes, compress=True) -> bytes:
  header = b"MATLAB 5.0 MAT-file, written by test_fuzz".ljust(116, b" ") + b"\0" * 8 + b"\x00\x01IM"
  return header + b"".join(struct.pack("<II", 15, len(z := zlib.compress(v))) + z if compress else v
                           for v in variables)


def savemat_bytes(variables: dict, **options) -> bytes:
  out = io.BytesIO()
  scipy.io.savemat(out, variables, **options)
  return out.getvalue()


def mat_targeted():
  """(cls or inst, description, bytes): .mat files of hostile structure or of the wrong content."""
  label, instances, categories = draw(*SBD_TRAIN["sbd_a"])
  cls = lambda **f: ("cls", savemat_bytes({"GTcls": f}))  # noqa: E731
  inst = lambda **f: ("inst", savemat_bytes({"GTinst": {"Segmentation": instances, **f}}))  # noqa: E731
  deep = mat_matrix(6, (1, 1), mat_element(9, struct.pack("<d", 1.0)))
  for _ in range(20000):
    deep = mat_matrix(1, (1, 1), deep)
  field = mat_element(5, struct.pack("<i", 32)) + mat_element(1, b"Segmentation".ljust(32, b"\0"))
  return {
      "a cell nested 20000 deep (scipy overflows the C stack)": ("cls", mat_file(mat_matrix(
          2, (1, 1), field + deep, b"GTcls"))),
      "a compressed variable inflating to 80 MB": ("cls", mat_file(mat_matrix(
          9, (80 << 20, 1), mat_element(2, bytes(80 << 20)), b"GTcls"))),
      "a struct of 2^30 x 2 elements": ("cls", mat_file(mat_matrix(2, (1 << 30, 2), field, b"GTcls"))),
      "a cell of 100000 x 100000 elements": ("cls", mat_file(mat_matrix(1, (100000, 100000), b"", b"GTcls"))),
      "a cell of a million empty arrays": ("cls", mat_file(mat_matrix(
          1, (1000000, 1), mat_element(14, b"") * 1000000, b"GTcls"))),
      "an array of 7 million small elements (80 KB compressed)": ("cls", mat_file(mat_matrix(
          6, (1, 1), mat_element(9, struct.pack("<d", 1.0)) + struct.pack("<HHI", 2, 1, 0) * 7000000,
          b"GTcls"))),
      "a field of 4 GB": ("inst", mat_file(mat_matrix(2, (1, 1), field + mat_element(14, b"")[:4]
                                                       + struct.pack("<I", 0xFFFFFFF0), b"GTinst"))),
      "an element claiming 4 GB (uncompressed)": ("cls", mat_file(mat_matrix(
          9, (4, 4), struct.pack("<II", 2, 0xFFFFFFF0) + bytes(16), b"GTcls"), compress=False)),
      "field names of length 0": ("cls", mat_file(mat_matrix(
          2, (1, 1), mat_element(5, struct.pack("<i", 0)) + mat_element(1, b"Segmentation"), b"GTcls"))),
      "negative dimensions": ("cls", mat_file(mat_matrix(2, (-1, 5), field, b"GTcls"))),
      "an opaque object": ("cls", mat_file(mat_element(14, mat_element(6, struct.pack("<II", 17, 0))
                                                        + mat_element(1, b"GTcls") + mat_element(1, b"x")))),
      "version 4": ("cls", savemat_bytes({"GTcls": label.astype(float)}, format="4")),
      "version 7.3": ("cls", b"MATLAB 7.3 MAT-file".ljust(116, b" ") + b"\0" * 8 + b"\x00\x02IM\x89HDF"),
      "only the header": ("inst", mat_file()),
      "127 bytes": ("inst", mat_file()[:127]),
      "empty": ("cls", b""),
      "Segmentation with NaN": cls(Segmentation=np.where(label > 0, np.nan, 0.0)),
      "Segmentation of 1e300": cls(Segmentation=np.full(label.shape, 1e300)),
      "Segmentation of -1": cls(Segmentation=-np.ones(label.shape, np.int16)),
      "Segmentation of 2^40": cls(Segmentation=np.full(label.shape, 1 << 40, np.int64)),
      "Segmentation complex": cls(Segmentation=label + 1j),
      "Segmentation 3-D": cls(Segmentation=np.stack([label] * 3, -1)),
      "Segmentation 1-D": cls(Segmentation=label.ravel()),
      "Segmentation empty": cls(Segmentation=np.zeros((0, 0), np.uint8)),
      "Segmentation a string": cls(Segmentation="Segmentation"),
      "Segmentation a cell": cls(Segmentation=np.array([[label]], dtype=object)),
      "Segmentation a struct": cls(Segmentation={"a": label}),
      "Segmentation sparse": cls(Segmentation=scipy.sparse.csc_matrix(label)),
      "Segmentation boolean": cls(Segmentation=label > 0),
      "GTcls without Segmentation": cls(Boundaries=label),
      "GTcls a 2x1 struct array": ("cls", savemat_bytes({"GTcls": np.array(
          [[(label,)], [(label,)]], dtype=[("Segmentation", object)])})),
      "GTcls a cell": ("cls", savemat_bytes({"GTcls": np.array([[label]], dtype=object)})),
      "GTcls a number": ("cls", savemat_bytes({"GTcls": 5})),
      "no GTcls": ("cls", savemat_bytes({"other": label})),
      "Categories a string": inst(Categories="dog"),
      "Categories a cell": inst(Categories=np.array([[12, 15]], dtype=object)),
      "Categories 2-D": inst(Categories=np.array([[12, 15], [12, 15]], np.uint8)),
      "Categories of 1.5": inst(Categories=np.array([12, 1.5])),
      "Categories of NaN": inst(Categories=np.array([12, np.nan])),
      "Categories empty": inst(Categories=np.zeros(0, np.uint8)),
      "Categories a struct": inst(Categories={"a": 1}),
      "Segmentation of the instances 255": inst(Segmentation=np.full(instances.shape, 255, np.uint8),
                                                Categories=categories),
  }


@pytest.fixture(scope="module")
def mat_seeds(tmp_path_factory):
  dataset = tmp_path_factory.mktemp("sbd") / "dataset"
  write_sbd_image(dataset, "sbd_a", *SBD_TRAIN["sbd_a"])
  valid = {which: (dataset / which / "sbd_a.mat").read_bytes() for which in ("cls", "inst")}

  def write_to(which):
    def write(data):
      for other, original in valid.items():
        (dataset / other / "sbd_a.mat").write_bytes(data if other == which else original)
      return dataset / which / "sbd_a.mat"
    return write

  mutable = []
  for which, data in valid.items():
    loaded = scipy.io.loadmat(io.BytesIO(data))
    plain = savemat_bytes({k: v for k, v in loaded.items() if not k.startswith("__")}, do_compression=False)
    mutable += [(f"{which} compressed", data, write_to(which), dict(magic=data[:128], start=128)),
                (f"{which}", plain, write_to(which), dict(magic=data[:128], align=4, start=128))]
  return {"targeted": [(name, data, write_to(which)) for name, (which, data) in mat_targeted().items()],
          "mutable": mutable, "dataset": dataset}


def check_example(ex, height, width, num_classes=21):
  """An Example (or Instances) of well-formed arrays for an image of height x width."""
  if hasattr(ex, "image"):
    assert ex.image.shape == (height, width, 3) and ex.image.dtype == np.uint8
    assert ex.label.shape == ex.instances.shape == (height, width)
    assert ex.label.dtype == ex.instances.dtype == np.uint8
    assert np.all((ex.label < num_classes) | (ex.label == 255))
  n = len(ex.ids)
  assert ex.boxes.shape == (n, 4) and ex.classes.shape == (n,) and ex.boxes.dtype == np.int32
  assert np.all((ex.classes >= 1) & (ex.classes < num_classes))
  if n:
    y0, x0, y1, x1 = ex.boxes.T
    assert np.all((0 <= y0) & (y0 < y1) & (y1 <= height) & (0 <= x0) & (x0 < x1) & (x1 <= width))


def check_mat(path, data, description):
  dataset = path.parent.parent
  height, width, _ = SBD_TRAIN["sbd_a"]
  for read in (read_sbd_example, read_sbd_instances):
    ex = attempt(DataError, path, read, dataset, "sbd_a")
    if ex is not None:
      check_example(ex, height, width)


def test_hostile_mat_files(mat_seeds):
  run_cases("mat", mat_seeds, check_mat)


# ---- COCO JSON ----

def rle_string(runs) -> str:
  """COCO's compressed RLE string of `runs` (pycocotools' rleToString, without its 32-bit limit)."""
  out = []
  for i, x in enumerate(runs):
    x -= runs[i - 2] if i > 2 else 0
    more = True
    while more:
      c, x = x & 0x1F, x >> 5
      more = x != -1 if c & 0x10 else x != 0
      out.append(chr((c | 0x20 if more else c) + 48))
  return "".join(out)


def nested(depth: int):
  return json.loads("[" * depth + "]" * depth)


HOSTILE_JSON = (None, True, 0, -1, 1.5, 1 << 31, 1 << 64, 10**30, -(10**30), 1e300, float("nan"),
                float("inf"), "", "x", "\0", "../../../etc/passwd", [], {}, [[]], [None],
                {"size": [1, 1], "counts": "0"}, [0] * 7, [1e308] * 6, nested(50))


def json_paths(value, path=()):
  yield path
  items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
  for key, item in items:
    yield from json_paths(item, (*path, key))


def json_mutation(rng, data: dict) -> tuple[str, bytes]:
  """One value somewhere in `data` replaced by a hostile one, deleted or repeated."""
  data = json.loads(json.dumps(data))
  paths = list(json_paths(data))[1:]
  path = paths[int(rng.integers(len(paths)))]
  parent = data
  for key in path[:-1]:
    parent = parent[key]
  kind = pick(rng, ("value", "value", "value", "delete", "repeat"))
  where = "/".join(map(str, path))
  if kind == "value":
    value = pick(rng, HOSTILE_JSON)
    parent[path[-1]] = value
    description = f"{where} = {str(value)[:40]}"
  elif kind == "delete":
    del parent[path[-1]]
    description = f"{where} deleted"
  elif isinstance(parent, list):
    parent.append(parent[path[-1]])
    description = f"{where} repeated"
  else:
    parent[path[-1]] = [parent[path[-1]]] * 2
    description = f"{where} doubled into a list"
  return description, json.dumps(data).encode()


def coco_targeted(data: dict) -> dict:
  def changed(change):
    d = json.loads(json.dumps(data))
    change(d)
    return json.dumps(d).encode()

  def image(**fields):
    return changed(lambda d: d["images"][0].update(fields))

  def annotation(**fields):  # image 1's person polygon
    return changed(lambda d: d["annotations"][0].update(fields))

  def huge_rle(counts, size=100000):
    def change(d):
      d["images"][0].update(height=size, width=size)
      d["annotations"][0]["segmentation"] = {"size": [size, size], "counts": counts}
    return changed(change)

  text = json.dumps(data)
  return {
      "images nested 100000 deep": text.replace('"images": [', '"images": ' + "[" * 100000 + "]" * 99999
                                                + ", [", 1).encode(),
      "an annotation nested 900 deep": changed(lambda d: d["annotations"].append(nested(900))),
      "a polygon nested 900 deep": annotation(segmentation=[nested(900)]),
      "an id of 5000 digits": text.replace('"id": 1,', '"id": ' + "9" * 5000 + ",", 1).encode(),
      "NaN height": image(height=float("nan")),
      "an image of 10^30 x 10^30": image(height=10**30, width=10**30),
      "an image of 2^40 x 2^40 with polygons": changed(lambda d: (
          d["images"][0].update(height=1 << 40, width=1 << 40),
          d["annotations"][0].update(segmentation=[[0, 0, 1 << 40, 0, 1 << 40, 1 << 40]]))),
      "RLE counts of 10^10 pixels (a list)": huge_rle([0, 10**10]),
      "RLE counts of 10^10 pixels (a string)": huge_rle(rle_string([0, 10**10])),
      "RLE counts of 4 x 10^10 pixels on 2^31 x 2^31": huge_rle([0, 1 << 62], size=1 << 31),
      "RLE counts of 2^64 pixels": huge_rle([1 << 64, 0], size=1 << 32),
      "RLE counts of a million runs": annotation(segmentation={"size": [40, 60],
                                                                "counts": [0, 0] * 500_000 + [2400]}),
      "RLE counts string of 200000 characters": annotation(segmentation={
          "size": [40, 60], "counts": "0" * 200_000}),
      "RLE size [40.0, 60.0]": annotation(segmentation={"size": [40.0, 60.0], "counts": [2399, 1]}),
      "a polygon of coordinates 1e308": annotation(segmentation=[[1e308] * 6]),
      "a polygon of 100000 points": annotation(segmentation=[rect(5, 4, 35, 30) * 25000]),
      "iscrowd 1.0": annotation(iscrowd=1.0),
      "iscrowd 'yes'": annotation(iscrowd="yes"),
      "file_name with a NUL": image(file_name="000001\0.jpg"),
      "file_name of a 300-character folder": image(file_name="x" * 300 + "/000001.jpg"),
      "file_name of 5000 characters": image(file_name="x" * 5000),
      "file_name '../annotations/instances_val2017.json'": image(
          file_name="../annotations/instances_val2017.json"),
      "file_name '/etc/passwd'": image(file_name="/etc/passwd"),
      "file_name a folder": image(file_name="."),
      "categories of 300 names": changed(lambda d: d["categories"].extend(
          {"id": 1000 + i, "name": f"c{i}"} for i in range(300))),
      "a category name 5": changed(lambda d: d["categories"][0].update(name=5)),
      "UTF-16": text.encode("utf-16"),
      "invalid UTF-8": text.encode()[:40] + b"\xff\xfe" + text.encode()[40:],
      "a BOM": b"\xef\xbb\xbf" + text.encode(),
      "NaN and Infinity": text.replace('"height": 40', '"height": NaN').replace(
          '"width": 50', '"width": Infinity').encode(),
      "a list": b"[]",
      "empty": b"",
  }


@pytest.fixture(scope="module")
def coco_seeds(tmp_path_factory):
  root = write_coco(tmp_path_factory.mktemp("coco"), coco_dict())
  path = root / "annotations" / f"instances_{SPLIT}.json"
  data, write = json.loads(path.read_text()), writer(path)
  return {"targeted": [(name, text, write) for name, text in coco_targeted(data).items()],
          "mutable": [("instances JSON", path.read_bytes(), write, {})],
          "structured": [("instances JSON", lambda rng: json_mutation(rng, data), lambda text: text)]}


def check_coco(path, data, description):
  root = path.parent.parent
  for class_map, skip_bad in (("voc", False), ("coco", True)):
    # Errors name the annotation file or a missing image file, both under root.
    ds = attempt(DataError, root, CocoDataset, root, SPLIT, class_map=class_map, skip_bad=skip_bad)
    if ds is None:
      continue
    assert ds.summary() and len(ds.image_ids) == len(ds)
    for i in range(len(ds)):
      height, width = ds.size(i)
      check_example(ds.instances(i), height, width, ds.num_classes)
      example = attempt(DataError, root, ds.__getitem__, i)
      if example is not None:
        check_example(example, height, width, ds.num_classes)


def test_hostile_coco_json(coco_seeds):
  run_cases("coco", coco_seeds, check_coco)


# ---- images ----

def png_chunk(kind: bytes, payload: bytes) -> bytes:
  return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png(width, height, mode=(8, 2), idat=zlib.compress(bytes(100)), chunks=b"", crc=True) -> bytes:
  """A PNG whose header says width x height (bit depth, colour type `mode`), with `idat` as its data."""
  header = png_chunk(b"IHDR", struct.pack(">II", width, height) + bytes([*mode, 0, 0, 0]))
  if not crc:
    header = header[:-4] + b"\0\0\0\0"
  return b"\x89PNG\r\n\x1a\n" + header + chunks + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
  out = io.BytesIO()
  image.save(out, fmt, **options)
  return out.getvalue()


def jpeg_with_size(jpeg: bytes, width: int, height: int) -> bytes:
  """`jpeg` with its frame header (SOF0) claiming width x height."""
  at = jpeg.index(b"\xff\xc0") + 5
  return jpeg[:at] + struct.pack(">HH", height, width) + jpeg[at + 4:]


def tiff_with(tiff: bytes, tag_id: int, value: int) -> bytes:
  """A little-endian TIFF with the first IFD entry `tag_id` holding `value` (as a LONG)."""
  out = bytearray(tiff)
  ifd = struct.unpack_from("<I", tiff, 4)[0]
  for k in range(struct.unpack_from("<H", tiff, ifd)[0]):
    at = ifd + 2 + 12 * k
    if struct.unpack_from("<H", tiff, at)[0] == tag_id:
      struct.pack_into("<HHII", out, at, tag_id, 4, 1, value)
  return bytes(out)


def image_seeds(rng) -> dict:
  rgb = Image.fromarray(rng.integers(0, 256, (17, 23, 3), np.uint8))
  palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
  exif = Image.Exif()
  exif[0x0112] = 6  # Orientation: rotated
  return {
      ".png": encoded(rgb, "PNG"),
      "-palette.png": encoded(palette, "PNG", transparency=0),
      "-gray.png": encoded(rgb.convert("L"), "PNG"),
      "-rgba.png": encoded(rgb.convert("RGBA"), "PNG"),
      "-16bit.png": encoded(Image.fromarray(rng.integers(0, 65536, (9, 7), np.uint16)), "PNG"),
      "-gray-alpha.png": encoded(rgb.convert("LA"), "PNG"),
      ".jpg": encoded(rgb, "JPEG", quality=80, exif=exif),
      "-progressive.jpg": encoded(rgb, "JPEG", progressive=True),
      "-cmyk.jpg": encoded(rgb.convert("CMYK"), "JPEG"),
      ".gif": encoded(palette, "GIF"),
      ".bmp": encoded(rgb, "BMP"),
      ".tif": encoded(rgb, "TIFF", compression="tiff_lzw"),
      ".webp": encoded(rgb, "WEBP", quality=80),
  }


def images_targeted(seeds: dict) -> dict:
  jpeg, tiff, bmp, gif = seeds[".jpg"], seeds[".tif"], seeds[".bmp"], seeds[".gif"]
  return {
      "PNG of 100000 x 100000": (".png", png(100000, 100000)),
      "PNG of (2^31 - 1) x 1": (".png", png(0x7FFFFFFF, 1)),
      "PNG of 1 x (2^31 - 1)": (".png", png(1, 0x7FFFFFFF)),
      "PNG of 0 x 0": (".png", png(0, 0)),
      "PNG of 12000 x 12000 (below the bomb limit)": (".png", png(12000, 12000)),
      "PNG of 16-bit RGBA 10000 x 10000": (".png", png(10000, 10000, (16, 6))),
      "PNG header with a bad CRC": (".png", png(100000, 100000, crc=False)),
      "PNG of bit depth 3": (".png", png(4, 4, (3, 2))),
      "PNG of 10 x 10 whose data inflates to 100 MB": (".png", png(10, 10, idat=zlib.compress(
          bytes(100 << 20)))),
      "PNG with a chunk claiming 2 GB": (".png", png(4, 4, chunks=struct.pack(">I", 0x7FFFFFFF) + b"tEXt")),
      "PNG whose image data claims 2 GB": (".png", png(4, 4, (8, 0), zlib.compress(bytes(20))).replace(
          struct.pack(">I", len(zlib.compress(bytes(20)))) + b"IDAT", b"\x7f\xff\xff\xf0IDAT")),
      "PNG with a zTXt bomb": (".png", png(4, 4, chunks=png_chunk(b"zTXt", b"k\0\0" + zlib.compress(
          bytes(50 << 20))))),
      "PNG with 50000 text chunks": (".png", png(4, 4, chunks=png_chunk(b"tEXt", b"k\0v") * 50000)),
      "APNG of 2^31 frames": (".png", png(4, 4, chunks=png_chunk(b"acTL", struct.pack(
          ">II", 0x7FFFFFFF, 0)))),
      "JPEG of 65535 x 65535": (".jpg", jpeg_with_size(jpeg, 65535, 65535)),
      "JPEG of 12000 x 12000 (below the bomb limit)": (".jpg", jpeg_with_size(jpeg, 12000, 12000)),
      "JPEG of 0 x 0": (".jpg", jpeg_with_size(jpeg, 0, 0)),
      "JPEG with an APP1 segment claiming 65535 bytes": (".jpg", jpeg[:2] + b"\xff\xe1\xff\xff" + jpeg[2:]),
      "JPEG whose EXIF has 65535 entries": (".jpg", jpeg.replace(b"Exif\0\0II*\0\x08\0\0\0\x01\0",
                                                                 b"Exif\0\0II*\0\x08\0\0\0\xff\xff", 1)),
      "JPEG whose EXIF orientation is 99": (".jpg", jpeg.replace(b"\x12\x01\x03\0\x01\0\0\0\x06\0",
                                                                 b"\x12\x01\x03\0\x01\0\0\0\x63\0", 1)),
      "GIF of 65535 x 65535": (".gif", gif[:6] + b"\xff\xff\xff\xff" + gif[10:]),
      "BMP of (2^31 - 1) x 1": (".bmp", bmp[:18] + struct.pack("<ii", 0x7FFFFFFF, 1) + bmp[26:]),
      "BMP of 1 x -2^31": (".bmp", bmp[:18] + struct.pack("<ii", 1, -(1 << 31)) + bmp[26:]),
      "BMP of 20000 x 20000": (".bmp", bmp[:18] + struct.pack("<ii", 20000, 20000) + bmp[26:]),
      "BMP of 0 bits per pixel": (".bmp", bmp[:28] + b"\0\0" + bmp[30:]),
      "TIFF of (2^31 - 1) x (2^31 - 1)": (".tif", tiff_with(tiff_with(tiff, 256, 0x7FFFFFFF), 257,
                                                             0x7FFFFFFF)),
      "TIFF of 12000 x 12000": (".tif", tiff_with(tiff_with(tiff, 256, 12000), 257, 12000)),
      "TIFF with strips of 4 GB": (".tif", tiff_with(tiff, 279, 0xFFFFFFFF)),
      "TIFF with strips at 4 GB": (".tif", tiff_with(tiff, 273, 0xFFFFFFF0)),
      "TIFF with 65535 IFD entries": (".tif", tiff[:struct.unpack_from("<I", tiff, 4)[0]] + b"\xff\xff"
                                      + tiff[struct.unpack_from("<I", tiff, 4)[0] + 2:]),
      "TIFF whose first IFD is at 4 GB": (".tif", tiff[:4] + b"\xf0\xff\xff\xff" + tiff[8:]),
      "WebP canvas of 16384 x 16384": (".webp", b"RIFF\x1e\0\0\0WEBPVP8X\x0a\0\0\0\0\0\0\0"
                                       + b"\xff\x3f\0\xff\x3f\0" + b"\0" * 8),
      "empty": (".png", b""),
  }


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("images")
  seeds = image_seeds(np.random.default_rng(SEED))
  return {"targeted": [(name, data, writer(tmp / f"case{suffix}"))
                       for name, (suffix, data) in images_targeted(seeds).items()],
          "mutable": [(f"seed{suffix}", data, writer(tmp / f"case{suffix}"), dict(magic=data[:8]))
                      for suffix, data in seeds.items()]}


def check_image(path, data, description):
  rgb = attempt(ImageError, path, load_rgb, path)
  assert rgb is None or (rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.uint8)
  rgb = attempt(DataError, path, read_image, path)
  assert rgb is None or (rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.uint8)
  size = attempt(DataError, path, image_size, path)
  assert size is None or min(size) >= 1
  mask = attempt(DataError, path, read_index_png, path)
  assert mask is None or (mask.ndim == 2 and mask.dtype == np.uint8)


def test_hostile_images(images):
  run_cases("image", images, check_image)
