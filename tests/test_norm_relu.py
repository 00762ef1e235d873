"""batch_norm_relu: flax's BatchNorm then ReLU in training, and its written-out gradient against float64 autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from deconvnet_jax.configs import model_config
from deconvnet_jax.models import Block, conv3x3
from deconvnet_jax.norm_relu import batch_norm_relu

EPS = 1e-5


def inputs(shape, seed=0):
  """x (mean 2, std 3: the centring matters), scale, bias, and cotangents for y, mean and var; float64 NumPy."""
  rng = np.random.default_rng(seed)
  c = shape[-1]
  return (rng.normal(size=shape) * 3 + 2, rng.uniform(0.5, 1.5, c), rng.normal(size=c) * 0.5,
          rng.normal(size=shape), rng.normal(size=c), rng.normal(size=c))


def plain(x, scale, bias):
  """BatchNorm on batch statistics, then ReLU, written plainly (autodiff gives its gradient)."""
  axes = tuple(range(x.ndim - 1))
  mean = x.mean(axes)
  var = jnp.maximum((x * x).mean(axes) - mean * mean, 0.0)
  return jnp.maximum((x - mean) / jnp.sqrt(var + EPS) * scale + bias, 0.0), mean, var


def objective(op, dy, d_mean, d_var):
  def f(x, scale, bias):
    y, mean, var = op(x, scale, bias)
    return jnp.sum(y * dy) + jnp.sum(mean * d_mean) + jnp.sum(var * d_var)
  return f


@pytest.mark.parametrize("shape", [(2, 5, 7, 3), (3, 4, 4, 16)])
def test_gradients_match_float64_autodiff_of_the_plain_formula(shape):
  x, scale, bias, dy, d_mean, d_var = inputs(shape)
  with jax.enable_x64(True):
    args64 = [jnp.asarray(a, jnp.float64) for a in (x, scale, bias)]
    want = jax.grad(objective(plain, dy, d_mean, d_var), argnums=(0, 1, 2))(*args64)
    want_y = plain(*args64)
    custom = lambda x, s, b: batch_norm_relu(x, s, b, EPS)
    check_grads(objective(custom, dy, d_mean, d_var), args64, order=1, modes=["rev"])  # finite differences
  args32 = [jnp.asarray(a, jnp.float32) for a in (x, scale, bias)]
  got = jax.jit(jax.grad(objective(custom, *(jnp.asarray(a, jnp.float32) for a in (dy, d_mean, d_var))),
                         argnums=(0, 1, 2)))(*args32)
  got_y = batch_norm_relu(*args32, EPS)
  assert got_y[0].dtype == jnp.float32 and got_y[1].shape == got_y[2].shape == (shape[-1],)
  for g, w in zip((*got_y, *got), (*want_y, *want)):
    assert g.shape == w.shape
    np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w), rtol=2e-5, atol=2e-5 * np.abs(w).max())


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2**-7)])
def test_training_block_is_flax_batchnorm_then_relu(dtype, tol):
  """A training Block (conv -> BN -> ReLU) gives flax's output and running statistics, and its gradients."""
  config = model_config("small", dtype=jnp.dtype(dtype).name)
  make = lambda: Block(conv3x3(3, 8, config, nnx.Rngs(0)), 8, config, nnx.Rngs(1))
  ours, flax_bn = make(), make()
  x = jnp.asarray(inputs((2, 9, 11, 3))[0], jnp.float32)
  ours.train()
  flax_bn.train()
  reference = lambda b, x: nnx.relu(b.bn(b.layer(x)))
  loss = lambda f: (lambda b, x: jnp.sum(f(b, x).astype(jnp.float32) ** 2))
  (y, grads), (y_ref, grads_ref) = ((f(b, x), nnx.grad(loss(f))(b, x))
                                    for f, b in ((lambda b, x: b(x), ours), (reference, flax_bn)))
  assert y.dtype == y_ref.dtype == dtype
  scale = float(jnp.max(jnp.abs(y_ref.astype(jnp.float32))))
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32), atol=tol * scale)
  for name in ("mean", "var"):
    np.testing.assert_allclose(getattr(ours.bn, name)[...], getattr(flax_bn.bn, name)[...], rtol=1e-5, atol=1e-6)
  flax_grads = dict(nnx.to_flat_state(nnx.state(grads_ref)))
  for path, g in nnx.to_flat_state(nnx.state(grads)):
    want = flax_grads[path][...]
    if path[-2:] == ("layer", "bias"):
      # BN cancels the conv bias: its gradient is zero up to the rounding of the summed input gradient.
      assert float(jnp.max(jnp.abs(g[...]))) < 4 * tol * float(jnp.max(jnp.abs(grads.layer.kernel[...])))
      continue
    np.testing.assert_allclose(np.asarray(g[...], np.float32), np.asarray(want, np.float32),
                               rtol=4 * tol, atol=4 * tol * float(jnp.max(jnp.abs(want))))
