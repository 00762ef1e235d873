"""host_memory: with glibc told to keep freed memory, repeated XLA calls stop faulting in fresh pages."""

import os
import subprocess
import sys
import textwrap

import pytest

# A jitted call with a 64 MB temporary (16,384 pages): 40 calls to warm up, then 10 counted. The kept heap grows to
# its working size over the first 20-30 calls (small objects left above a freed block), then stays flat.
SCRIPT = textwrap.dedent("""
  import resource
  from deconvnet_jax.host_memory import reuse_freed_memory
  applied = reuse_freed_memory()
  import jax, jax.numpy as jnp
  f = jax.jit(lambda x: jnp.sin(x)[::-1].T @ x[:, :64])
  x = jnp.ones((8192, 2048))
  for _ in range(40):
    f(x).block_until_ready()
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(10):
    f(x).block_until_ready()
  print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
""")


def faults_per_call(malloc: str) -> tuple[bool, float]:
  env = dict(os.environ, DECONVNET_MALLOC=malloc, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True).stdout
  applied, faults = out.split()
  return applied == "True", float(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_reused_memory_spares_the_page_faults_that_the_system_setting_takes():
  applied, reused = faults_per_call("reuse")
  kept, system = faults_per_call("system")
  assert applied and not kept
  assert system > 8000, system  # glibc maps and unmaps the 64 MB temporary on every call: the scenario is real
  assert reused < 0.05 * system, (reused, system)


def test_an_installed_accelerator_plugin_leaves_glibc_alone_unless_asked(tmp_path):
  plugin = tmp_path / "jax_cuda12_plugin"
  plugin.mkdir()
  (plugin / "__init__.py").write_text("")
  code = "from deconvnet_jax.host_memory import reuse_freed_memory as r; print(r())"
  base = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  base["PYTHONPATH"] = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])

  def run(**env):
    return subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                          check=True).stdout.strip()
  assert run(DECONVNET_MALLOC="") == "False"  # a (stand-in) CUDA plugin: the host feeds a GPU
  assert run(DECONVNET_MALLOC="reuse") == "True"
  assert run(DECONVNET_MALLOC="", JAX_PLATFORMS="cpu") == "True"
  assert run(DECONVNET_MALLOC="system", JAX_PLATFORMS="cpu") == "False"


def test_the_command_line_package_sets_it_before_jax():
  env = dict(os.environ, DECONVNET_MALLOC="reuse")
  code = "import sys, deconvnet_jax.cli; print('jax' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
  assert out.strip() == "False"  # nothing in the package imports JAX before the setting is made
