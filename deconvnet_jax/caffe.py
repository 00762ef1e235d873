"""Importing Caffe `.caffemodel` weights: ImageNet VGG16, FCN-8s and the released DeconvNet.

`load_caffe(path, kind)` gives the ModelConfig the file implies and its
variables ({"params", "batch_stats"}, as models.get_variables); `convert_caffe`
(and convert_caffe.py) writes them as a checkpoint that infer.py and
train.py --init-from read.

A `.caffemodel` is a protobuf `NetParameter`. It is read here with a small
wire-format reader (no compiled caffe.proto, no Caffe): layers are field 100
(`LayerParameter`: name 1, type 2 as a string, bottom 3, top 4, blobs 7) or, in
files of Caffe before 2015, field 2 (`V1LayerParameter`: bottom 2, top 3, name
4, type 5 an enum, blobs 6, a V0 layer in 1). A `BlobProto` holds its shape in
field 7 (`BlobShape.dim` 1) or the legacy num/channels/height/width 1-4, and
its values as float 5 or double 8, packed or not. Floats are taken with
`np.frombuffer` from a memory map of the file. Sources: BVLC/caffe and
HyeonwooNoh/caffe `src/caffe/proto/caffe.proto`.

Layer names (all checked against the reference files named):
  VGG16 (`VGG_ILSVRC_16_layers.caffemodel`): conv1_1 ... conv5_3, fc6, fc7 (and
    fc8, the ImageNet classifier, not imported). fc6/fc7 are InnerProduct
    ([4096, 25088], flattened C, H, W) or, in DeconvNet's
    `VGG_ILSVRC_16_layers_conv.caffemodel`, convolutions ([4096, 512, 7, 7]).
  FCN-8s (`fcn8s-heavy-pascal.caffemodel`; shelhamer/fcn.berkeleyvision.org
    `fcn8s/deploy.prototxt`, `fcn8s/caffemodel-url`): VGG16 conv1_1 ... fc7
    (fc6/fc7 convolutions), score_fr, upscore2, score_pool4, upscore_pool4,
    score_pool3, upscore8 (the three Deconvolutions have no bias).
  DeconvNet (HyeonwooNoh/DeconvNet `model/DeconvNet/DeconvNet_inference_deploy.prototxt`,
    `training/002_stage_2/stage_2_train.prototxt`): conv1_1 ... conv5_3, fc6,
    fc7 (convolutions), fc6-deconv, deconv5_1 ... deconv1_2 (Deconvolution),
    seg-score-voc (1x1 convolution, top "seg-score"); each conv / deconv
    followed in place by a `BN` layer: bn1_1 ... bn5_3, bnfc6, bnfc7,
    fc6-deconv-bn, debn5_1 ... debn1_2 (names from
    `training/003_make_bn_layer_testable/BN_make_INFERENCE_script.py`).

BatchNorm conventions. The DeconvNet fork's `BN` layer (HyeonwooNoh/caffe
`src/caffe/layers/bn_layer.cpp`, V1 enum BN = 43) has two blobs, scale and
shift, each [1, C, 1, 1], and no running statistics: in LEARN mode it
normalises by batch statistics (eps 1e-9), in INFERENCE mode it computes
`scale * x + shift`. The training snapshots (`stage_{1,2}_train_result.caffemodel`)
hold gamma/beta; `BN_make_INFERENCE_script.py` re-estimates mean/variance over
500 batches (m/(m-1) corrected) and overwrites the blobs of
`DeconvNet_trainval_inference.caffemodel` with the folded
`gamma / sqrt(var + 1e-9)` and `beta - gamma * mean / sqrt(var + 1e-9)`. The file
cannot tell the two apart (the script saves with the LEARN-mode prototxt), so
the kind says which: "deconvnet" (folded) or "deconvnet-train" (gamma/beta).
BVLC `BatchNorm` layers (mean, variance, moving-average factor; eps in
batch_norm_param, default 1e-5) are followed by a `Scale` layer (gamma[, beta]);
both are found by the blob they act on, whatever their names.

What the DeconvNet kinds give (all exact in eval mode):
  folded scale/shift ("deconvnet"): by default a `batch_norm=False` model whose
    conv / deconv kernels and biases absorb them (the fast inference model);
    with `batch_norm=True`, BN layers with scale/shift as gamma/beta, mean 0 and
    variance 1 - bn_epsilon.
  gamma/beta without statistics ("deconvnet-train"): a `batch_norm=True` model
    with mean 0 / variance 1 statistics, to be re-estimated (or fine-tuned with
    `train.py --init-from`, where BN uses batch statistics) before evaluation;
    they cannot be folded.
  BatchNorm + Scale: a `batch_norm=True` model (variance shifted by the eps
    difference), or folded with `batch_norm=False`.

All Caffe models here read BGR 0-255 images minus the mean (104.007, 116.669,
122.679): the "caffe_bgr" normalisation, which feeds BGR, so conv1_1 maps
unchanged. Conv weights are OIHW -> our HWIO; Deconvolution weights
[in, out, kh, kw] are our Deconv layout as they are.
"""

