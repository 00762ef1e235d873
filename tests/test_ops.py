"""Pooling with argmax and unpooling against a NumPy loop and PyTorch's kernels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deconvnet_jax.ops import max_pool_with_argmax, max_unpool

METHODS = ["select", "scatter"]
SHAPES = [(2, 6, 8, 3), (1, 7, 5, 2), (3, 1, 1, 4), (1, 9, 9, 1)]


def pool_reference(x):
  """NumPy loop: 2x2/2 ceil-mode max pool, first maximum (row-major) wins."""
  b, h, w, c = x.shape
  ho, wo = (h + 1) // 2, (w + 1) // 2
  values = np.zeros((b, ho, wo, c), x.dtype)
  indices = np.zeros((b, ho, wo, c), np.int64)
  for n in range(b):
    for ch in range(c):
      for i in range(ho):
        for j in range(wo):
          best, where = -np.inf, 2 * i * w + 2 * j
          for r in range(2 * i, min(2 * i + 2, h)):
            for s in range(2 * j, min(2 * j + 2, w)):
              if x[n, r, s, ch] > best:
                best, where = x[n, r, s, ch], r * w + s
          values[n, i, j, ch], indices[n, i, j, ch] = best, where
  return values, indices


def unpool_reference(y, indices, hw):
  b, ho, wo, c = y.shape
  out = np.zeros((b, hw[0] * hw[1], c), y.dtype)
  for n in range(b):
    for ch in range(c):
      for i in range(ho):
        for j in range(wo):
          out[n, indices[n, i, j, ch], ch] = y[n, i, j, ch]
  return out.reshape(b, hw[0], hw[1], c)


def with_ties(shape, seed):
  """Few distinct values, so most windows hold ties; some -inf and huge negatives."""
  rng = np.random.default_rng(seed)
  x = rng.integers(-2, 2, size=shape).astype(np.float32)
  x[rng.random(shape) < 0.1] = -np.inf
  x[rng.random(shape) < 0.1] = -3.4e38
  return x


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ties", [False, True])
def test_pool_matches_numpy(shape, ties):
  x = with_ties(shape, 1) if ties else np.random.default_rng(0).normal(size=shape).astype(np.float32)
  values, indices = jax.jit(max_pool_with_argmax)(jnp.asarray(x))
  ref_values, ref_indices = pool_reference(x)
  assert values.dtype == jnp.float32 and indices.dtype == jnp.int32
  assert values.shape == ref_values.shape
  np.testing.assert_array_equal(np.asarray(values), ref_values)
  np.testing.assert_array_equal(np.asarray(indices), ref_indices)


def test_pool_all_minus_inf_picks_first_position():
  x = np.full((1, 3, 3, 1), -np.inf, np.float32)
  values, indices = max_pool_with_argmax(jnp.asarray(x))
  assert np.all(np.isneginf(values))
  np.testing.assert_array_equal(np.asarray(indices)[0, :, :, 0], [[0, 2], [6, 8]])


@pytest.mark.parametrize("shape", SHAPES)
def test_pool_gradient_goes_to_argmax_only(shape):
  x = with_ties(shape, 2)
  x[np.isinf(x)] = -5.0  # finite inputs so the cotangent is finite
  cot = np.random.default_rng(3).normal(size=pool_reference(x)[0].shape).astype(np.float32)
  grad = jax.grad(lambda v: jnp.sum(max_pool_with_argmax(v)[0] * cot))(jnp.asarray(x))
  _, ref_indices = pool_reference(x)
  np.testing.assert_array_equal(np.asarray(grad), unpool_reference(cot, ref_indices, shape[1:3]))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", SHAPES)
def test_unpool_and_its_gradient_match_numpy(method, shape):
  rng = np.random.default_rng(4)
  _, indices = pool_reference(with_ties(shape, 5))
  y = rng.normal(size=indices.shape).astype(np.float32)
  hw = shape[1:3]
  unpool = jax.jit(lambda v: max_unpool(v, jnp.asarray(indices, jnp.int32), hw, method))
  out = unpool(jnp.asarray(y))
  assert out.shape == shape and out.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out), unpool_reference(y, indices, hw))

  cot = rng.normal(size=shape).astype(np.float32)
  grad = jax.grad(lambda v: jnp.sum(unpool(v) * cot))(jnp.asarray(y))
  gather = np.take_along_axis(cot.reshape(shape[0], -1, shape[3]),
                              indices.reshape(shape[0], -1, shape[3]), axis=1)
  np.testing.assert_array_equal(np.asarray(grad), gather.reshape(indices.shape))


def test_unpool_rejects_mismatched_shapes():
  y = jnp.zeros((1, 3, 3, 2))
  with pytest.raises(ValueError, match="do not come from pooling a 8x8 map"):
    max_unpool(y, jnp.zeros((1, 3, 3, 2), jnp.int32), (8, 8))
  with pytest.raises(ValueError, match="method must be one of"):
    max_unpool(y, jnp.zeros((1, 3, 3, 2), jnp.int32), (6, 6), method="gather")


def test_matches_pytorch_convention():
  torch = pytest.importorskip("torch")
  x = with_ties((2, 7, 9, 3), 6)
  pool = torch.nn.MaxPool2d(2, 2, ceil_mode=True, return_indices=True)
  t_values, t_indices = pool(torch.from_numpy(x).permute(0, 3, 1, 2))
  values, indices = max_pool_with_argmax(jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(values), t_values.permute(0, 2, 3, 1).numpy())
  np.testing.assert_array_equal(np.asarray(indices), t_indices.permute(0, 2, 3, 1).numpy())

  t_out = torch.nn.functional.max_unpool2d(t_values, t_indices, 2, 2, output_size=(7, 9))
  out = max_unpool(values, indices, (7, 9))
  np.testing.assert_array_equal(np.asarray(out), t_out.permute(0, 2, 3, 1).numpy())
