"""pip install: the package and its console scripts, each running its program."""

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_pip_install_puts_the_console_scripts_on_path_and_they_run(tmp_path):
  """A fresh venv (no pip of its own; this environment's packages visible through a .pth file, so
  nothing is downloaded) gets the package from a copy of the sources; its console scripts run."""
  source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info beside the sources
  shutil.copytree(ROOT / "deconvnet_jax", source / "deconvnet_jax", ignore=shutil.ignore_patterns("__pycache__"))
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, source / name)
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
  python = venv / "bin" / "python"
  site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                        capture_output=True, text=True, check=True).stdout.strip()
  (Path(site) / "outer.pth").write_text("\n".join(p for p in sys.path if p.endswith("site-packages")) + "\n")
  subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                  "--no-build-isolation", str(source)], check=True, cwd=tmp_path)
  scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
  assert set(scripts) == {"deconvnet-train", "deconvnet-infer", "deconvnet-evaluate", "deconvnet-export",
                          "deconvnet-batchnorm", "deconvnet-convert-caffe"}
  env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}
  runs = {name: subprocess.Popen([name, "--help"], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for name in scripts}
  for name, run in runs.items():
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err
    assert out.startswith(f"usage: {name}"), out[:200]
  where = subprocess.run([str(python), "-c", "import deconvnet_jax; print(deconvnet_jax.__file__)"],
                         cwd=tmp_path, capture_output=True, text=True, check=True).stdout
  assert where.startswith(site)  # the venv's installed copy, not the checkout
  run = subprocess.run(["deconvnet-infer", "--input", "x", "--output", "y"], env=env, cwd=tmp_path,
                       capture_output=True, text=True)
  assert run.returncode == 2 and "No --checkpoint given" in run.stderr  # main's exit status reaches the shell
