"""Importing ImageNet VGG16 weights (torchvision's `vgg16` / `vgg16_bn` state dicts) into our encoder.

The `.pth` files are read without PyTorch: they are pickles whose tensors point
at raw storages, and a restricted unpickler rebuilds just those as NumPy arrays
(it executes nothing else, unlike a plain `torch.load`). `.npz` files with the
same keys work too.
"""

import collections
import io
import math
import mmap
import pickle
import pickletools
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

from deconvnet_jax.models import VGG16_PLAN, get_variables, set_variables

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": None, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_DTYPES = tuple(t for t in _STORAGE_DTYPES.values() if t is not None)
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
# What a damaged or hostile file makes unpickling (or zipfile) raise besides UnpicklingError.
_DAMAGE = (ValueError, EOFError, KeyError, IndexError, TypeError, AttributeError, OverflowError,
           RecursionError, struct.error, NotImplementedError, RuntimeError, zlib.error, zipfile.BadZipFile)


class _StorageRef:
  def __init__(self, dtype, key):
    self.dtype, self.key, self.array = dtype, key, None


class _TensorRef:
  """A tensor named during unpickling; its storage may only be read after the pickle."""

  def __init__(self, storage, offset, size, stride, *unused):
    del unused
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

  def numpy(self) -> np.ndarray:
    numbers = (self.offset, *self.size, *self.stride)
    if (not isinstance(self.storage, _StorageRef) or len(self.size) != len(self.stride)
        or len(self.size) > 32 or not all(type(v) is int and 0 <= v < 1 << 48 for v in numbers)):
      raise ValueError(f"not a tensor: storage {str(self.storage)[:40]}, offset {str(self.offset)[:20]}, "
                       f"size {str(self.size)[:60]}, stride {str(self.stride)[:60]}")
    data = self.storage.array
    if data is None:
      raise ValueError(f"storage {self.storage.key} is missing from the file")
    if min(self.size, default=1) == 0:
      return np.zeros(self.size, data.dtype)
    needed = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride)) + 1
    if needed > data.size:
      raise ValueError(f"storage {self.storage.key} is shorter than its tensor (truncated file?)")
    if math.prod(self.size) > data.size:  # a broadcast (stride 0) view, which .copy() would blow up
      raise ValueError(f"a tensor of shape {self.size} repeats the {data.size:,} values of storage "
                       f"{self.storage.key}; save it contiguous")
    strides = tuple(s * data.itemsize if n > 1 else 0 for n, s in zip(self.size, self.stride))
    return np.lib.stride_tricks.as_strided(data[self.offset:], shape=self.size, strides=strides).copy()


class _StateDictUnpickler(pickle.Unpickler):
  """Unpickles a state dict, rebuilding tensors as NumPy arrays and refusing any other code."""

  def __init__(self, file, storages: dict):
    super().__init__(file)
    self.storages = storages

  def find_class(self, module, name):
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return _TensorRef
    if module == "torch._utils" and name == "_rebuild_parameter":
      return lambda data, requires_grad, hooks: data
    if module == "torch" and name in _STORAGE_DTYPES:
      if _STORAGE_DTYPES[name] is None:
        raise ValueError(f"tensors of {name} are not supported; save the weights as float32")
      return _STORAGE_DTYPES[name]
    raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a state dict")

  def persistent_load(self, pid):
    # ('storage', storage_type, key, location, numel[, view_metadata])
    if not (type(pid) is tuple and len(pid) >= 5 and pid[0] == "storage"
            and any(pid[1] is t for t in _DTYPES)):
      raise pickle.UnpicklingError(f"persistent id {str(pid)[:80]} is not a torch storage")
    dtype, key = pid[1], str(pid[2])
    if key not in self.storages:
      self.storages[key] = _StorageRef(dtype, key)
    return self.storages[key]


