"""VGG16 encoder, DeconvNet and FCN-8s as Flax NNX modules (NHWC).

Layer names follow the paper and the reference prototxts (conv1_1 ... fc7,
fc6_deconv, deconv5_1 ... deconv1_2, score; FCN's score_fr, upscore2, ...), so
that weight import and checkpoints read as the paper does.

Kernel layouts: convolutions are HWIO. Transposed convolutions ("deconv") keep
PyTorch's ConvTranspose2d / Caffe's Deconvolution layout [in, out, kh, kw] and
semantics (`out[y + p, x + q] += in[p, q] @ K[:, :, y, x]`), so those weights
load unchanged; in that layout fc6-deconv on a 1x1 map is one plain matmul.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deconvnet_jax.configs import ModelConfig
from deconvnet_jax.conv import conv2d, conv_transpose2d, matmul
from deconvnet_jax.norm_relu import batch_norm_relu
from deconvnet_jax.ops import max_pool_with_argmax, max_unpool

VGG16_PLAN = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
# Decoder stage 5 first: unpool with pool5's argmax, then these deconvs.
DECODER_PLAN = ((512, 512, 512), (512, 512, 256), (256, 256, 128), (128, 64), (64, 64))
# Names of DeconvNet.decoder_activations in decoder order (jit returns dicts key-sorted).
DECODER_ACTIVATIONS = tuple(f"{kind}{s}" for s in range(5, 0, -1) for kind in ("unpool", "deconv"))


def host_normal(std_of_shape):
  """An initializer drawing N(0, std^2) with NumPy on the host, seeded by the JAX key it is given.

  jax.random compiles one XLA program per parameter shape, 0.3-0.8 s each on a
  CPU, so a DeconvNet of any width took 27 s to build, nearly all of it
  compiling. NumPy draws the paper network's 252 M values in about 5 s and the
  small one's in well under a second. The draw depends on the key alone (so on
  `build_model`'s seed), the same on every host.
  """
  def draw(key_data, shape: tuple[int, ...]) -> np.ndarray:
    values = np.random.default_rng(np.asarray(key_data).ravel()).standard_normal(shape, np.float32)
    values *= np.float32(std_of_shape(shape))
    return values

  def init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    if isinstance(key, jax.core.Tracer):  # under jit or eval_shape: the same draw, called back on the host
      out = jax.ShapeDtypeStruct(shape, jnp.float32)
      return jax.pure_callback(partial(draw, shape=shape), out, jax.random.key_data(key)).astype(dtype)
    return jnp.asarray(draw(jax.random.key_data(key), shape), dtype)
  return init


# He et al.'s fan-in normal for HWIO kernels (fan_in = kh * kw * in), and the reference's N(0, 0.01^2).
he_normal = host_normal(lambda shape: np.sqrt(2.0 / np.prod(shape[:-1])))
gaussian = host_normal(lambda shape: 0.01)


def _dtype(config: ModelConfig):
  return jnp.dtype(config.dtype)


def bilinear_kernel(key, shape, dtype=jnp.float32):
  """[C, C, k, k] deconvolution kernel that upsamples each channel bilinearly (FCN's init)."""
  del key
  cin, cout, k, _ = shape
  factor = (k + 1) // 2
  center = factor - 1 if k % 2 == 1 else factor - 0.5
  og = np.arange(k)
  filt = 1 - np.abs(og - center) / factor
  weights = np.zeros(shape, np.float32)
  diagonal = np.arange(min(cin, cout))
  weights[diagonal, diagonal] = np.outer(filt, filt)
  return jnp.asarray(weights, dtype)


class Conv(nnx.Module):
  """k x k stride-1 convolution with `pad` zeros each side, HWIO kernel and a bias (nnx.Conv's state),
  through `conv.conv2d` and its fast weight gradient."""

  def __init__(self, cin: int, cout: int, k: int, *, pad: int = 0, dtype, kernel_init, rngs: nnx.Rngs):
    self.kernel = nnx.Param(kernel_init(rngs.params(), (k, k, cin, cout)))  # HWIO
    self.bias = nnx.Param(jnp.zeros((cout,)))
    self.pad, self.dtype = pad, dtype

  def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, cin] -> [B, H+2p-k+1, W+2p-k+1, cout]
    y = conv2d(x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.pad)
    return y + self.bias[...].astype(self.dtype)


