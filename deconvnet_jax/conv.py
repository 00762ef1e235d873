"""Stride-1 convolution and its gradients on the CPU: oneDNN's where installed, else XLA's with our matmuls.

With the onednn extra installed (`onednn.py`), the CPU's convolutions, both
gradients included, are oneDNN's custom calls, in float32 and bfloat16. What
follows is the path without it, which stays for other platforms' users and
for processes with several CPU devices.

XLA's CPU backend computes a convolution's weight gradient as a convolution
over the whole batch and image, which is slow where the image is large and the
channels few: conv1_2's (224x224, 64 -> 64, batch 4) took 3.1 s against 0.12 s
for its forward on a 2-core AMD EPYC. The same gradient as k*k matmuls of
shifted input views against the output gradient,
`dW[i, j] = X_pad[:, i:i+H', j:j+W', :]^T @ dY`, took 0.46-0.54 s; at VGG's
other shapes the matmuls were 1.8-5.6x faster. They lose where the gradient is
small work: below 32 output channels (0.2-0.7x) and below about 100 MFLOP,
where the nine slices and matmuls cost more than they save (3x3, batch 8, 32
to 512 channels: 0.4-1.2x up to 38 MFLOP, 1.1-4.1x from 151 MFLOP). A 1x1
kernel is one matmul with nothing to slice, and wins at any width: the score
layer's (224x224, 64 -> 21, batch 4) took 17 ms against XLA's 164. Below
100 MFLOP it saves under a millisecond (0.7 against 1.7 ms at 56x56, 32 -> 21)
and costs compile time (0.3-0.6 s on the small model's train step), so XLA's
stays there too. Elsewhere,
and on other platforms than the CPU (whose convolution libraries are tuned for
this), the gradient stays XLA's own; so do the forward and the input gradient
in float32.

bfloat16: XLA's CPU backend converts a bfloat16 convolution, and a matmul with
a bfloat16 result, to float32 before computing it, so `--dtype bfloat16` never
reached the CPU's bfloat16 units (avx512_bf16, AMX) and ran slower than
float32. A bfloat16 x bfloat16 matmul with a float32 result does reach them: a
2048^3 one ran at 330 GFLOP/s against 200 in float32 on a 2-core AMD EPYC with
avx512_bf16 (PyTorch's bfloat16: 288). So in bfloat16 on the CPU, convolutions
from TAP_MIN_CHANNELS input channels (forward and input gradient) are k*k such
matmuls of shifted views, summed in float32 (`tap_matmuls`), the weight
gradient's matmuls are kept in that form, and `matmul` does the same for fc6
and fc6-deconv. Below 256 channels the matmuls are too thin to win (conv1_2
and conv2_2, forward and gradients: 1.2-1.3x slower than XLA's).
"""

import math
from functools import partial

import jax
import jax.numpy as jnp

from deconvnet_jax import onednn

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")
# Output channels and weight-gradient FLOPs from which the matmuls are used on the CPU.
MATMUL_MIN_CHANNELS = 32
MATMUL_MIN_FLOPS = 1e8
# Input channels from which a bfloat16 convolution is `tap_matmuls` on the CPU.
TAP_MIN_CHANNELS = 256


def _xla_conv(x: jax.Array, kernel: jax.Array, pad: int) -> jax.Array:
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((pad, pad), (pad, pad)), dimension_numbers=_DIMENSIONS)


def _conv(x: jax.Array, kernel: jax.Array, pad: int) -> jax.Array:
  """XLA's convolution; on the CPU oneDNN's where it is installed, else in bfloat16 `tap_matmuls` where the
  input has enough channels."""
  if onednn.usable(pad, kernel, x):
    cpu = partial(onednn.conv, pad=pad)
  elif uses_tap_matmuls(x.dtype, kernel.shape):
    cpu = partial(tap_matmuls, pad=pad)
  else:
    return _xla_conv(x, kernel, pad)
  return jax.lax.platform_dependent(x, kernel, cpu=cpu, default=partial(_xla_conv, pad=pad))


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv2d(x: jax.Array, kernel: jax.Array, pad: int) -> jax.Array:
  """[B, H, W, Ci] (*) [k, k, Ci, Co] HWIO, stride 1, `pad` zeros each side -> [B, H+2p-k+1, W+2p-k+1, Co]."""
  return _conv(x, kernel, pad)


def _forward(x, kernel, pad):
  return _conv(x, kernel, pad), (x, kernel)