import dataclasses
import math
import mmap
from pathlib import Path

import numpy as np
from flax import nnx
from flax import traverse_util

from deconvnet_jax import batchnorm
from deconvnet_jax.checkpoints import check_new_dir, model_meta, write_checkpoint
from deconvnet_jax.configs import ModelConfig
from deconvnet_jax.labels import VOC_CLASSES
from deconvnet_jax.models import DECODER_PLAN, VGG16_PLAN, abbreviated, build_model, get_variables

KINDS = ("vgg16", "fcn8s", "deconvnet", "deconvnet-train")

# V1LayerParameter.LayerType values (BVLC caffe.proto; BN, UNPOOLING, CROP from the DeconvNet fork).
V1_TYPES = {
    1: "Accuracy", 3: "Concat", 4: "Convolution", 5: "Data", 6: "Dropout", 8: "Flatten",
    12: "ImageData", 14: "InnerProduct", 15: "LRN", 17: "Pooling", 18: "ReLU", 20: "Softmax",
    21: "SoftmaxWithLoss", 22: "Split", 25: "Eltwise", 39: "Deconvolution", 40: "Crop",
    42: "Unpooling", 43: "BN"}
V0_TYPES = {"conv": "Convolution", "innerproduct": "InnerProduct"}
_FIELDS = {  # name, type, bottom, top, blobs
    "V2": (1, 2, 3, 4, 7), "V1": (4, 5, 2, 3, 6), "V0": (1, 2, None, None, 50)}

VGG16_LAYERS = tuple(f"conv{s}_{i}" for s, plan in enumerate(VGG16_PLAN, 1)
                     for i in range(1, len(plan) + 1)) + ("fc6", "fc7")
# Our FCN8s module -> Caffe names (the first is the reference's; the others are the
# 2014 model-zoo gist's, as its ports spell them: not checked against that file).
FCN8S_HEADS = {"score_fr": ("score_fr", "score-fr"), "score_pool4": ("score_pool4", "score-pool4"),
               "score_pool3": ("score_pool3", "score-pool3")}
FCN8S_UPSAMPLING = {"upscore2": ("upscore2", "score2"), "upscore_pool4": ("upscore_pool4", "score4"),
                    "upscore8": ("upscore8", "upsample")}
DECONVNET_SCORE = ("seg-score-voc", "seg-score")


class CaffeError(ValueError):
  """A Caffe model file that cannot be read or does not fit; the message names file, layer and shapes."""


@dataclasses.dataclass
class CaffeLayer:
  """One layer of a .caffemodel: its V2 type name, parameter blobs (float32) and connections."""

  type: str
  blobs: list[np.ndarray]
  bottom: tuple[str, ...] = ()
  top: tuple[str, ...] = ()
  bn_mode: str | None = None  # the fork's BN: "LEARN" / "INFERENCE" where the file says
  eps: float | None = None  # BatchNorm's eps where the file says


