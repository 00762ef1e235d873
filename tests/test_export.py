"""jax.export round trip: the exported network gives the model's logits, for any batch, without the model code."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deconvnet_jax.cli import export
from deconvnet_jax import checkpoints
from deconvnet_jax.configs import model_config
from deconvnet_jax.export import load
from deconvnet_jax.inference import Network
from deconvnet_jax.models import build_model, get_variables
from deconvnet_jax.normalization import normalize

ROOT = Path(__file__).resolve().parent.parent


def test_export_round_trip_gives_the_model_logits_for_any_batch(tmp_path):
  config = model_config("small", num_classes=5)
  model = build_model(config, seed=3)
  model.eval()
  checkpoints.write_checkpoint(tmp_path / "run", get_variables(model), checkpoints.model_meta(
      config, [f"c{i}" for i in range(5)], train_config={"crop": 64}))
  assert export.main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "exp")]) == 0
  images = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3)).astype(np.uint8)
  expected = Network(model, fold=False)(normalize(images, config.input_norm))  # BN as trained, unfolded
  # The loader in a fresh interpreter that never imports the model code (flax, deconvnet_jax.models).
  code = ("import sys, numpy as np; from deconvnet_jax.export import load\n"
          f"run = load({str(tmp_path / 'exp')!r}); x = np.load({str(tmp_path / 'x.npy')!r})\n"
          f"np.save({str(tmp_path / 'y.npy')!r}, run(x)); np.save({str(tmp_path / 'y1.npy')!r}, run(x[:1]))\n"
          "assert 'flax' not in sys.modules and 'deconvnet_jax.models' not in sys.modules, sorted(sys.modules)")
  np.save(tmp_path / "x.npy", images)
  subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
  logits, first = np.load(tmp_path / "y.npy"), np.load(tmp_path / "y1.npy")
  assert logits.shape == (3, 64, 64, 5) and logits.dtype == np.float32
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
  np.testing.assert_allclose(first, logits[:1], rtol=1e-5, atol=1e-5 * np.abs(expected).max())
  meta = json.loads((tmp_path / "exp" / "meta.json").read_text())
  assert meta["class_names"] == [f"c{i}" for i in range(5)] and meta["input_size"] == 64
  assert load(tmp_path / "exp").meta == meta
  assert export.main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "exp")]) == 2  # exists
  (tmp_path / "exp" / "meta.json").write_text(json.dumps(meta | {"format": "other"}))
  with pytest.raises(ValueError, match="not a deconvnet_jax export"):
    load(tmp_path / "exp")