class FullyConv(nnx.Module):
  """A k x k VALID convolution: fc6 (7x7) and fc7 (1x1) of VGG16 as convolutions.

  Computed as one matmul of the input's k x k patches: on a k x k input (the
  224x224 crops) the input itself, on the 6x10 positions of a 384x512 image's
  pool5 a [60, 25088] patch matrix. oneDNN's 7x7 convolution took 297 / 213 ms
  there (float32 / bfloat16, 2-core AMD EPYC), the matmul 107 / 53.
  """

  def __init__(self, cin: int, cout: int, k: int, *, dtype, kernel_init, rngs: nnx.Rngs):
    self.kernel = nnx.Param(kernel_init(rngs.params(), (k, k, cin, cout)))  # HWIO
    self.bias = nnx.Param(jnp.zeros((cout,)))
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, cin] -> [B, H-k+1, W-k+1, cout]
    k, _, cin, cout = self.kernel.shape
    x, kernel = x.astype(self.dtype), self.kernel[...]  # the kernel as it is: see conv.matmul
    b, h, w, _ = x.shape
    ho, wo = h - k + 1, w - k + 1
    if (ho, wo) != (1, 1):  # patches [B, H', W', k*k*cin], in the kernel's (row, column, channel) order
      x = jnp.concatenate([x[:, i:i + ho, j:j + wo] for i in range(k) for j in range(k)], -1)
    y = matmul(x.reshape(b * ho * wo, k * k * cin), kernel.reshape(k * k * cin, cout))
    return y.reshape(b, ho, wo, cout) + self.bias[...].astype(self.dtype)


class Deconv(nnx.Module):
  """Transposed convolution with Caffe/PyTorch semantics: out = (in - 1) * stride + k - 2 * pad."""

  def __init__(self, cin: int, cout: int, k: int, *, stride: int = 1, pad: int = 0,
               use_bias: bool = True, dtype, kernel_init, rngs: nnx.Rngs):
    self.kernel = nnx.Param(kernel_init(rngs.params(), (cin, cout, k, k)))  # [in, out, kh, kw]
    self.bias = nnx.Param(jnp.zeros((cout,))) if use_bias else None
    self.stride, self.pad, self.dtype = stride, pad, dtype

  @property
  def matmul_form(self) -> bool:
    """Stride 1 and no padding (fc6-deconv): computed as one matmul, with the kernel as it is."""
    return self.stride == 1 and self.pad == 0

  def __call__(self, x: jax.Array) -> jax.Array:
    cin, cout, k, _ = self.kernel.shape
    x = x.astype(self.dtype)
    if self.matmul_form:
      # fc6-deconv (the only such layer): one [B*h*w, in] @ [in, out*k*k] matmul, each position's k x k
      # block then added at its offset (on the 1x1 map of 224x224 crops, the block is the output). oneDNN's 7x7
      # transposed convolution took 342 / 320 ms (float32 / bfloat16) from a 384x512 image's 6x10 map,
      # this 89 / 60, on a 2-core AMD EPYC.
      b, h, w, _ = x.shape
      kernel = self.kernel[...].reshape(cin, cout * k * k)  # as it is: see conv.matmul
      y = matmul(x.reshape(-1, cin), kernel).reshape(b, h, w, cout, k, k)
      if (h, w) == (1, 1):
        y = y[:, 0, 0].transpose(0, 2, 3, 1)
      else:
        shift = lambda a, axis, i: jnp.pad(a, [(i, k - 1 - i) if d == axis else (0, 0) for d in range(4)])
        rows = [sum(shift(y[..., i, j].astype(jnp.float32), 2, j) for j in range(k)) for i in range(k)]
        y = sum(shift(row, 1, i) for i, row in enumerate(rows)).astype(self.dtype)  # [B, h+k-1, w+k-1, out]
    elif self.stride == 1:
      y = conv_transpose2d(x, self.kernel[...].astype(self.dtype), self.pad)
    else:
      # A transposed conv is a conv of the stride-dilated input, padded by
      # k - 1 - pad, with the spatially flipped kernel.
      p = k - 1 - self.pad
      y = jax.lax.conv_general_dilated(
          x, self.kernel[...].astype(self.dtype)[:, :, ::-1, ::-1], (1, 1), ((p, p), (p, p)),
          lhs_dilation=(self.stride, self.stride),
          dimension_numbers=("NHWC", "IOHW", "NHWC"))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class Block(nnx.Module):
  """layer -> BatchNorm (if configured) -> ReLU."""

  def __init__(self, layer: nnx.Module, features: int, config: ModelConfig, rngs: nnx.Rngs):
    self.layer = layer
    self.bn = nnx.BatchNorm(
        features, momentum=config.bn_momentum, epsilon=config.bn_epsilon,
        dtype=_dtype(config), rngs=rngs) if config.batch_norm else None

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.layer(x)
    bn = self.bn
    if bn is None or bn.use_running_average:
      return nnx.relu(x if bn is None else bn(x))
    # Training: flax's BatchNorm then ReLU, as one op with a written-out gradient (norm_relu.py).
    y, mean, var = batch_norm_relu(x, bn.scale[...], bn.bias[...], bn.epsilon)
    bn.mean[...] = bn.momentum * bn.mean[...] + (1 - bn.momentum) * jax.lax.stop_gradient(mean)
    bn.var[...] = bn.momentum * bn.var[...] + (1 - bn.momentum) * jax.lax.stop_gradient(var)
    return y


