"""host_memory: with glibc on huge pages or told to keep freed memory, repeated XLA calls stop faulting in fresh
pages; the huge-page setting restarts the program once, the same command line in the same process."""

import os
import subprocess
import sys
import textwrap

import pytest

from deconvnet_jax import host_memory

# A jitted call with a 64 MB temporary (16,384 pages): 40 calls to warm up, then 10 counted. The kept heap grows to
# its working size over the first 20-30 calls (small objects left above a freed block), then stays flat.
SCRIPT = textwrap.dedent("""
  import resource
  from deconvnet_jax.host_memory import configure_process
  mode = configure_process()
  import jax, jax.numpy as jnp
  f = jax.jit(lambda x: jnp.sin(x)[::-1].T @ x[:, :64])
  x = jnp.ones((8192, 2048))
  for _ in range(40):
    f(x).block_until_ready()
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(10):
    f(x).block_until_ready()
  print(mode, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
""")


def faults_per_call(malloc: str) -> tuple[str, float]:
  env = dict(os.environ, DECONVNET_MALLOC=malloc, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  env.pop("GLIBC_TUNABLES", None)
  out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True).stdout
  mode, faults = out.split()
  return mode, float(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_huge_pages_and_reused_memory_spare_the_page_faults_that_the_system_setting_takes():
  system_mode, system = faults_per_call("system")
  assert system_mode == "system"
  assert system > 8000, system  # glibc maps and unmaps the 64 MB temporary on every call: the scenario is real
  reuse_mode, reused = faults_per_call("reuse")
  assert reuse_mode == "reuse" and reused < 0.05 * system, (reused, system)
  if not host_memory.huge_pages_possible():
    pytest.skip("transparent huge pages are off here, or glibc is older than 2.35")
  default_mode, huge = faults_per_call("")  # the default: huge pages
  assert default_mode == "huge_pages" and huge < 0.1 * system, (huge, system)  # 551 against 16,904 on a Zen 3 EPYC


RESTART = textwrap.dedent("""
  import os, sys
  print("start", os.getpid(), sys.argv[1:], flush=True)
  from deconvnet_jax.host_memory import configure_process
  print(configure_process(), os.environ.get("GLIBC_TUNABLES"))
""")


@pytest.mark.skipif(not host_memory.huge_pages_possible(), reason="no transparent huge pages or glibc < 2.35 here")
def test_huge_pages_restart_the_same_command_once_in_the_same_process_keeping_other_tunables():
  env = dict(os.environ, DECONVNET_MALLOC="", JAX_PLATFORMS="cpu", GLIBC_TUNABLES="glibc.malloc.check=0")
  out = subprocess.run([sys.executable, "-c", RESTART, "a b", "c"], env=env, capture_output=True, text=True,
                       check=True).stdout.splitlines()
  assert len(out) == 3, out
  first, second = out[0].split(" ", 2), out[1].split(" ", 2)
  assert first == second and first[2] == "['a b', 'c']", out  # the same PID and arguments, twice: one exec
  assert out[2] == f"huge_pages glibc.malloc.check=0:{host_memory.TUNABLE}"
  # Asked for reuse, with the tunable already set, or with the user's own hugetlb choice: no restart.
  for extra, mode in [({"DECONVNET_MALLOC": "reuse"}, "reuse"), ({"GLIBC_TUNABLES": host_memory.TUNABLE}, "huge_pages"),
                      ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "system")]:
    out = subprocess.run([sys.executable, "-c", RESTART], env={**env, **extra}, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert len(out) == 2 and out[1].split()[0] == mode, (extra, out)


def test_an_unknown_setting_is_a_clear_error(monkeypatch):
  monkeypatch.setenv(host_memory.ENV, "big")
  with pytest.raises(ValueError, match="DECONVNET_MALLOC='big': one of huge_pages, reuse, system"):
    host_memory.configure_process()


def test_an_installed_accelerator_plugin_leaves_glibc_alone_unless_asked(tmp_path):
  plugin = tmp_path / "jax_cuda12_plugin"
  plugin.mkdir()
  (plugin / "__init__.py").write_text("")
  code = "from deconvnet_jax.host_memory import configure_process; print(configure_process())"
  base = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "GLIBC_TUNABLES")}
  base["PYTHONPATH"] = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])

  def run(program=code, **env):
    return subprocess.run([sys.executable, "-c", program], env={**base, **env}, capture_output=True, text=True,
                          check=True).stdout.strip()
  assert run(DECONVNET_MALLOC="") == "system"  # a (stand-in) CUDA plugin: the host feeds a GPU
  assert run(DECONVNET_MALLOC="reuse") == "reuse"
  default = "huge_pages" if host_memory.huge_pages_possible() else "reuse"
  assert run(DECONVNET_MALLOC="", JAX_PLATFORMS="cpu") == default
  assert run(DECONVNET_MALLOC="system", JAX_PLATFORMS="cpu") == "system"
  # Huge pages asked for where they are not possible: the fallback is reuse, plugin or not.
  no_huge_pages = ("from deconvnet_jax import host_memory; host_memory.huge_pages_possible = lambda: False; "
                   "print(host_memory.configure_process())")
  assert run(no_huge_pages, DECONVNET_MALLOC="huge_pages") == "reuse"


def test_the_programs_set_it_up_before_jax_is_imported():
  code = ("import sys; sys.argv = ['train.py', '--help']; import deconvnet_jax.cli as cli; "
          "cli.configure_process = lambda: print('jax imported:', 'jax' in sys.modules); cli.start_train()")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
  assert out.startswith("jax imported: False\nusage: "), out[:300]
