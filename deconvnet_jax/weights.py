"""Importing ImageNet VGG16 weights (torchvision's `vgg16` / `vgg16_bn` state dicts) into our encoder.

The `.pth` files are read without PyTorch: they are pickles whose tensors point
at raw storages, and a restricted unpickler rebuilds just those as NumPy arrays
(it executes nothing else, unlike a plain `torch.load`). `.npz` files with the
same keys work too.
"""

import collections
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np

from deconvnet_jax.models import VGG16_PLAN, get_variables, set_variables

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": None, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _StorageRef:
  def __init__(self, dtype, key):
    self.dtype, self.key, self.array = dtype, key, None


class _TensorRef:
  """A tensor named during unpickling; its storage may only be read after the pickle."""

  def __init__(self, storage, offset, size, stride, *unused):
    del unused
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

  def numpy(self) -> np.ndarray:
    data = self.storage.array
    if data is None:
      raise ValueError(f"storage {self.storage.key} is missing from the file")
    step = data.itemsize
    needed = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride)) + 1
    if min(self.size, default=1) > 0 and needed > data.size:
      raise ValueError(f"storage {self.storage.key} is shorter than its tensor (truncated file?)")
    return np.lib.stride_tricks.as_strided(
        data[self.offset:], shape=self.size, strides=tuple(s * step for s in self.stride)).copy()


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
    dtype, key = pid[1], str(pid[2])
    if key not in self.storages:
      self.storages[key] = _StorageRef(dtype, key)
    return self.storages[key]


def _read_zip(path: Path) -> dict:
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
    if pkl is None:
      raise ValueError("zip archive without data.pkl")
    root = pkl[:-len("data.pkl")]
    storages = {}
    with archive.open(pkl) as f:
      state = _StateDictUnpickler(f, storages).load()
    for ref in storages.values():
      ref.array = np.frombuffer(archive.read(f"{root}data/{ref.key}"), ref.dtype)
  return _finish(state)


def _read_legacy(path: Path) -> dict:
  """The pre-1.6 format (torchvision's published VGG16 files): pickles, then raw storages."""
  with open(path, "rb") as f:
    if pickle.load(f) != _LEGACY_MAGIC:
      raise ValueError("not a PyTorch file (bad magic number)")
    pickle.load(f)  # protocol version
    pickle.load(f)  # system info
    storages = {}
    state = _StateDictUnpickler(f, storages).load()
    for key in pickle.load(f):
      ref = storages[str(key)]
      (numel,) = struct.unpack("<q", f.read(8))
      data = f.read(numel * np.dtype(ref.dtype).itemsize)
      if len(data) != numel * np.dtype(ref.dtype).itemsize:
        raise ValueError("file is truncated")
      ref.array = np.frombuffer(data, ref.dtype)
  return _finish(state)


def _finish(state) -> dict:
  if isinstance(state, dict) and "state_dict" in state:
    state = state["state_dict"]
  if not isinstance(state, dict):
    raise ValueError(f"expected a state dict, found {type(state).__name__}")
  return {k: v.numpy() for k, v in state.items() if isinstance(v, _TensorRef)}


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
  except (ValueError, pickle.UnpicklingError, EOFError, KeyError, struct.error,
          zipfile.BadZipFile) as e:
    raise ValueError(f"{path}: cannot read as a PyTorch state dict: {e}") from e


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
