"""Stride-1 convolution whose weight gradient is computed as k*k matmuls.

XLA's CPU backend computes a convolution's weight gradient as a convolution
over the whole batch and image, which is slow where the image is large and the
channels few: conv1_2's (224x224, 64 -> 64, batch 4) took 3.1 s against 0.12 s
for its forward on a 2-core AMD EPYC. The same gradient as k*k matmuls of
shifted input views against the output gradient,
`dW[i, j] = X_pad[:, i:i+H', j:j+W', :]^T @ dY`, took 0.46-0.54 s; at VGG's
other shapes the matmuls were 1.8-5.6x faster. They lose where the gradient is
small work: below 32 output channels (0.2-0.7x) and below about 100 MFLOP,
where the nine slices and matmuls cost more than they save (3x3, batch 8, 32
to 512 channels: 0.4-1.2x up to 38 MFLOP, 1.1-4.1x from 151 MFLOP). There,
and on other platforms than the CPU (whose convolution libraries are tuned for
this), the gradient stays XLA's own; so do the forward and the input gradient
everywhere.
"""

import math
from functools import partial

import jax
import jax.numpy as jnp

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")
# Output channels and weight-gradient FLOPs from which the matmuls are used on the CPU.
MATMUL_MIN_CHANNELS = 32
MATMUL_MIN_FLOPS = 1e8


def _conv(x: jax.Array, kernel: jax.Array, pad: int) -> jax.Array:
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((pad, pad), (pad, pad)), dimension_numbers=_DIMENSIONS)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv2d(x: jax.Array, kernel: jax.Array, pad: int) -> jax.Array:
  """[B, H, W, Ci] (*) [k, k, Ci, Co] HWIO, stride 1, `pad` zeros each side -> [B, H+2p-k+1, W+2p-k+1, Co]."""
  return _conv(x, kernel, pad)


def _forward(x, kernel, pad):
  return _conv(x, kernel, pad), (x, kernel)


def _backward(pad, residuals, g):
  x, kernel = residuals
  dx = jax.vjp(lambda x: _conv(x, kernel, pad), x)[1](g)[0]
  xla = lambda x, g: jax.vjp(lambda w: _conv(x, w, pad), kernel)[1](g)[0]
  if not uses_matmuls(kernel.shape, g.shape):
    return dx, xla(x, g)
  matmuls = lambda x, g: weight_gradient(x, g, kernel.shape, pad).astype(kernel.dtype)
  return dx, jax.lax.platform_dependent(x, g, cpu=matmuls, default=xla)


conv2d.defvjp(_forward, _backward)


def uses_matmuls(kernel_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> bool:
  """Whether the CPU weight gradient is `weight_gradient`'s: enough output channels and FLOPs."""
  kh, kw, ci, co = kernel_shape
  flops = 2 * math.prod(out_shape) * kh * kw * ci  # 2 * B*H'*W' * kh*kw*Ci*Co
  return co >= MATMUL_MIN_CHANNELS and flops >= MATMUL_MIN_FLOPS


def weight_gradient(x: jax.Array, g: jax.Array, shape: tuple[int, ...], pad: int) -> jax.Array:
  """d(sum(conv2d(x, W, pad) * g)) / dW, [kh, kw, Ci, Co] float32: one matmul per kernel tap."""
  kh, kw, ci, co = shape
  ho, wo = g.shape[1:3]
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  g2 = g.reshape(-1, co)  # [B*H'*W', Co]
  rows = [[jnp.matmul(xp[:, i:i + ho, j:j + wo, :].reshape(-1, ci).T, g2, preferred_element_type=jnp.float32)
           for j in range(kw)] for i in range(kh)]  # [Ci, B*H'*W'] @ [B*H'*W', Co] each
  return jnp.stack([jnp.stack(row) for row in rows])