def conv3x3(cin, cout, config, rngs, pad=1, kernel_init=he_normal):
  return Conv(cin, cout, 3, pad=pad, dtype=_dtype(config), kernel_init=kernel_init, rngs=rngs)


class VGG16(nnx.Module):
  """conv1_1 ... conv5_3 with ceil-mode argmax pooling, then fc6 and fc7 as convolutions."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs, first_pad: int = 1):
    cin = 3
    for s, plan in enumerate(VGG16_PLAN, start=1):
      for i, cout in enumerate(plan, start=1):
        cout = config.channels(cout)
        pad = first_pad if (s, i) == (1, 1) else 1
        setattr(self, f"conv{s}_{i}", Block(conv3x3(cin, cout, config, rngs, pad), cout, config, rngs))
        cin = cout
    fc, k, dt = config.fc_dim, config.fc_kernel, _dtype(config)
    self.fc6 = Block(FullyConv(cin, fc, k, dtype=dt, kernel_init=he_normal, rngs=rngs), fc, config, rngs)
    self.fc7 = Block(FullyConv(fc, fc, 1, dtype=dt, kernel_init=he_normal, rngs=rngs), fc, config, rngs)
    self.fc_kernel = k

  def features(self, x: jax.Array) -> list[tuple[jax.Array, jax.Array, tuple[int, int]]]:
    """[B, H, W, 3] -> per pool stage (pooled [B, h, w, C], argmax indices, pre-pool (H, W))."""
    pools = []
    for s, plan in enumerate(VGG16_PLAN, start=1):
      for i in range(1, len(plan) + 1):
        x = getattr(self, f"conv{s}_{i}")(x)
        hw = x.shape[1:3]
      x, indices = max_pool_with_argmax(x)
      pools.append((x, indices, hw))
    return pools

  def fc(self, x: jax.Array) -> jax.Array:  # pool5 [B, h, w, C] -> [B, h-k+1, w-k+1, fc_dim]
    return self.fc7(self.fc6(x))


def min_input_size(config: ModelConfig) -> int:
  """Smallest input side whose pool5 map still covers the fc6 kernel."""
  return 32 * (config.fc_kernel - 1) + 1


class DeconvNet(nnx.Module):
  """VGG16 encoder, fc6/fc7, fc6-deconv, and a mirrored unpool + deconv decoder.

  __call__: normalised images [B, H, W, 3] -> class logits [B, H, W, num_classes] float32.
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    if config.arch != "deconvnet":
      raise ValueError(f"DeconvNet needs arch='deconvnet', got {config.arch!r}")
    self.config = config
    dt = _dtype(config)
    self.encoder = VGG16(config, rngs)
    c5 = config.channels(512)
    self.fc6_deconv = Block(
        Deconv(config.fc_dim, c5, config.fc_kernel, dtype=dt, kernel_init=gaussian, rngs=rngs),
        c5, config, rngs)
    cin = c5
    for s, plan in zip(range(5, 0, -1), DECODER_PLAN):
      for i, cout in enumerate(plan, start=1):
        cout = config.channels(cout)
        layer = Deconv(cin, cout, 3, pad=1, dtype=dt, kernel_init=gaussian, rngs=rngs)
        setattr(self, f"deconv{s}_{i}", Block(layer, cout, config, rngs))
        cin = cout
    self.score = Conv(cin, config.num_classes, 1, dtype=dt, kernel_init=gaussian, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.score(self._decode(x)).astype(jnp.float32)

  def decoder_activations(self, x: jax.Array) -> dict[str, jax.Array]:
    """The paper's analysis maps: {"unpool5", "deconv5", ..., "unpool1", "deconv1"}, each [B, h, w, C].

    "deconvS" is the output of stage S's last deconv block, "unpoolS" its input.
    """
    activations = {}
    self._decode(x, activations)
    return activations

  def _decode(self, x: jax.Array, activations: dict | None = None) -> jax.Array:
    """[B, H, W, 3] -> deconv1_2 features [B, H, W, C1]; fills `activations` if given."""
    check_input_size(x, self.config)
    pools = self.encoder.features(x)
    x = self.fc6_deconv(self.encoder.fc(pools[-1][0]))  # [B, h5, w5, C5]
    for s, plan in zip(range(5, 0, -1), DECODER_PLAN):
      _, indices, hw = pools[s - 1]
      x = max_unpool(x, indices, hw, self.config.unpool_method)  # sparse: one nonzero per window
      if activations is not None:
        activations[f"unpool{s}"] = x
      for i in range(1, len(plan) + 1):
        x = getattr(self, f"deconv{s}_{i}")(x)
      if activations is not None:
        activations[f"deconv{s}"] = x
    return x


def check_input_size(x: jax.Array, config: ModelConfig):
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f"expected images [B, H, W, 3], got shape {x.shape}")
  if config.arch == "deconvnet" and min(x.shape[1:3]) < min_input_size(config):
    raise ValueError(
        f"input {x.shape[1]}x{x.shape[2]} is too small: with fc_kernel={config.fc_kernel} "
        f"DeconvNet needs at least {min_input_size(config)} pixels per side")


