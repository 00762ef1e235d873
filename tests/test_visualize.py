"""Decoder activations (the paper's analysis figure): shapes, unpooling sparsity, the grid."""

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from deconvnet_jax.configs import model_config
from deconvnet_jax.models import DECODER_ACTIVATIONS, DECODER_PLAN, build_model
from deconvnet_jax.viz import activation_grid

@pytest.fixture(scope="module")
def run():
  config = model_config("small")
  model = build_model(config)
  model.eval()
  x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))  # [B, H, W, 3]
  acts = nnx.jit(lambda m, x: m.decoder_activations(x))(model, x)
  logits = nnx.jit(lambda m, x: m(x))(model, x)
  from_acts = nnx.jit(lambda m, a: m.score(a))(model, acts["deconv1"])
  return config, {k: np.asarray(acts[k]) for k in DECODER_ACTIVATIONS}, np.asarray(logits), np.asarray(from_acts)


def test_shapes_and_order(run):
  config, acts, _, _ = run
  assert list(acts) == ["unpool5", "deconv5", "unpool4", "deconv4", "unpool3", "deconv3",
                        "unpool2", "deconv2", "unpool1", "deconv1"]
  for s, plan in zip(range(5, 0, -1), DECODER_PLAN):
    side = 64 // 2 ** (s - 1)  # pool(s-1) output size; unpool5 is at pool4's
    cin = config.channels(512) if s == 5 else config.channels(DECODER_PLAN[5 - s - 1][-1])
    assert acts[f"unpool{s}"].shape == (2, side, side, cin)
    assert acts[f"deconv{s}"].shape == (2, side, side, config.channels(plan[-1]))
  assert acts["deconv1"].shape == (2, 64, 64, config.channels(64))


def test_unpooled_maps_have_one_nonzero_per_window(run):
  _, acts, _, _ = run
  for s in range(1, 6):
    a = acts[f"unpool{s}"]
    b, h, w, c = a.shape
    windows = (a != 0).reshape(b, h // 2, 2, w // 2, 2, c).sum(axis=(2, 4))
    assert windows.max() <= 1
    assert np.count_nonzero(a) <= a.size // 4
    assert np.mean(acts[f"deconv{s}"] != 0) > 0.3  # deconvolution densifies (ReLU keeps ~half)


def test_call_is_score_of_last_activation(run):
  _, _, logits, from_acts = run
  np.testing.assert_allclose(logits, from_acts, rtol=1e-5, atol=1e-5)


def test_activation_grid(run):
  _, acts, _, _ = run
  grid = activation_grid(acts, channels=3, panel=32, label_width=100)
  assert grid.dtype == np.uint8
  assert grid.shape == (len(acts) * (32 + 2), 100 + 3 * (32 + 2), 3)
  assert grid[:, 100:].std() > 0  # panels are not blank


def test_gallery_lists_failures_links_files_and_shows_errors_only_with_ground_truth(tmp_path):
  from deconvnet_jax.viz import gallery_html, palette_image
  label = np.zeros((8, 12), np.uint8)
  label[2:5, 3:9] = 15
  for name in ("a", "b&c"):
    palette_image(label).save(tmp_path / f"{name}.png")
    Image.fromarray(np.zeros((8, 12, 3), np.uint8)).save(tmp_path / f"{name}_overlay.jpg")
  names = [f"n{i}" for i in range(21)]
  page = gallery_html(tmp_path, ["a", "b&c", "missing"], names, ["x.jpg: not a readable image"]).read_text()
  assert "2 segmented images, 1 failed" in page and "<li>x.jpg: not a readable image</li>" in page
  assert "errors</th>" not in page and "red wrong" not in page  # no ground truth: no error column
  assert '<a href="b%26c_overlay.jpg">' in page and '<a href="a.png">png</a>' in page and "n15" in page
  assert "table-layout:fixed" in page and "width:100%" in page  # scales to the window
  (tmp_path / "a_error.png").write_bytes((tmp_path / "a.png").read_bytes())
  page = gallery_html(tmp_path, ["a", "b&c"], names, errors=True).read_text()
  assert "<th>errors</th>" in page and '<img src="a_error.png"' in page and "<li>" not in page
