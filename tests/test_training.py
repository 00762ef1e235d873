"""Loss against NumPy, and the sharded step on 8 simulated devices against 1 device."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np

from deconvnet_jax import configs, training
from deconvnet_jax.models import build_model
from deconvnet_jax.training import cross_entropy


def test_cross_entropy_ignores_void_pixels():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 4, 6)).astype(np.float32)
  labels = rng.integers(0, 6, size=(2, 5, 4))
  labels[rng.random(labels.shape) < 0.3] = 255
  loss, acc = cross_entropy(jnp.asarray(logits), jnp.asarray(labels, jnp.int32))
  z = logits.astype(np.float64)
  logp = z - z.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  valid = labels != 255
  want = -np.mean(np.take_along_axis(logp, np.where(valid, labels, 0)[..., None], -1)[..., 0][valid])
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(float(acc), np.mean(logits.argmax(-1)[valid] == labels[valid]), rtol=1e-6)


SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from deconvnet_jax import configs, training
    from deconvnet_jax.models import build_model
    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(8, 64, 64, 3)).astype(np.float32),
             "label": rng.integers(0, 21, size=(8, 64, 64)).astype(np.int32)}
    tx = training.make_optimizer(training.OptimConfig(learning_rate=0.1))
    results = []
    # (devices, batch order): the reversed order on one device measures float32
    # reduction-order noise, the bound for the 8-device run.
    for devices, order in ((jax.devices()[:1], slice(None)), (jax.devices()[:1], slice(None, None, -1)),
                           (jax.devices(), slice(None))):
      mesh = training.make_mesh(devices)
      graphdef, state = training.init_train_state(build_model(configs.model_config("small")), tx)
      before = jax.tree.map(np.asarray, state.params)
      step = training.jit_train_step(graphdef, tx, mesh)
      state, metrics = step(training.replicate(state, mesh), {k: v[order] for k, v in batch.items()})
      update = jax.tree.map(lambda new, old: np.asarray(new) - old, state.params, before)
      results.append((float(metrics["loss"]), update, jax.tree.map(np.asarray, state.batch_stats)))
    (loss1, update1, stats1), (_, noise, _), (loss8, update8, stats8) = results
    np.testing.assert_allclose(loss8, loss1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(stats1), jax.tree.leaves(stats8)):
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    # Biases before BatchNorm have zero true gradient and the BN parameters'
    # gradients are ill-conditioned, so reordering alone moves them by ~2%;
    # the 8-device update must stay within a few times that noise everywhere.
    for a, n, b in zip(jax.tree.leaves(update1), jax.tree.leaves(noise), jax.tree.leaves(update8)):
      assert np.linalg.norm(b - a) <= 5 * np.linalg.norm(n - a) + 1e-4 * np.linalg.norm(a) + 1e-9, a.shape
    print("OK", loss1, loss8)
""")


def test_step_on_8_devices_equals_1_device():
  """BatchNorm statistics and gradients over the sharded global batch equal one device's."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=root, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  assert out.stdout.startswith("OK")


def test_steps_compile_once_and_bfloat16_keeps_float32_state():
  rng = np.random.default_rng(0)
  mesh = training.make_mesh()
  tx = training.make_optimizer(training.OptimConfig())
  graphdef, state = training.init_train_state(build_model(configs.model_config("small", dtype="bfloat16")), tx)
  state = training.replicate(state, mesh)
  step = training.jit_train_step(graphdef, tx, mesh)
  for _ in range(3):
    batch = {"image": rng.normal(size=(2, 64, 64, 3)).astype(np.float32),
             "label": rng.integers(0, 21, size=(2, 64, 64)).astype(np.int32)}
    state, metrics = step(state, training.global_batch(batch, mesh))
  assert step._cache_size() == 1  # pylint: disable=protected-access
  assert np.isfinite(float(metrics["loss"])) and int(state.step) == 3
  assert {x.dtype for x in jax.tree.leaves((state.params, state.batch_stats))} == {np.dtype(np.float32)}