def _unpickle(f, storages: dict):
  """The next pickle in f, restricted. Its opcodes are walked first, which refuses lengths past
  the data and memo indices no pickler writes: CPython allocates either before reading it."""
  start = f.tell()
  for n, (op, arg, pos) in enumerate(pickletools.genops(f)):
    if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and int(arg) > n:
      raise ValueError(f"pickle memo index {int(arg):,} at byte {pos} (opcode {n})")
  f.seek(start)
  return _StateDictUnpickler(f, storages).load()


def _entry(archive: zipfile.ZipFile, name: str, limit: int) -> bytes:
  """A zip entry's bytes; its declared sizes must fit in the file (torch stores entries uncompressed)."""
  info = archive.getinfo(name)
  if max(info.file_size, info.compress_size) > limit or not 0 <= info.header_offset < limit:
    raise ValueError(f"{name} declares {max(info.file_size, info.compress_size):,} bytes at byte "
                     f"{info.header_offset:,}, past the end of the file ({limit:,} bytes)")
  if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
    raise ValueError(f"{name} is compressed with zip method {info.compress_type}; torch stores entries")
  with archive.open(info) as f:
    return f.read(info.file_size)


def _read_zip(path: Path) -> dict:
  size = path.stat().st_size
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
    if pkl is None:
      raise ValueError("zip archive without data.pkl")
    root = pkl[:-len("data.pkl")]
    storages = {}
    state = _unpickle(io.BytesIO(_entry(archive, pkl, size)), storages)
    for ref in storages.values():
      ref.array = np.frombuffer(_entry(archive, f"{root}data/{ref.key}", size), ref.dtype)
  return _finish(state)


def _read_legacy(path: Path) -> dict:
  """The pre-1.6 format (torchvision's published VGG16 files): pickles, then raw storages."""
  # Read through a memory map: its read(n) returns what is there, where file.read(n) would
  # allocate the n bytes a hostile file claims first.
  with open(path, "rb") as raw, mmap.mmap(raw.fileno(), 0, access=mmap.ACCESS_READ) as f:
    if _unpickle(f, {}) != _LEGACY_MAGIC:
      raise ValueError("not a PyTorch file (bad magic number)")
    _unpickle(f, {})  # protocol version
    _unpickle(f, {})  # system info
    storages = {}
    state = _unpickle(f, storages)
    keys = _unpickle(f, {})
    if type(keys) is not list or not all(type(k) is str for k in keys):
      raise ValueError(f"the storage keys are a {type(keys).__name__}, not a list of strings")
    for key in keys:
      ref = storages[key]
      (numel,) = struct.unpack("<q", f.read(8))
      itemsize, left = np.dtype(ref.dtype).itemsize, f.size() - f.tell()
      if not 0 <= numel <= left // itemsize:
        raise ValueError(f"storage {ref.key} claims {numel:,} values of {itemsize} bytes, the file has "
                         f"{left:,} bytes left (truncated file?)")
      ref.array = np.frombuffer(f.read(numel * itemsize), ref.dtype)
  return _finish(state)


def _finish(state) -> dict:
  if isinstance(state, dict) and "state_dict" in state:
    state = state["state_dict"]
  if not isinstance(state, dict):
    raise ValueError(f"expected a state dict, found {type(state).__name__}")
  tensors = {k: v for k, v in state.items() if isinstance(v, _TensorRef)}
  if not all(type(k) is str for k in tensors):
    raise ValueError("a state dict whose names are not all strings")
  return {k: v.numpy() for k, v in tensors.items()}


