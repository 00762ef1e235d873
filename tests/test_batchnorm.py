"""BatchNorm at test time: re-estimated statistics against NumPy, folding, the CLI and infer.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deconvnet_jax.cli import batchnorm as batchnorm_cli
from deconvnet_jax.cli import infer
from deconvnet_jax import batchnorm, checkpoints
from deconvnet_jax.configs import model_config
from deconvnet_jax.data.generated import generate
from deconvnet_jax.labels import VOC_CLASSES
from deconvnet_jax.inference import Network
from deconvnet_jax.models import build_model, get_variables, set_variables


def with_random_statistics(model, seed=0):
  """`model` (eval mode) with non-trivial BN statistics and affine terms, some scales negative.

  Starts from one batch's statistics so activations stay alive through the ReLUs.
  """
  rng = np.random.default_rng(seed)
  probe = nnx.clone(model)
  for _, bn in nnx.iter_modules(probe):
    if isinstance(bn, nnx.BatchNorm):
      bn.momentum = 0.0  # running statistics := this batch's
  probe.train()
  nnx.jit(lambda net, x: net(x))(probe, rng.normal(size=(2, 64, 64, 3)).astype(np.float32))
  variables = get_variables(probe)
  for path, _ in batchnorm.batchnorm_blocks(model):
    stats, affine = variables["batch_stats"], variables["params"]
    for key in path:
      stats, affine = stats[key], affine[key]
    c = stats["bn"]["mean"].shape
    sd = np.sqrt(np.asarray(stats["bn"]["var"]))
    stats["bn"] = {"mean": np.float32(stats["bn"]["mean"] + 0.3 * sd * rng.normal(size=c)),
                   "var": np.float32(sd ** 2 * rng.uniform(0.5, 2.0, c))}
    sign = np.where(rng.random(c) < 0.2, -1.0, 1.0)
    affine["bn"] = {"scale": np.float32(sign * rng.uniform(0.5, 1.5, c)),
                    "bias": np.float32(rng.normal(0, 0.3, c))}
  set_variables(model, jax.tree.map(jnp.asarray, variables))
  model.eval()
  return model


@pytest.fixture(scope="module")
def trained():
  """The small DeconvNet with random statistics; tests take nnx.clone copies."""
  return with_random_statistics(build_model(model_config("small")))


def test_folded_deconvnet_computes_the_unfolded_function(trained):
  model = nnx.clone(trained)
  x = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype(np.float32)
  unfolded, folded = Network(model, fold=False), Network(model)
  assert folded.config.batch_norm is False
  assert not jax.tree.leaves(nnx.state(batchnorm.fold_model(model), nnx.BatchStat))
  want, got = unfolded(x), folded(x)
  assert want.std() > 1.0  # the random statistics left a network that does something
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  # The folded layers by the formula, in float64: conv kernels on HWIO's O, deconv kernels on axis 1.
  config, folded_vars = batchnorm.fold(model.config, get_variables(model))
  params, stats = get_variables(model)["params"], get_variables(model)["batch_stats"]
  for name, axis in (("encoder/conv1_1", 3), ("encoder/fc6", 3), ("fc6_deconv", 1), ("deconv1_2", 1)):
    p, s, f = params, stats, folded_vars["params"]
    for key in name.split("/"):
      p, s, f = p[key], s[key], f[key]
    scale = np.float64(p["bn"]["scale"]) / np.sqrt(np.float64(s["bn"]["var"]) + config.bn_epsilon)
    shape = [1, 1, 1, 1]
    shape[axis] = -1
    np.testing.assert_allclose(f["layer"]["kernel"], np.float64(p["layer"]["kernel"]) * scale.reshape(shape),
                               rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(f["layer"]["bias"], (np.float64(p["layer"]["bias"]) - s["bn"]["mean"]) * scale
                               + p["bn"]["bias"], rtol=1e-6, atol=1e-6)
    assert "bn" not in f


def test_folding_a_network_without_batchnorm_changes_nothing():
  fcn = build_model(model_config("fcn8s-small"))
  variables = get_variables(fcn)
  assert batchnorm.fold(fcn.config, variables) == (fcn.config, variables)
  assert batchnorm.fold_model(fcn) is fcn
  with pytest.raises(ValueError, match="no BatchNorm layers"):
    batchnorm.reestimate(fcn, [np.zeros((2, 64, 64, 3), np.float32)], 1)


def conv3x3(x, kernel, bias):
  """NumPy float64 reference: x [B, H, W, Ci] * HWIO kernel, padding 1, + bias."""
  padded = np.pad(np.float64(x), ((0, 0), (1, 1), (1, 1), (0, 0)))
  h, w = x.shape[1:3]
  return sum(np.einsum("bhwi,io->bhwo", padded[:, dy:dy + h, dx:dx + w], np.float64(kernel[dy, dx]))
             for dy in range(3) for dx in range(3)) + np.float64(bias)


def moments(activations):
  """Per-batch channel mean and unbiased variance (m - 1 in the denominator), averaged over batches."""
  flat = [np.float64(a).reshape(-1, a.shape[-1]) for a in activations]
  return np.mean([f.mean(0) for f in flat], 0), np.mean([f.var(0, ddof=1) for f in flat], 0)


def test_reestimated_statistics_are_the_fed_activations_moments(trained, monkeypatch):
  model = nnx.clone(trained)
  rng = np.random.default_rng(2)
  batches = [rng.normal(1.0, 2.0, size=(3, 64, 64, 3)).astype(np.float32) for _ in range(3)]
  traces = []
  original = batchnorm.batch_moments
  monkeypatch.setattr(batchnorm, "batch_moments", lambda *a: traces.append(1) or original(*a))
  stats = batchnorm.reestimate(model, iter(batches + batches), num_batches=3)
  assert len(traces) == 1  # one compilation for all batches
  assert jax.tree.structure(stats) == jax.tree.structure(get_variables(model)["batch_stats"])

  # conv1_1's BN input straight from the kernel, in NumPy.
  layer = model.encoder.conv1_1.layer
  mean, var = moments([conv3x3(x, np.asarray(layer.kernel[...]), np.asarray(layer.bias[...])) for x in batches])
  np.testing.assert_allclose(stats["encoder"]["conv1_1"]["bn"]["mean"], mean, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stats["encoder"]["conv1_1"]["bn"]["var"], var, rtol=1e-4)

  # Deeper layers: their inputs captured from train-mode forwards (every BN on its batch statistics).
  @nnx.jit
  def bn_inputs(net, x):  # fc6's [3, 1, 1, 64] (m = 3) and deconv1_1's [3, 64, 64, 8]
    return (net.encoder.fc6.layer(net.encoder.features(x)[-1][0]),
            net.deconv1_1.layer(net.decoder_activations(x)["unpool1"]))

  net = nnx.clone(model)
  net.train()
  fc6_in, deconv1_1_in = zip(*[bn_inputs(net, x) for x in batches])
  for name, acts in ((("encoder", "fc6"), fc6_in), (("deconv1_1",), deconv1_1_in)):
    got = stats
    for key in name:
      got = got[key]
    mean, var = moments(acts)
    scale = np.abs(mean).max() + np.sqrt(var.max())
    np.testing.assert_allclose(got["bn"]["mean"], mean, rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(got["bn"]["var"], var, rtol=1e-3, atol=1e-5 * scale ** 2)
  assert fc6_in[0].shape[:3] == (3, 1, 1)  # there the m/(m-1) correction is 3/2


def test_cli_reestimate_then_fold_writes_checkpoints_that_load(trained, tmp_path, capsys):
  data = generate(tmp_path / "gen", num_train=4, num_val=1, seed=1, image_size=(64, 64))
  model = nnx.clone(trained)
  config = model.config
  train_config = {"data": str(data), "stage": 1, "crop": 64, "batch_size": 2, "seed": 0}
  meta = checkpoints.model_meta(config, VOC_CLASSES, step=7, train_config=train_config,
                                metrics={"val_miou": 0.5})
  ckpt = checkpoints.Checkpoints(tmp_path / "run")
  ckpt.save(7, get_variables(model), {"step": np.int32(7)}, meta)
  ckpt.wait()
  ckpt.close()

  for command in ("reestimate", "fold"):  # a bad --checkpoint: an error, nothing written
    assert batchnorm_cli.main([command, "--checkpoint", str(tmp_path / "nothing"),
                               "--out", str(tmp_path / "bad")]) == 2
    assert "no checkpoint found" in capsys.readouterr().err
  assert not (tmp_path / "bad").exists()

  bn_dir, folded_dir = tmp_path / "run_bn", tmp_path / "run_folded"
  assert batchnorm_cli.main(["reestimate", "--checkpoint", str(tmp_path / "run"), "--batches", "2",
                             "--out", str(bn_dir)]) == 0
  reestimated, bn_meta = checkpoints.load_model(bn_dir)
  assert bn_meta["bn_statistics"] | {"data": str(data)} == {
      "reestimated_from": str(tmp_path / "run"), "batches": 2, "data": str(data), "train_split": "train",
      "stage": 1, "batch_size": 2, "crop": 64, "seed": 0}
  assert bn_meta["step"] == 7 and bn_meta["class_names"] == list(VOC_CLASSES)
  assert bn_meta["train_config"] == train_config and "metrics" not in bn_meta
  before, after = get_variables(model), get_variables(reestimated)
  for x, y in zip(jax.tree.leaves(before["params"]), jax.tree.leaves(after["params"])):
    np.testing.assert_array_equal(x, y)
  # The statistics are those of the first training batches train.py would draw.
  cfg = batchnorm_cli.data_config(batchnorm_cli.parse_args(
      ["reestimate", "--checkpoint", "x", "--out", "y"]), meta)
  batches = batchnorm_cli.training_batches(cfg)
  layer = model.encoder.conv1_1.layer
  mean, var = moments([conv3x3(next(batches)["image"], np.asarray(layer.kernel[...]),
                               np.asarray(layer.bias[...])) for _ in range(2)])
  np.testing.assert_allclose(after["batch_stats"]["encoder"]["conv1_1"]["bn"]["mean"], mean, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(after["batch_stats"]["encoder"]["conv1_1"]["bn"]["var"], var, rtol=1e-4)
  assert batchnorm_cli.main(["reestimate", "--checkpoint", str(tmp_path / "run"), "--batches", "1",
                             "--out", str(bn_dir)]) == 2
  assert "already exists" in capsys.readouterr().err

  assert batchnorm_cli.main(["fold", "--checkpoint", str(bn_dir), "--out", str(folded_dir)]) == 0
  folded, folded_meta = checkpoints.load_model(folded_dir)
  assert folded.config.batch_norm is False and folded_meta["model"]["batch_norm"] is False
  assert folded_meta["bn_folded_from"] == str(bn_dir) and folded_meta["bn_statistics"]["batches"] == 2
  want = batchnorm.fold(reestimated.config, get_variables(reestimated))[1]
  for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(get_variables(folded))):
    np.testing.assert_array_equal(x, y)
  assert batchnorm_cli.main(["fold", "--checkpoint", str(folded_dir), "--out", str(tmp_path / "again")]) == 2
  assert "nothing to fold" in capsys.readouterr().err
  assert not (tmp_path / "again").exists()

  # infer.py reads the folded checkpoint, and gives the unfolded network's probabilities.
  photos = tmp_path / "photos"
  photos.mkdir()
  for path in sorted((data / "JPEGImages").glob("*.jpg"))[:2]:
    (photos / path.name).write_bytes(path.read_bytes())
  probs = {}
  for name, flags in (("folded", ["--checkpoint", str(folded_dir)]),
                      ("unfolded", ["--checkpoint", str(bn_dir), "--no-fold"])):
    assert infer.main([*flags, "--input", str(photos), "--output", str(tmp_path / name), "--mode", "whole",
                       "--no-crf", "--save-prob"]) == 0
    probs[name] = [np.load(p).astype(np.float32) for p in sorted((tmp_path / name).glob("*_prob.npy"))]
  assert len(probs["folded"]) == 2
  for a, b in zip(probs["folded"], probs["unfolded"]):
    np.testing.assert_allclose(a, b, atol=2e-3)
