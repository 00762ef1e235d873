"""BatchNorm on the batch's statistics, then ReLU: one op with its gradient written out.

Every conv and deconv of DeconvNet is followed by BatchNorm and ReLU. Autodiff of
flax's BatchNorm then ReLU leaves XLA's CPU backend separate reductions and
elementwise passes over each activation, several of them in the backward, and
keeps the ReLU's output for its gradient. This op makes the passes the math
needs: forward, one for both moments and one for the output; backward, one for
the two sums and one for the input gradient, the ReLU mask recomputed from x.
On a 2-core AMD EPYC (Zen 3), forward and gradient of one 4x224x224x64
activation took 34 ms against 77 for autodiff (4x56x56x256: 10.6 against 25).

The statistics are flax's `nnx.BatchNorm` ones (float32, biased variance as
E[x^2] - E[x]^2, clipped at 0), so results match it followed by ReLU to float32
rounding. Under a sharded batch the sums are global: XLA inserts the reductions
across devices, as it does for flax's.
"""

from functools import partial

import jax
import jax.numpy as jnp


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_relu(x: jax.Array, scale: jax.Array, bias: jax.Array,
                    epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """x [..., C], scale and bias [C] -> (relu(BN(x)) in x.dtype, batch mean [C], batch variance [C] in at least float32)."""
  return _forward(x, scale, bias, epsilon)[0]


def _wide(a: jax.Array) -> jax.Array:
  """a in at least float32: the statistics and sums of a bfloat16 network are float32, as flax's."""
  return a.astype(jnp.promote_types(a.dtype, jnp.float32))


def _normalized(x, mean, rstd, scale, bias):  # -> (x - mean) * rstd [..., C] and the pre-ReLU value, >= float32
  x_hat = (_wide(x) - mean) * rstd
  return x_hat, x_hat * _wide(scale) + _wide(bias)


def _forward(x, scale, bias, epsilon):
  axes = tuple(range(x.ndim - 1))
  xw = _wide(x)
  mean = jnp.mean(xw, axes)
  var = jnp.maximum(jnp.mean(xw * xw, axes) - mean * mean, 0.0)
  rstd = jax.lax.rsqrt(var + epsilon)
  y = jnp.maximum(_normalized(x, mean, rstd, scale, bias)[1], 0.0).astype(x.dtype)
  return (y, mean, var), (x, scale, bias, mean, rstd)


def _backward(epsilon, residuals, cotangents):
  x, scale, bias, mean, rstd = residuals
  dy, d_mean, d_var = cotangents
  axes, m = tuple(range(x.ndim - 1)), x.size // x.shape[-1]
  x_hat, pre = _normalized(x, mean, rstd, scale, bias)
  g = jnp.where(pre > 0, _wide(dy), 0.0)  # [..., C] gradient at the BN output
  d_bias, d_scale = jnp.sum(g, axes), jnp.sum(g * x_hat, axes)
  # Through x_hat, whose mean and rstd depend on x: scale * rstd * (g - mean(g) - x_hat * mean(g * x_hat)); and
  # through the returned statistics: d_mean / m and d_var * 2 (x - mean) / m.
  a = _wide(scale) * rstd
  dx = a * (g - d_bias / m - x_hat * (d_scale / m)) + d_mean / m + x_hat * (2 * d_var / (m * rstd))
  return dx.astype(x.dtype), d_scale.astype(scale.dtype), d_bias.astype(bias.dtype)


batch_norm_relu.defvjp(_forward, _backward)
