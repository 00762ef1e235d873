"""Loss against NumPy, and the sharded step on 8 simulated devices against 1 device."""

import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np

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
    for devices in (jax.devices()[:1], jax.devices()):
      mesh = training.make_mesh(devices)
      graphdef, state = training.init_train_state(build_model(configs.model_config("small")), tx)
      step = training.jit_train_step(graphdef, tx, mesh)
      state = training.replicate(state, mesh)
      for _ in range(2):
        state, metrics = step(state, batch)
      results.append((float(metrics["loss"]), jax.tree.map(np.asarray, (state.params, state.batch_stats))))
    (loss1, tree1), (loss8, tree8) = results
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(tree1), jax.tree.leaves(tree8)):
      np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    print("OK", loss1, loss8)
""")


def test_step_on_8_devices_equals_1_device():
  """BatchNorm statistics and gradients over the sharded global batch equal one device's."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=root, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.startswith("OK")