def _backward(pad, residuals, g):
  x, kernel = residuals
  xla_dx = lambda g, kernel: jax.vjp(lambda x: _xla_conv(x, kernel, pad), x)[1](g)[0]
  xla = lambda x, g: jax.vjp(lambda w: _xla_conv(x, w, pad), kernel)[1](g)[0]
  if onednn.usable(pad, kernel, x, g):
    dx = jax.lax.platform_dependent(g, kernel, cpu=lambda g, k: onednn.input_gradient(g, k, pad, x.shape),
                                    default=xla_dx)
    dw = lambda x, g: onednn.weight_gradient(x, g, kernel.shape, pad).astype(kernel.dtype)
    return dx, jax.lax.platform_dependent(x, g, cpu=dw, default=xla)
  flipped = kernel[::-1, ::-1].transpose(0, 1, 3, 2)  # [k, k, Co, Ci]
  if uses_tap_matmuls(g.dtype, flipped.shape):
    # The input gradient is the convolution of g, padded by k-1-pad, with the flipped, transposed kernel.
    kh, kw = kernel.shape[:2]
    g_pad = jax.lax.pad(g, jnp.zeros((), g.dtype), ((0, 0, 0), (kh - 1 - pad,) * 2 + (0,),
                                                    (kw - 1 - pad,) * 2 + (0,), (0, 0, 0)))
    dx = _conv(g_pad, flipped, 0)
  else:
    dx = xla_dx(g, kernel)
  if not uses_matmuls(kernel.shape, g.shape):
    return dx, xla(x, g)
  matmuls = lambda x, g: weight_gradient(x, g, kernel.shape, pad).astype(kernel.dtype)
  return dx, jax.lax.platform_dependent(x, g, cpu=matmuls, default=xla)


conv2d.defvjp(_forward, _backward)


def conv_transpose2d(x: jax.Array, kernel: jax.Array, pad: int) -> jax.Array:
  """Transposed convolution, stride 1: [B, H, W, Ci] with kernel [Ci, Co, k, k] (PyTorch's ConvTranspose2d
  weight), cropped by `pad` each side -> [B, H+k-1-2p, W+k-1-2p, Co].

  On oneDNN it is the input gradient of the convolution whose OIHW kernel that is, with no flipped copy of the
  kernel (the decoder's 13 flips took 69 of the paper forward's 2,500 ms, batch 4); elsewhere a `conv2d` of
  the flipped kernel.
  """
  if onednn.usable(pad, kernel, x, layout="OIHW"):
    return _onednn_transpose(x, kernel, pad)
  return _flipped_conv(x, kernel, pad)


def _flipped_conv(x: jax.Array, kernel: jax.Array, pad: int) -> jax.Array:
  """conv_transpose2d as a convolution padded by k - 1 - pad with the flipped kernel as HWIO."""
  k = kernel.shape[2]
  return conv2d(x, kernel[:, :, ::-1, ::-1].transpose(2, 3, 0, 1), k - 1 - pad)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _onednn_transpose(x: jax.Array, kernel: jax.Array, pad: int) -> jax.Array:
  (b, h, w, _), (_, co, k, _) = x.shape, kernel.shape
  shape = (b, h + k - 1 - 2 * pad, w + k - 1 - 2 * pad, co)
  return jax.lax.platform_dependent(
      x, kernel, cpu=lambda x, kernel: onednn.input_gradient(x, kernel, pad, shape, layout="OIHW"),
      default=partial(_flipped_conv, pad=pad))


def _transpose_forward(x, kernel, pad):
  return _onednn_transpose(x, kernel, pad), (x, kernel)


def _transpose_backward(pad, residuals, g):
  # The transposed convolution's gradients are the convolution's forward (dx) and its weight gradient with the
  # roles of input and output swapped (dkernel).
  x, kernel = residuals
  xla = lambda x, kernel, g: jax.vjp(lambda x, kernel: _flipped_conv(x, kernel, pad), x, kernel)[1](g)
  if not onednn.usable(pad, kernel, x, g, layout="OIHW"):
    return xla(x, kernel, g)
  dx = jax.lax.platform_dependent(g, kernel, cpu=lambda g, kernel: onednn.conv(g, kernel, pad, layout="OIHW"),
                                  default=lambda g, kernel: xla(x, kernel, g)[0])
  dw = lambda x, g: onednn.weight_gradient(g, x, kernel.shape, pad, layout="OIHW").astype(kernel.dtype)
  return dx, jax.lax.platform_dependent(x, g, cpu=dw, default=lambda x, g: xla(x, kernel, g)[1])


_onednn_transpose.defvjp(_transpose_forward, _transpose_backward)