class _Corrupt(Exception):
  """Bytes that do not parse; the reader adds the file name."""


# ---- protobuf wire format ----

def _varint(buf, pos: int, end: int) -> tuple[int, int]:
  value = shift = 0
  while shift < 70:
    if pos >= end:
      raise _Corrupt("a number runs past the end of its record (truncated file?)")
    byte = buf[pos]
    value |= (byte & 0x7F) << shift
    pos += 1
    if byte < 0x80:
      return value, pos
    shift += 7
  raise _Corrupt(f"malformed number at byte {pos}")


def _fields(buf, start: int, end: int):
  """Yields (field, wire type, value) of the message in buf[start:end].

  value: an int (varint), a (start, end) span (length-delimited) or, for fixed
  32/64-bit fields, a [n, 4 or 8] uint8 array of a whole run of the same field
  (an unpacked repeated float is read at once, not value by value).
  """
  pos = start
  while pos < end:
    tag_start = pos
    tag, pos = _varint(buf, pos, end)
    field, wire = tag >> 3, tag & 7
    if field == 0:
      raise _Corrupt(f"field number 0 at byte {tag_start}")
    if wire == 0:
      value, pos = _varint(buf, pos, end)
    elif wire == 2:
      size, pos = _varint(buf, pos, end)
      if pos + size > end:
        raise _Corrupt(f"a record of {size} bytes at byte {pos} runs past the end "
                       f"(only {end - pos} left: truncated file?)")
      value, pos = (pos, pos + size), pos + size
    elif wire in (1, 5):
      width, tag_len = (8 if wire == 1 else 4), pos - tag_start
      if pos + width > end:
        raise _Corrupt(f"a {width}-byte value at byte {pos} runs past the end (truncated file?)")
      record = tag_len + width
      n = (end - tag_start) // record
      if n > 1 and buf[tag_start + record:tag_start + record + tag_len] == buf[tag_start:pos]:
        rows = np.frombuffer(buf, np.uint8, count=n * record, offset=tag_start).reshape(n, record)
        run, step = 2, 64  # the run's end, found in growing steps: each field costs O(its run)
        while run < n:
          same = (rows[run:run + step, :tag_len] == rows[0, :tag_len]).all(axis=1)
          run += len(same) if same.all() else int(np.argmin(same))
          if not same.all():
            break
          step *= 2
        value = np.ascontiguousarray(rows[:run, tag_len:])
      else:
        run, value = 1, np.frombuffer(buf, np.uint8, count=width, offset=pos).reshape(1, width)
      pos = tag_start + run * record
    else:
      raise _Corrupt(f"wire type {wire} at byte {tag_start} is not used by Caffe")
    yield field, wire, value


def _text(buf, span) -> str:
  return bytes(buf[span[0]:span[1]]).decode("utf-8", errors="replace")


