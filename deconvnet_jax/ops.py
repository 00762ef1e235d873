"""Max pooling that records its argmax, and the unpooling that uses it.

Both follow PyTorch's `MaxPool2d(2, 2, ceil_mode=True, return_indices=True)` /
`MaxUnpool2d` convention on NHWC arrays: for every pooled value, the flat offset
`row * W + col` of the winning input pixel inside its (image, channel) plane;
ties go to the first maximum in row-major window order.
"""

import jax
import jax.numpy as jnp

# Window positions in row-major order: (row offset, col offset).
_WINDOW = ((0, 0), (0, 1), (1, 0), (1, 1))


def pooled_size(n: int) -> int:
  """Ceil-mode output length of a 2x2 / stride-2 pool over n pixels."""
  return (n + 1) // 2


def _pad_to_even(x: jax.Array, value) -> jax.Array:
  h, w = x.shape[1:3]
  return jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), constant_values=value)


def _window_slices(x: jax.Array) -> list[jax.Array]:
  """The four strided views of an even-sized [B, H, W, C] array, in _WINDOW order."""
  return [x[:, r::2, c::2, :] for r, c in _WINDOW]


def max_pool_with_argmax(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """2x2 / stride-2 ceil-mode max pool.

  x: [B, H, W, C] -> (values [B, ceil(H/2), ceil(W/2), C] in x.dtype,
                      indices of the same shape, int32, `row * W + col`).
  The gradient flows to the argmax position only.
  """
  h, w = x.shape[1:3]
  # Padding is never strictly greater than a real value, so it never wins; the
  # top-left pixel of every window is always real.
  views = _window_slices(_pad_to_even(x, -jnp.inf))
  best, pos = views[0], jnp.zeros(views[0].shape, jnp.int32)
  for k, v in enumerate(views[1:], start=1):
    # Strict: the first maximum wins ties. NaN wins as in PyTorch's kernel.
    better = (v > best) | jnp.isnan(v)
    best = jnp.where(better, v, best)
    pos = jnp.where(better, k, pos)
  ho, wo = best.shape[1:3]
  rows = 2 * jnp.arange(ho, dtype=jnp.int32)[:, None, None] + pos // 2  # [B, ho, wo, C]
  cols = 2 * jnp.arange(wo, dtype=jnp.int32)[:, None] + pos % 2
  return best, rows * w + cols


def _unpool_select(y: jax.Array, indices: jax.Array, output_hw: tuple[int, int]) -> jax.Array:
  """Unpool by selecting, per 2x2 window, the slot the index names (no scatter)."""
  b, ho, wo, c = y.shape
  h, w = output_hw
  # Position inside the window, recovered from the flat offset.
  pos = 2 * (indices // w % 2) + indices % w % 2  # [B, ho, wo, C]
  zero = jnp.zeros((), y.dtype)
  slots = [jnp.where(pos == k, y, zero) for k in range(4)]
  out = jnp.stack(slots, axis=3).reshape(b, ho, wo, 2, 2, c)  # [B, ho, wo, dr, dc, C]
  out = out.transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * ho, 2 * wo, c)
  return out[:, :h, :w, :]


def _unpool_scatter(y: jax.Array, indices: jax.Array, output_hw: tuple[int, int]) -> jax.Array:
  """Unpool with one scatter into the flattened output."""
  b, ho, wo, c = y.shape
  h, w = output_hw
  batch = jnp.arange(b, dtype=jnp.int32)[:, None, None, None]
  chan = jnp.arange(c, dtype=jnp.int32)
  flat = (batch * (h * w) + indices) * c + chan  # NHWC offset of each winner
  out = jnp.zeros((b * h * w * c,), y.dtype)
  out = out.at[flat.reshape(-1)].set(y.reshape(-1), unique_indices=True)
  return out.reshape(b, h, w, c)


_UNPOOL = {"select": _unpool_select, "scatter": _unpool_scatter}


def max_unpool(
    y: jax.Array,
    indices: jax.Array,
    output_hw: tuple[int, int],
    method: str = "select",
) -> jax.Array:
  """Puts each pooled value back at its recorded position, zeros elsewhere.

  y, indices: [B, ho, wo, C] from `max_pool_with_argmax` on an [B, H, W, C] input;
  output_hw: (H, W). Returns [B, H, W, C]; the gradient is the matching gather.
  `method` picks between two equal formulations ("select" is faster; see bench.py).
  """
  h, w = output_hw
  if y.shape != indices.shape or y.shape[1:3] != (pooled_size(h), pooled_size(w)):
    raise ValueError(
        f"max_unpool: values {y.shape} and indices {indices.shape} do not come from "
        f"pooling a {h}x{w} map (expected [B, {pooled_size(h)}, {pooled_size(w)}, C])")
  if method not in _UNPOOL:
    raise ValueError(f"max_unpool: method must be one of {sorted(_UNPOOL)}, got {method!r}")
  return _UNPOOL[method](y, indices, (h, w))