def uses_matmuls(kernel_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> bool:
  """Whether the CPU weight gradient is `weight_gradient`'s: enough FLOPs, and enough output channels or a 1x1
  kernel (one matmul, no views to slice)."""
  kh, kw, ci, co = kernel_shape
  flops = 2 * math.prod(out_shape) * kh * kw * ci  # 2 * B*H'*W' * kh*kw*Ci*Co
  return flops >= MATMUL_MIN_FLOPS and (kh * kw == 1 or co >= MATMUL_MIN_CHANNELS)


def _matmul(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
  """Contracts a's axis contract[0] with b's axis contract[1] (2-D each), summed in float32, in a's dtype.

  Of two dtypes, b is cast to a's, except on the CPU: there the product is computed in the wider one
  (float32 weights of a bfloat16 network as they are; a float32 a is not rounded to a narrower b's).
  """
  dims = (((contract[0],), (contract[1],)), ((), ()))
  dot = lambda a, b: jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)
  if b.dtype == a.dtype:
    return dot(a, b).astype(a.dtype)
  wide = jnp.promote_types(a.dtype, b.dtype)
  out = jax.lax.platform_dependent(a, b, cpu=lambda a, b: dot(a.astype(wide), b.astype(wide)),
                                   default=lambda a, b: dot(a, b.astype(a.dtype)))
  return out.astype(a.dtype)


@jax.custom_vjp
def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  """[M, K] @ [K, N] summed in float32, in a's dtype, and so are both gradients; b's gradient in b's dtype.

  In bfloat16 the CPU runs these on its bfloat16 units: XLA converts both
  operands of a matmul with a bfloat16 result, or with one float32 operand, to float32 first.
  b may be wider than a: fc6's and fc6-deconv's float32 weights are passed as they are, not cast to
  bfloat16 on every step. On the CPU the cast of fc6-deconv's [4096, 512, 7, 7] kernel took 0.39 s
  of a 3.3 s train step (XLA's convert with the reshape to [4096, 25088] fused into it runs 7x slower than
  either alone), where the float32 matmul (batch 4) costs 25 ms.
  """
  return _matmul(a, b, (1, 0))


def _matmul_forward(a, b):
  return matmul(a, b), (a, b)


def _matmul_backward(residuals, g):
  a, b = residuals
  g = g.astype(a.dtype)
  return _matmul(g, b, (1, 1)), _matmul(a, g, (0, 0)).astype(b.dtype)  # g @ b^T, a^T @ g


matmul.defvjp(_matmul_forward, _matmul_backward)


def uses_tap_matmuls(dtype, kernel_shape: tuple[int, ...]) -> bool:
  """Whether a bfloat16 convolution runs as `tap_matmuls` on the CPU: enough input channels to feed a matmul."""
  return jnp.dtype(dtype) == jnp.bfloat16 and kernel_shape[2] >= TAP_MIN_CHANNELS


def tap_matmuls(x: jax.Array, kernel: jax.Array, pad: int) -> jax.Array:
  """The convolution as k*k bfloat16 matmuls of shifted views, summed in float32: [B, H', W', Co] in x.dtype.

  XLA's CPU convolution converts bfloat16 to float32 and back; its matmul with a
  float32 result runs on the CPU's bfloat16 units (avx512_bf16, AMX) where it has them.
  """
  kh, kw = kernel.shape[:2]
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  ho, wo = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
  taps = (jnp.einsum("bhwc,cd->bhwd", xp[:, i:i + ho, j:j + wo, :], kernel[i, j], preferred_element_type=jnp.float32)
          for i in range(kh) for j in range(kw))  # [B, H', W', Ci] @ [Ci, Co] each
  return sum(taps).astype(x.dtype)


def weight_gradient(x: jax.Array, g: jax.Array, shape: tuple[int, ...], pad: int) -> jax.Array:
  """d(sum(conv2d(x, W, pad) * g)) / dW, [kh, kw, Ci, Co] float32: one matmul per kernel tap."""
  kh, kw, ci, co = shape
  ho, wo = g.shape[1:3]
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  if uses_tap_matmuls(x.dtype, shape):
    # bfloat16: contracting the views' leading axes in place keeps the matmul on the bfloat16 units (a transposed
    # [Ci, B*H'*W'] operand is converted to float32 first).
    tap = lambda i, j: jnp.einsum("bhwc,bhwd->cd", xp[:, i:i + ho, j:j + wo, :], g, preferred_element_type=jnp.float32)
  else:
    g2 = g.reshape(-1, co)  # [B*H'*W', Co]
    tap = lambda i, j: jnp.matmul(xp[:, i:i + ho, j:j + wo, :].reshape(-1, ci).T, g2,
                                  preferred_element_type=jnp.float32)  # [Ci, B*H'*W'] @ [B*H'*W', Co]
  rows = [[tap(i, j) for j in range(kw)] for i in range(kh)]
  return jnp.stack([jnp.stack(row) for row in rows])