def _numbers(buf, wire, value, dtype) -> np.ndarray:
  """A repeated float/double field, packed (one span) or not (a run of fixed values)."""
  if wire == 2:
    start, end = value
    if (end - start) % dtype.itemsize:
      raise _Corrupt(f"packed {dtype} values of {end - start} bytes")
    return np.frombuffer(buf, dtype, count=(end - start) // dtype.itemsize, offset=start)
  if wire != (5 if dtype.itemsize == 4 else 1):
    raise _Corrupt("blob values of the wrong wire type")
  return value.view(dtype).ravel()


def _blob(buf, start, end) -> np.ndarray:
  shape, legacy, chunks = None, {}, []
  for field, wire, value in _fields(buf, start, end):
    if field == 7 and wire == 2:
      shape = []
      for f, w, v in _fields(buf, *value):
        if f == 1 and w == 0:
          shape.append(v)
        elif f == 1 and w == 2:
          pos, stop = v
          while pos < stop:
            dim, pos = _varint(buf, pos, stop)
            shape.append(dim)
    elif field in (5, 8):
      chunks.append(_numbers(buf, wire, value, np.dtype("<f4" if field == 5 else "<f8")))
    elif field in (1, 2, 3, 4) and wire == 0:
      legacy[field] = value
  data = (chunks[0] if len(chunks) == 1 else np.concatenate(chunks) if chunks
          else np.zeros(0, np.float32)).astype(np.float32, copy=False)
  if shape is None:
    shape = [legacy.get(i, 0) for i in (1, 2, 3, 4)] if legacy else [data.size]
  if len(shape) > 32 or max(shape, default=0) >= 1 << 40 or math.prod(shape) != data.size:
    axes = ", ".join(map(str, shape[:8])) + (f", ... ({len(shape)} axes)" if len(shape) > 8 else "")
    raise _Corrupt(f"a blob of shape ({axes}) holds {data.size} values (Caffe blobs have at most "
                   "32 axes)")
  return data.reshape(shape)


def _layer(buf, start, end, version: str) -> tuple[str, CaffeLayer]:
  name_f, type_f, bottom_f, top_f, blobs_f = _FIELDS[version]
  name, kind, bottom, top, blobs, extra = "", "", [], [], [], {}
  for field, wire, value in _fields(buf, start, end):
    try:
      if field == name_f and wire == 2:
        name = _text(buf, value)
      elif field == type_f and version == "V1" and wire == 0:
        kind = V1_TYPES.get(value, f"V1 type {value}")
      elif field == type_f and wire == 2:
        kind = _text(buf, value)
        kind = V0_TYPES.get(kind, kind) if version == "V0" else kind
      elif field in (bottom_f, top_f) and wire == 2:
        (bottom if field == bottom_f else top).append(_text(buf, value))
      elif field == blobs_f and wire == 2:
        blobs.append(_blob(buf, *value))
      elif version == "V1" and field == 1 and wire == 2:
        name, v0 = _layer(buf, *value, "V0")
        kind, blobs = v0.type, v0.blobs
      elif version == "V1" and field == 45 and wire == 2:  # the fork's bn_param: bn_mode = 3
        modes = [v for f, w, v in _fields(buf, *value) if f == 3 and w == 0]
        extra["bn_mode"] = ("LEARN", "INFERENCE")[modes[-1]] if modes and modes[-1] < 2 else None
      elif version == "V2" and field == 139 and wire == 2:  # batch_norm_param: eps = 3
        eps = [v for f, w, v in _fields(buf, *value) if f == 3 and w == 5]
        extra["eps"] = float(eps[-1].view("<f4")[-1, 0]) if eps else None
    except _Corrupt as e:
      raise _Corrupt(f"layer {name or '(unnamed)'!r}: {e}") from None
  return name, CaffeLayer(kind, blobs, tuple(bottom), tuple(top), **extra)


def read_caffemodel(path) -> dict[str, CaffeLayer]:
  """The layers of a .caffemodel in file order: {name: CaffeLayer}; raises CaffeError if unreadable."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such Caffe model file")
  if path.stat().st_size == 0:
    raise CaffeError(f"{path}: empty file, not a .caffemodel")
  with open(path, "rb") as f:
    buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # the arrays keep it open
  layers, last = {}, "(none)"
  try:
    for field, wire, value in _fields(buf, 0, len(buf)):
      if field in (2, 100) and wire == 2:
        name, layer = _layer(buf, *value, "V2" if field == 100 else "V1")
        if name not in layers or (layer.blobs and not layers[name].blobs):
          layers[name] = layer
        last = name
  except _Corrupt as e:
    raise CaffeError(f"{path}: not a readable .caffemodel (after layer {last!r}): {e}") from None
  if not layers:
    raise CaffeError(f"{path}: holds no Caffe layers; not a .caffemodel")
  return layers


# ---- mappings ----

@dataclasses.dataclass(frozen=True)
class _Norm:
  """A normalisation y = (x - mean) / sqrt(var + eps) * gamma + beta; mean/var None if not in the file."""

  name: str
  gamma: np.ndarray
  beta: np.ndarray
  mean: np.ndarray | None
  var: np.ndarray | None
  eps: float


def _squeezed(shape) -> tuple:
  return tuple(d for d in shape if d != 1)


def _find(net: dict, names, path, kind) -> tuple[str, CaffeLayer]:
  """The first of `names` (a reference name and its aliases) in the file."""
  for name in names:
    if name in net:
      return name, net[name]
  also = f" (or {', '.join(map(repr, names[1:]))})" if len(names) > 1 else ""
  raise CaffeError(f"{path}: has no layer {names[0]!r}{also}, which a {kind} model needs; "
                   f"its layers: {abbreviated(list(net), 12)}")


def _after(net: dict, name, types) -> tuple[str, CaffeLayer] | None:
  """The first later layer of one of `types` whose input is `name`'s output blob."""
  layer = net[name]
  blob = layer.top[0] if layer.top else name
  names = list(net)
  for later in names[names.index(name) + 1:]:
    candidate = net[later]
    if candidate.type in types and candidate.bottom[:1] == (blob,):
      return later, candidate
  return None


class LayerMapper:
  """Fills flat {"params/a/b": array} entries of a model (`template`: key -> shape) from the
  Caffe layers `net`, converting layouts, and records which Caffe layers it used."""

  def __init__(self, net: dict, template: dict, path, kind: str, config: ModelConfig):
    self.net, self.template, self.path, self.kind, self.config = net, template, path, kind, config
    self.out, self.used, self.without_statistics = {}, [], []

  def find(self, names) -> tuple[str, CaffeLayer]:
    name, layer = _find(self.net, names, self.path, self.kind)
    self.used.append(name)
    return name, layer

  def blobs(self, name, layer, roles) -> list[np.ndarray]:
    if len(layer.blobs) != len(roles):
      raise CaffeError(f"{self.path}: layer {name!r} ({layer.type}) has {len(layer.blobs)} blobs "
                       f"where a {self.kind} model expects {len(roles)} ({', '.join(roles)})")
    return layer.blobs

  def fit(self, name, role, blob, *shapes) -> np.ndarray:
    """`blob` reshaped to the first of `shapes` it matches, up to size-1 axes (legacy 4-D blobs)."""
    for shape in shapes:
      if _squeezed(blob.shape) == _squeezed(shape):
        return np.asarray(blob, np.float32).reshape(shapes[0])
    raise CaffeError(
        f"{self.path}: layer {name!r} {role} has shape {tuple(blob.shape)} where the model expects "
        f"{' or '.join(str(tuple(s)) for s in shapes)} (Caffe layout; is the configuration's "
        f"width / fc_dim / fc_kernel / num_classes that of the file? {_describe(self.config)})")

  def put(self, key, value):
    assert tuple(self.template[key]) == value.shape, (key, value.shape)
    self.out[key] = np.array(value, np.float32)  # a copy: blobs are views of the mapped file

  def weights(self, module, names, deconv=False):
    """(Caffe name, kernel in our layout, bias or None) for our conv/deconv `module`."""
    shape = tuple(self.template[f"params/{module}/kernel"])
    has_bias = f"params/{module}/bias" in self.template
    name, layer = self.find(names)
    blobs = self.blobs(name, layer, ("weights", "bias") if has_bias else ("weights",))
    if deconv:  # Caffe Deconvolution [in, out, kh, kw] is our Deconv layout
      kernel, cout = self.fit(name, "weights", blobs[0], shape), shape[1]
    else:  # OIHW (or InnerProduct [O, I*kh*kw], flattened I, H, W) -> HWIO
      kh, kw, cin, cout = shape
      kernel = self.fit(name, "weights", blobs[0], (cout, cin, kh, kw), (cout, cin * kh * kw))
      kernel = kernel.transpose(2, 3, 1, 0)
    bias = self.fit(name, "bias", blobs[1], (cout,)) if has_bias else None
    return name, kernel, bias

  def plain(self, module, names, deconv=False):
    _, kernel, bias = self.weights(module, names, deconv)
    self.put(f"params/{module}/kernel", kernel)
    if bias is not None:
      self.put(f"params/{module}/bias", bias)

  def block(self, prefix, names, deconv=False, norm=True):
    """A models.Block: the Caffe layer, and (if `norm`) the BN acting on its output."""
    name, kernel, bias = self.weights(f"{prefix}/layer", names, deconv)
    found = self.norm_after(name, bias.shape[0]) if norm else None
    if f"params/{prefix}/bn/scale" in self.template and norm:
      if found is None:
        raise CaffeError(f"{self.path}: no BN / BatchNorm layer acts on the output of {name!r}, "
                         "but the model has BatchNorm; import with batch_norm=False")
      stats = found.mean is not None
      if not stats:
        self.without_statistics.append(found.name)
      self.put(f"params/{prefix}/bn/scale", found.gamma)
      self.put(f"params/{prefix}/bn/bias", found.beta)
      self.put(f"batch_stats/{prefix}/bn/mean", found.mean if stats else np.zeros_like(found.beta))
      # Same denominator sqrt(var + eps) under our epsilon.
      var = (np.maximum(found.var + found.eps - self.config.bn_epsilon, 0) if stats
             else np.ones_like(found.beta))
      self.put(f"batch_stats/{prefix}/bn/var", var)
    self.put(f"params/{prefix}/layer/kernel", kernel)
    self.put(f"params/{prefix}/layer/bias", bias)

  def norm_after(self, name, channels) -> _Norm | None:
    """The BN (fork) or BatchNorm (+ Scale) layer applied to `name`'s output blob, if any."""
    after = _after(self.net, name, ("BN", "BatchNorm"))
    if after is None:
      return None
    bn_name, bn = after
    self.used.append(bn_name)
    vector = (channels,)
    if bn.type == "BN":
      scale, shift = (self.fit(bn_name, role, b, vector)
                      for role, b in zip(("scale", "shift"), self.blobs(bn_name, bn, ("scale", "shift"))))
      if self.kind == "deconvnet" or bn.bn_mode == "INFERENCE":
        return _Norm(bn_name, scale, shift, np.zeros(vector, np.float32), np.ones(vector, np.float32), 0.0)
      return _Norm(bn_name, scale, shift, None, None, 1e-9)
    mean, var, factor = self.blobs(bn_name, bn, ("mean", "variance", "moving-average factor"))
    f = float(self.fit(bn_name, "moving-average factor", factor, (1,))[0])
    unbias = 0.0 if f == 0 else 1.0 / f
    mean = self.fit(bn_name, "mean", mean, vector) * unbias
    var = self.fit(bn_name, "variance", var, vector) * unbias
    gamma, beta = np.ones(vector, np.float32), np.zeros(vector, np.float32)
    after = _after(self.net, bn_name, ("Scale",))
    if after is not None:
      scale_name, scale = after
      self.used.append(scale_name)
      blobs = scale.blobs
      if len(blobs) not in (1, 2):
        self.blobs(scale_name, scale, ("gamma", "beta"))
      gamma = self.fit(scale_name, "gamma", blobs[0], vector)
      beta = self.fit(scale_name, "beta", blobs[1], vector) if len(blobs) == 2 else beta
    return _Norm(bn_name, gamma, beta, mean, var, 1e-5 if bn.eps is None else bn.eps)


def vgg16_variables(m: LayerMapper):
  """VGG16 conv1_1 ... conv5_3, fc6, fc7 -> encoder/convS_I/layer, encoder/fc6/layer, encoder/fc7/layer.

  fc6 is a 7x7 convolution [4096, 512, 7, 7] or an InnerProduct [4096, 25088]
  (reshape(4096, 512, 7, 7)); both become HWIO [7, 7, 512, 4096]. Any BN is left alone.
  """
  for name in VGG16_LAYERS:
    m.block(f"encoder/{name}", (name,), norm=False)


def fcn8s_variables(m: LayerMapper):
  """FCN-8s: VGG16 as above plus the score convolutions (OIHW -> HWIO) and the bias-free
  upsampling Deconvolutions ([in, out, k, k], unchanged)."""
  vgg16_variables(m)
  for module, names in FCN8S_HEADS.items():
    m.plain(module, names)
  for module, names in FCN8S_UPSAMPLING.items():
    m.plain(module, names, deconv=True)


def deconvnet_variables(m: LayerMapper):
  """DeconvNet: every conv / deconv with the BN on its output (kept or folded, see the module
  docstring); fc6-deconv and deconvS_I [in, out, k, k] unchanged; seg-score-voc -> score."""
  for name in VGG16_LAYERS:
    m.block(f"encoder/{name}", (name,))
  m.block("fc6_deconv", ("fc6-deconv",), deconv=True)
  for s, plan in zip(range(5, 0, -1), DECODER_PLAN):
    for i in range(1, len(plan) + 1):
      m.block(f"deconv{s}_{i}", (f"deconv{s}_{i}",), deconv=True)
  m.plain("score", DECONVNET_SCORE)


MAPPINGS = {"vgg16": vgg16_variables, "fcn8s": fcn8s_variables, "deconvnet": deconvnet_variables,
            "deconvnet-train": deconvnet_variables}


def _out_channels(net, names, path, kind) -> tuple[str, np.ndarray]:
  """The weight blob of the first of `names` in the file, as [out, ...] (legacy leading 1s dropped)."""
  name, layer = _find(net, names, path, kind)
  if not layer.blobs or not layer.blobs[0].size:
    raise CaffeError(f"{path}: layer {name!r} has no weights")
  w = layer.blobs[0]
  if w.ndim not in (2, 4):
    raise CaffeError(f"{path}: layer {name!r} weights have shape {w.shape}, expected [out, in, kh, kw] "
                     "(or [out, in] for InnerProduct)")
  return name, w.reshape(w.shape[-2:]) if layer.type == "InnerProduct" and w.shape[:-2] == (1, 1) else w


def _has_norm(net: dict, path, kind) -> tuple[str, CaffeLayer] | None:
  """The BN / BatchNorm layer on conv1_1's output, if the file has BatchNorm."""
  return _after(net, _find(net, ("conv1_1",), path, kind)[0], ("BN", "BatchNorm"))


def infer_config(net: dict, kind: str, path="caffemodel") -> ModelConfig:
  """The ModelConfig a Caffe model of `kind` implies: width, fc_dim, fc_kernel, classes, BatchNorm."""
  _, conv1 = _out_channels(net, ("conv1_1",), path, kind)
  _, conv5 = _out_channels(net, ("conv5_3",), path, kind)
  _, fc6 = _out_channels(net, ("fc6",), path, kind)
  k = fc6.shape[2] if fc6.ndim == 4 else max(1, round(math.sqrt(fc6.shape[1] / conv5.shape[0])))
  fields = dict(width=conv1.shape[0] / 64, fc_dim=fc6.shape[0], fc_kernel=k, input_norm="caffe_bgr")
  if kind == "fcn8s":
    fields |= dict(arch="fcn8s", batch_norm=False,
                   num_classes=_out_channels(net, FCN8S_HEADS["score_fr"], path, kind)[1].shape[0])
  elif kind.startswith("deconvnet"):
    probe = _has_norm(net, path, kind)
    folded = probe is not None and probe[1].type == "BN" and (
        kind == "deconvnet" or probe[1].bn_mode == "INFERENCE")
    fields |= dict(batch_norm=probe is not None and not folded,
                   num_classes=_out_channels(net, DECONVNET_SCORE, path, kind)[1].shape[0])
  return ModelConfig(**fields)


def load_caffe(path, kind: str, config: ModelConfig | None = None, *, seed: int = 0,
               **overrides) -> tuple[ModelConfig, dict]:
  """(config, {"params", "batch_stats"} NumPy dicts) of a .caffemodel of `kind` (see KINDS).

  config: the network to fill; default `infer_config` of the file (for "vgg16", a
  DeconvNet with the file's widths), with `overrides` (ModelConfig fields) applied.
  "vgg16" fills the encoder of a model initialised with `seed`; the other kinds
  fill every parameter and refuse files with weights they have no place for.
  """
  if kind not in KINDS:
    raise ValueError(f"unknown Caffe model kind {kind!r}; choose one of {KINDS}")
  net = read_caffemodel(path)
  config = dataclasses.replace(config if config is not None else infer_config(net, kind, path),
                               **overrides)
  if config.input_norm != "caffe_bgr":
    raise CaffeError(f"{path}: Caffe models read BGR 0-255 minus the mean; build the model "
                     "with input_norm='caffe_bgr'")
  want = {"fcn8s": "fcn8s", "vgg16": config.arch}.get(kind, "deconvnet")
  if config.arch != want:
    raise CaffeError(f"{path}: a {kind} model needs arch={want!r}, the configuration has "
                     f"{config.arch!r}")
  # A DeconvNet without BatchNorm is imported with it, then folded (batchnorm.fold).
  fold = kind.startswith("deconvnet") and not config.batch_norm and _has_norm(net, path, kind)
  target = dataclasses.replace(config, batch_norm=True) if fold else config
  try:
    model = nnx.eval_shape(lambda: build_model(target, seed))
  except ValueError as e:
    raise CaffeError(f"{path}: {e} ({_describe(config)})") from e
  init = traverse_util.flatten_dict(get_variables(model), sep="/")
  m = LayerMapper(net, {k: v.shape for k, v in init.items()}, path, kind, target)
  MAPPINGS[kind](m)
  if kind == "vgg16":
    # It keeps initialised layers, built only now that the file's layers fit: a few bytes of a
    # hostile file could otherwise ask for a network of any width.
    init = traverse_util.flatten_dict(get_variables(build_model(target, seed)), sep="/")
  if kind != "vgg16":
    unused = [n for n, layer in net.items() if layer.blobs and n not in m.used]
    if unused:
      raise CaffeError(f"{path}: layers {abbreviated(unused)} hold weights a {kind} model has no place "
                       "for; is the kind right?")
    missing = sorted(init.keys() - m.out.keys())
    assert not missing, missing
  flat = {k: np.asarray(v, np.float32) for k, v in init.items()} if kind == "vgg16" else {}
  variables = traverse_util.unflatten_dict(flat | m.out, sep="/")
  variables.setdefault("batch_stats", {})
  if fold:
    if m.without_statistics:
      raise CaffeError(f"{path}: {m.without_statistics[0]!r} holds gamma/beta without statistics (a "
                       "training snapshot), which cannot be folded; import with batch_norm=True")
    _, variables = batchnorm.fold(target, variables)
  return config, variables


def convert_caffe(path, kind: str, out, config: ModelConfig | None = None, *, class_names=None,
                  seed: int = 0, **overrides) -> ModelConfig:
  """Imports a .caffemodel and writes it as step 0 of a train.py-style work dir `out`.

  `infer.py --checkpoint OUT` and `train.py --init-from OUT` read it. The import
  is validated before anything is written, and the work dir appears only complete.
  """
  check_new_dir(out)
  config, variables = load_caffe(path, kind, config, seed=seed, **overrides)
  if class_names is None:
    class_names = (VOC_CLASSES if config.num_classes == len(VOC_CLASSES)
                   else [f"class_{i}" for i in range(config.num_classes)])
  meta = model_meta(config, class_names, step=0, source={"caffemodel": str(path), "kind": kind})
  write_checkpoint(out, variables, meta)
  return config


def _describe(config: ModelConfig) -> str:
  return (f"the configuration has arch={config.arch}, width={config.width}, fc_dim={config.fc_dim}, "
          f"fc_kernel={config.fc_kernel}, num_classes={config.num_classes}")