def _crop(x: jax.Array, offset: int, hw: tuple[int, int]) -> jax.Array:
  """Caffe's Crop layer: x[:, offset:offset + H, offset:offset + W]."""
  return x[:, offset:offset + hw[0], offset:offset + hw[1]]


class FCN8s(nnx.Module):
  """FCN-8s (Long et al.) on VGG16, with the reference's 100-pixel pad and crop offsets.

  __call__: normalised images [B, H, W, 3] -> class logits [B, H, W, num_classes] float32.
  """

  # Crop offsets of the reference fcn8s prototxt, valid for the 100-pixel pad.
  POOL4_OFFSET, POOL3_OFFSET, OUTPUT_OFFSET = 5, 9, 31

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    if config.arch != "fcn8s" or config.fc_kernel != 7:
      raise ValueError("FCN8s needs arch='fcn8s' and fc_kernel=7 (its crop offsets assume both)")
    self.config = config
    n, dt = config.num_classes, _dtype(config)
    zeros = nnx.initializers.zeros
    self.encoder = VGG16(config, rngs, first_pad=100)
    self.score_fr = Conv(config.fc_dim, n, 1, dtype=dt, kernel_init=zeros, rngs=rngs)
    self.score_pool4 = Conv(config.channels(512), n, 1, dtype=dt, kernel_init=zeros, rngs=rngs)
    self.score_pool3 = Conv(config.channels(256), n, 1, dtype=dt, kernel_init=zeros, rngs=rngs)
    up = dict(use_bias=False, dtype=dt, kernel_init=bilinear_kernel, rngs=rngs)
    self.upscore2 = Deconv(n, n, 4, stride=2, **up)
    self.upscore_pool4 = Deconv(n, n, 4, stride=2, **up)
    self.upscore8 = Deconv(n, n, 16, stride=8, **up)

  def __call__(self, x: jax.Array) -> jax.Array:
    check_input_size(x, self.config)
    hw = x.shape[1:3]
    pools = self.encoder.features(x)
    up2 = self.upscore2(self.score_fr(self.encoder.fc(pools[4][0])))
    x = up2 + _crop(self.score_pool4(pools[3][0]), self.POOL4_OFFSET, up2.shape[1:3])
    up4 = self.upscore_pool4(x)
    x = up4 + _crop(self.score_pool3(pools[2][0]), self.POOL3_OFFSET, up4.shape[1:3])
    return _crop(self.upscore8(x), self.OUTPUT_OFFSET, hw).astype(jnp.float32)