def read_state_dict(path) -> dict[str, np.ndarray]:
  """A PyTorch state dict (`.pth`, zip or legacy format) or `.npz` as {name: array}."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such weights file")
  try:
    if path.suffix == ".npz":
      with np.load(path) as data:
        return {k: data[k] for k in data.files}
    if zipfile.is_zipfile(path):
      return _read_zip(path)
    return _read_legacy(path)
  except (pickle.UnpicklingError, *_DAMAGE) as e:
    raise ValueError(f"{path}: cannot read as a PyTorch state dict: {str(e) or type(e).__name__}") from e


def _expect(path, name, array, shape):
  if tuple(array.shape) != tuple(shape):
    raise ValueError(f"{path}: {name} has shape {tuple(array.shape)} where the model expects "
                     f"{tuple(shape)} (is the model's width / fc_dim / fc_kernel that of VGG16?)")
  return np.asarray(array, np.float32)


def vgg16_variables(state_dict: dict, params: dict, batch_stats: dict, path="state dict") -> list[str]:
  """Fills the encoder entries of `params` / `batch_stats` (get_variables layout) in place.

  conv OIHW -> HWIO; classifier.0 ([F, C*k*k], torch flattens C, H, W) -> fc6 [k, k, C, F];
  classifier.3 ([F, F]) -> fc7 [1, 1, F, F]. Returns the layer names it set.
  """
  convs = sorted(int(k.split(".")[1]) for k, v in state_dict.items()
                 if k.startswith("features.") and k.endswith(".weight") and v.ndim == 4)
  names = [f"conv{s}_{i}" for s, plan in enumerate(VGG16_PLAN, 1) for i in range(1, len(plan) + 1)]
  if len(convs) != len(names) or "classifier.0.weight" not in state_dict:
    raise ValueError(f"{path}: not a torchvision VGG16 state dict (found {len(convs)} conv "
                     "layers under features.*, expected 13, and classifier.0)")
  encoder, stats = params["encoder"], batch_stats.get("encoder", {})
  has_bn = f"features.{convs[0] + 1}.running_mean" in state_dict
  if has_bn and "bn" not in encoder["conv1_1"]:
    raise ValueError(f"{path}: holds vgg16_bn weights but the model has no BatchNorm; "
                     "use torchvision's plain vgg16 weights for it")

  def take(target, key, name, transform=lambda w: w):
    target[key] = _expect(path, name, transform(state_dict[name]), target[key].shape)

  for name, index in zip(names, convs):
    layer = encoder[name]["layer"]
    take(layer, "kernel", f"features.{index}.weight", lambda w: w.transpose(2, 3, 1, 0))
    take(layer, "bias", f"features.{index}.bias")
    if has_bn:
      p = f"features.{index + 1}"
      take(encoder[name]["bn"], "scale", f"{p}.weight")
      take(encoder[name]["bn"], "bias", f"{p}.bias")
      take(stats[name]["bn"], "mean", f"{p}.running_mean")
      take(stats[name]["bn"], "var", f"{p}.running_var")

  fc6, fc7 = encoder["fc6"]["layer"], encoder["fc7"]["layer"]
  k, _, c, f = fc6["kernel"].shape
  take(fc6, "kernel", "classifier.0.weight",
       lambda w: w.reshape(f, c, k, k).transpose(2, 3, 1, 0) if w.shape == (f, c * k * k) else w)
  take(fc6, "bias", "classifier.0.bias")
  take(fc7, "kernel", "classifier.3.weight", lambda w: w.T.reshape(1, 1, *w.T.shape))
  take(fc7, "bias", "classifier.3.bias")
  return names + ["fc6", "fc7"]


def load_vgg16(model, path) -> list[str]:
  """Loads torchvision VGG16(-BN) weights from `path` into `model`'s encoder, in place.

  The model must read torchvision's input convention (input_norm='torchvision_rgb');
  decoder layers keep their Gaussian initialisation. Returns the layers set.
  """
  if model.config.input_norm != "torchvision_rgb":
    raise ValueError(f"{path}: torchvision's VGG16 expects RGB in [0, 1] with ImageNet mean/std; "
                     "build the model with input_norm='torchvision_rgb'")
  variables = get_variables(model)
  names = vgg16_variables(read_state_dict(path), variables["params"], variables["batch_stats"], path)
  set_variables(model, variables, source=str(path))
  return names
