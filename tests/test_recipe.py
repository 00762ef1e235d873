"""Class balancing, collapse detection, recipes and accumulation through train.py."""

import json

import numpy as np
import pytest

from deconvnet_jax.cli import train
from deconvnet_jax import class_weights, configs, metrics, recipes, train_loop, training
from deconvnet_jax.data.generated import generate
from deconvnet_jax.data.voc import read_example, read_split
from deconvnet_jax.labels import VOC_CLASSES
from deconvnet_jax.models import build_model, forward_flops


def test_median_frequency_weights_against_a_hand_count():
  # Image A: 6 background, 2 class 1, 1 void.  Image B: 2 background, 4 class 2, 2 class 3.
  a = np.array([[0, 0, 0], [0, 0, 0], [1, 1, 255]], np.uint8)
  b = np.array([[0, 2, 2], [2, 2, 3], [3, 0, 255]], np.uint8)
  pixels, image_pixels = class_weights.class_pixel_counts([a, b], num_classes=5)
  np.testing.assert_array_equal(pixels, [8, 2, 4, 2, 0])
  np.testing.assert_array_equal(image_pixels, [16, 8, 8, 8, 0])  # non-void pixels of images holding c
  # freq = 8/16, 2/8, 4/8, 2/8 -> median 0.375; class 4 is absent: weight 1.
  np.testing.assert_allclose(class_weights.median_frequency_weights(pixels, image_pixels),
                             [0.75, 1.5, 0.75, 1.5, 1.0])


def test_weights_are_cached_per_split(tmp_path):
  labels = [np.array([[0, 1], [1, 1]], np.uint8)]
  path = tmp_path / "w.json"
  w = class_weights.cached_weights(path, {"split": "train"}, labels, 2)
  saved = json.loads(path.read_text())
  assert saved["pixels"] == [1, 3] and saved["weights"] == w.tolist()
  # Same key: read back without touching the labels; another key: recomputed.
  def boom():
    raise AssertionError("recomputed")
    yield
  np.testing.assert_array_equal(class_weights.cached_weights(path, {"split": "train"}, boom(), 2), w)
  other = class_weights.cached_weights(path, {"split": "val"}, [np.zeros((2, 2), np.uint8)], 2)
  np.testing.assert_array_equal(other, [1.0, 1.0])


def test_collapse_warning_on_confusion_matrices():
  names = ("background", "cat", "dog")
  varied = np.array([[700, 0, 0], [200, 0, 0], [100, 0, 0]])  # all predicted background; GT 70%
  assert "100.0% of pixels predicted 'background'" in metrics.collapse_warning(varied, names)
  healthy = np.array([[650, 30, 20], [40, 150, 10], [20, 10, 70]])
  assert metrics.collapse_warning(healthy, names) is None
  mostly_background = np.array([[970, 0, 0], [25, 5, 0], [0, 0, 0]])  # GT itself 97% background
  assert metrics.collapse_warning(mostly_background, names) is None


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return generate(tmp_path_factory.mktemp("gen"), num_train=8, num_val=4, seed=1, image_size=(64, 64))


def test_collapse_warning_fires_on_a_background_only_model(data):
  model = build_model(configs.model_config("small"))
  model.score.bias[...] = model.score.bias[...].at[0].set(100.0)  # background everywhere
  graphdef, state = training.init_train_state(model, training.make_optimizer(training.OptimConfig()))
  forward = training.jit_eval_logits(graphdef, training.make_mesh())
  val = [read_example(data, i) for i in read_split(data, "val")]
  record = train_loop.evaluate(forward, state, val, 2, "caffe_bgr", VOC_CLASSES)
  assert "collapse" in record and "'background'" in record["collapse"]
  assert record["val_iou"][0] is not None and record["val_iou"][0] < 0.9


def test_train_py_with_accumulation_and_class_balance(data, tmp_path, capsys):
  argv = ["--data", str(data), "--workdir", str(tmp_path), "--steps", "2", "--crop", "64",
          "--batch-size", "2", "--accumulate", "2", "--class-balance", "--label-smoothing", "0.1",
          "--eval-every", "2", "--save-every", "2"]
  assert train.main(argv) == 0
  out = capsys.readouterr().out
  assert "effective batch 4" in out and "median-frequency class weights: background" in out
  saved = json.loads((tmp_path / "class_weights.json").read_text())
  pixels, image_pixels = class_weights.class_pixel_counts(
      [read_example(data, i).label for i in read_split(data, "train")], 21)
  np.testing.assert_allclose(saved["weights"], class_weights.median_frequency_weights(pixels, image_pixels))
  meta = json.loads((tmp_path / "config.json").read_text())
  assert meta["train_config"]["accumulate"] == 2 and meta["train_config"]["class_balance"]
  record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
  assert record["step"] == 2 and np.isfinite(record["loss"]) and len(record["val_iou"]) == 21


def test_recipes_set_the_reference_solver_and_flags_still_win():
  cfg = train.parse_args(["--recipe", "paper-stage1"])
  assert (cfg.stage, cfg.steps, cfg.batch_size, cfg.accumulate, cfg.crop, cfg.resize) == (1, 20000, 8, 8, 224, 250)
  assert cfg.optim.learning_rate == 0.01 and cfg.optim.decay_steps == (9000,) and cfg.model_name == "paper"
  cfg = train.parse_args(["--recipe", "paper-stage2", "--accumulate", "4", "--model", "small"])
  assert (cfg.stage, cfg.steps, cfg.optim.decay_steps, cfg.accumulate) == (2, 40000, (10000,), 4)
  assert cfg.model_name == "small"
  text = recipes.describe("paper-stage1", configs.MODELS["paper"], 224, 64, 20000)
  assert "200,000" in text and "12.6 TFLOP per step" in text


def test_forward_flops_match_xla_cost_analysis():
  """The analytic count behind the recipes' estimates and bench.py, against XLA's own count.

  XLA skips the taps that fall on padding, which the convention (2 x multiply-adds
  of every layer's full kernel) counts: at 224 px that is a few percent. XLA's own
  convolutions (`onednn.portable`): it cannot count inside oneDNN's custom calls.
  """
  import jax
  from flax import nnx
  from deconvnet_jax import onednn
  config = configs.model_config("small", width=0.25)
  graphdef, state = nnx.split(build_model(config))
  x = jax.ShapeDtypeStruct((1, 224, 224, 3), np.float32)
  with onednn.portable():
    compiled = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, x).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  assert cost["flops"] <= forward_flops(config, 224) <= 1.05 * cost["flops"]