def forward_flops(config: ModelConfig, size: int) -> float:
  """DeconvNet: 2 x multiply-adds of every conv / deconv / fc layer for one size x size image."""
  flops, h, cin = 0.0, size, 3
  stage_sizes = []
  for plan in VGG16_PLAN:
    stage_sizes.append(h)
    for cout in plan:
      cout = config.channels(cout)
      flops += 2 * h * h * 9 * cin * cout
      cin = cout
    h = (h + 1) // 2
  k, fc = config.fc_kernel, config.fc_dim
  fc_out = h - k + 1
  flops += 2 * fc_out**2 * k * k * cin * fc + 2 * fc_out**2 * fc * fc  # fc6, fc7
  flops += 2 * fc_out**2 * k * k * fc * cin  # fc6-deconv
  for h, plan in zip(reversed(stage_sizes), DECODER_PLAN):
    for cout in plan:
      cout = config.channels(cout)
      flops += 2 * h * h * 9 * cin * cout
      cin = cout
  flops += 2 * size * size * cin * config.num_classes  # score
  return flops


def build_model(config: ModelConfig, seed: int = 0) -> DeconvNet | FCN8s:
  """A freshly initialised model for the configuration."""
  cls = DeconvNet if config.arch == "deconvnet" else FCN8s
  return cls(config, rngs=nnx.Rngs(seed))


def with_compute_dtype(model: nnx.Module) -> nnx.Module:
  """For inference: the model with each convolution's and transposed convolution's kernel and bias held in the
  dtype it computes in.

  These layers cast them on every call, so the function is the same; in
  bfloat16 the casts leave the forward. fc6, fc7 and fc6-deconv keep theirs: their
  matmuls take float32 weights as they are (`conv.matmul`). A copy where anything
  changes (training keeps float32 weights); else the model itself.
  """
  casts = lambda layer: isinstance(layer, Conv) or isinstance(layer, Deconv) and not layer.matmul_form
  layers = lambda m: [(layer, name) for _, layer in nnx.iter_modules(m) if casts(layer)
                      for name in ("kernel", "bias") if getattr(layer, name) is not None
                      and getattr(layer, name)[...].dtype != layer.dtype]
  if not layers(model):
    return model
  model = nnx.clone(model)
  for layer, name in layers(model):
    setattr(layer, name, nnx.Param(getattr(layer, name)[...].astype(layer.dtype)))
  return model


def get_variables(model: nnx.Module) -> dict:
  """{"params": ..., "batch_stats": ...} as plain nested dicts of arrays (orbax- and Flax-ready)."""
  return {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param)),
          "batch_stats": nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))}


def set_variables(model: nnx.Module, variables: dict, source: str = "variables"):
  """Loads `get_variables`-style dicts into `model` in place; a shape mismatch names the layer."""
  for collection, kind in (("params", nnx.Param), ("batch_stats", nnx.BatchStat)):
    state = nnx.state(model, kind)
    expected = dict(_flatten(nnx.to_pure_dict(state)))
    found = dict(_flatten(variables.get(collection, {})))
    missing, extra = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    if missing or extra:
      raise ValueError(f"{source}: {collection} do not match the model: "
                       f"missing {abbreviated(missing)}, unexpected {abbreviated(extra)}")
    wrong = [f"{name} has shape {tuple(np.shape(value))}, the model expects "
             f"{tuple(expected[name].shape)}" for name, value in found.items()
             if tuple(np.shape(value)) != tuple(expected[name].shape)]
    if wrong:
      raise ValueError(f"{source}: {collection} {abbreviated(wrong)} (another class count or width?)")
    nnx.replace_by_pure_dict(state, variables[collection])
    nnx.update(model, state)


def abbreviated(items: list, n: int = 5) -> str:
  """The first n items, comma-separated, and how many more there are."""
  return ", ".join(map(str, items[:n])) + (f" and {len(items) - n} more" if len(items) > n else "")


def _flatten(tree: dict, prefix: str = ""):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flatten(value, f"{prefix}{key}/")
    else:
      yield f"{prefix}{key}", value
