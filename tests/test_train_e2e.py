"""train.py and infer.py end to end on tiny generated data: checkpoints, resume, outputs, bad files."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from deconvnet_jax.cli import evaluate
from deconvnet_jax.cli import infer
from deconvnet_jax.cli import train
from deconvnet_jax import checkpoints, metrics
from deconvnet_jax.configs import model_config
from deconvnet_jax.data.generated import generate
from deconvnet_jax.data.voc import read_example, read_split
from deconvnet_jax.inference import InferenceConfig, Segmenter
from deconvnet_jax.models import build_model, get_variables, set_variables


ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return generate(tmp_path_factory.mktemp("gen"), num_train=8, num_val=4, seed=1, image_size=(64, 64))


def run_train(data, workdir, steps, **flags):
  argv = ["--data", str(data), "--workdir", str(workdir), "--steps", str(steps), "--crop", "64",
          "--batch-size", "2", "--eval-every", "4", "--save-every", "2"]
  for key, value in flags.items():
    argv += [f"--{key.replace('_', '-')}", str(value)]
  assert train.main(argv) == 0


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
  """A 2-step run's work dir, trained once for the tests that only read its checkpoints."""
  workdir = tmp_path_factory.mktemp("trained")
  run_train(data, workdir, 2)
  return workdir


def test_resumed_run_equals_uninterrupted_run(data, tmp_path):
  run_train(data, tmp_path / "a", 4)
  run_train(data, tmp_path / "b", 2)
  run_train(data, tmp_path / "b", 4)  # resumes from step 2
  a, meta_a = checkpoints.restore_variables(tmp_path / "a" / "checkpoints")
  b, meta_b = checkpoints.restore_variables(tmp_path / "b" / "checkpoints")
  assert meta_a["step"] == meta_b["step"] == 4
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  records = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [2, 4]  # nothing repeated, nothing lost
  assert "val_miou" in records[-1] and len(records[-1]["val_iou"]) == 21
  # keep=3 latest; best holds the best val mIoU
  assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
  assert [p.name for p in (tmp_path / "a" / "best").iterdir() if p.name.isdigit()] == ["4"]
  # TensorBoard: the same records, read back with tensorboard's own reader.
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  events = EventAccumulator(str(tmp_path / "a"), size_guidance={"images": 0, "scalars": 0}).Reload()
  expected = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
  assert [e.step for e in events.Scalars("train/loss")] == [r["step"] for r in expected] == [2, 4]
  np.testing.assert_allclose([e.value for e in events.Scalars("train/loss")], [r["loss"] for r in expected],
                             rtol=1e-6)
  assert [(e.step, round(e.value, 6)) for e in events.Scalars("train/learning_rate")] == [(2, 0.01), (4, 0.01)]
  assert [e.step for e in events.Scalars("val/miou")] == [4]
  assert np.isclose(events.Scalars("val/miou")[0].value, expected[-1]["val_miou"])
  present = [x for x in expected[-1]["val_iou"] if x is not None]
  assert len([t for t in events.Tags()["scalars"] if t.startswith("val_iou/")]) == len(present)
  image = events.Images("val_predictions/0")[0]
  assert image.step == 4 and (image.width, image.height) == (2 * 64 + 4, 64)


def test_checkpoints_keep_latest_and_best_apart(tmp_path):
  ckpt = checkpoints.Checkpoints(tmp_path, keep=2)
  variables = {"params": {"w": np.ones(3, np.float32)}, "batch_stats": {}}
  for step, miou in [(1, 0.5), (2, 0.9), (3, 0.4), (4, 0.3)]:
    ckpt.save(step, variables, {"step": np.int32(step)}, {"step": step, "metrics": {"val_miou": miou}}, miou)
  ckpt.wait()
  assert ckpt.latest.all_steps() == [3, 4] and ckpt.best.all_steps() == [2]
  ckpt.close()
  assert checkpoints.read_meta(tmp_path)["step"] == 2  # a work dir resolves to its best
  assert checkpoints.read_meta(tmp_path / "checkpoints")["step"] == 4
  with pytest.raises(checkpoints.CheckpointError, match="no checkpoint found"):
    checkpoints.read_meta(tmp_path / "nothing")


def test_load_model_gives_the_trained_network_and_rejects_mismatch(trained):
  model, meta = checkpoints.load_model(trained)
  assert meta["input_norm"] == "caffe_bgr" and meta["class_names"][0] == "background"
  variables, _ = checkpoints.restore_variables(trained)
  for x, y in zip(jax.tree.leaves(variables), jax.tree.leaves(get_variables(model))):
    np.testing.assert_array_equal(x, np.asarray(y))
  other = build_model(model_config("small", num_classes=5))
  with pytest.raises(ValueError, match=r"score/bias has shape \(21,\), the model expects \(5,\)"):
    set_variables(other, variables, source=str(trained))
  # infer.py --dtype bfloat16: the same float32 parameters, computed in bfloat16.
  model16, meta16 = checkpoints.load_model(trained, dtype="bfloat16")
  assert meta16 == meta
  for x, y in zip(jax.tree.leaves(variables), jax.tree.leaves(get_variables(model16))):
    assert y.dtype == np.float32
    np.testing.assert_array_equal(x, np.asarray(y))
  image = jnp.zeros((1, 64, 64, 3))
  assert "bf16[" in str(jax.make_jaxpr(model16)(image)) and "bf16[" not in str(jax.make_jaxpr(model)(image))


def write_bad_and_odd_images(folder, good):
  """One of each kind a user's folder may hold; returns the names expected to fail."""
  rgb = np.asarray(Image.open(good))
  Image.fromarray(rgb).convert("L").save(folder / "gray.png")
  Image.fromarray(rgb).convert("RGBA").save(folder / "rgba.png")
  Image.fromarray(rgb).convert("P").save(folder / "palette.png")
  Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
  Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(folder / "sixteen.png")
  Image.fromarray(rgb[:20, :30]).save(folder / "tiny.png")
  Image.fromarray(np.tile(rgb, (2, 5, 1))).save(folder / "large.png")  # 128 x 320: over --max-side
  rotated = Image.fromarray(rgb[:, :40])
  exif = rotated.getexif()
  exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise when shown
  rotated.save(folder / "exif.jpg", exif=exif)
  (folder / "notes.jpg").write_text("not an image")
  (folder / "cut.jpg").write_bytes(good.read_bytes()[:300])
  return {"notes.jpg", "cut.jpg"}


def test_infer_on_a_folder_writes_outputs_and_reports_bad_files(data, trained, tmp_path, capsys):
  folder = tmp_path / "photos"
  folder.mkdir()
  good = sorted((data / "JPEGImages").glob("*.jpg"))[:2]
  for path in good:
    (folder / path.name).write_bytes(path.read_bytes())
  bad = write_bad_and_odd_images(folder, good[0])
  out = tmp_path / "out"
  status = infer.main(["--checkpoint", str(trained), "--input", str(folder),
                       "--output", str(out), "--save-prob", "--max-side", "160",
                       "--ground-truth", str(data / "SegmentationClass")])
  assert status == 1  # some files failed
  err = capsys.readouterr().err
  for name in bad:
    assert f"{name}: not a readable image" in err
  ok = sorted(p.stem for p in folder.iterdir() if p.name not in bad)
  assert sorted(p.stem for p in out.glob("*.png") if not p.stem.endswith("_error")) == ok
  for stem in ok:
    label = Image.open(out / f"{stem}.png")
    assert label.mode == "P"
    source = infer.load_rgb(folder / next(p.name for p in folder.iterdir() if p.stem == stem))
    assert label.size == (source.shape[1], source.shape[0])
    assert np.asarray(label).max() < 21
    prob = np.load(out / f"{stem}_prob.npy")
    assert prob.shape == ((64, 160, 21) if stem == "large" else (*source.shape[:2], 21))
    np.testing.assert_allclose(prob.astype(np.float32).sum(-1), 1.0, atol=1e-2)
    assert (out / f"{stem}_overlay.jpg").exists()
  assert Image.open(out / "exif.png").size == (64, 40)  # rotated upright before segmenting
  assert not list(out.glob(".tmp-*"))
  assert "large.png" in (out / "index.html").read_text() and "legend" in (out / "index.html").read_text().lower()
  # Error maps for the images that have ground truth: red exactly where prediction and truth differ.
  for path in good:
    error = np.asarray(Image.open(out / f"{path.stem}_error.png"))
    pred, truth = np.asarray(Image.open(out / f"{path.stem}.png")), np.asarray(Image.open(
        data / "SegmentationClass" / f"{path.stem}.png"))
    wrong = (pred != truth) & (truth != 255)
    np.testing.assert_array_equal(np.all(error == (230, 30, 30), -1), wrong)
    assert f"{path.stem}_error.png" in (out / "index.html").read_text()
  assert not (out / "gray_error.png").exists()
  # A second run skips what exists unless --overwrite.
  infer.main(["--checkpoint", str(trained), "--input", str(folder), "--output", str(out)])
  assert f"0 segmented, {len(ok)} skipped" in capsys.readouterr().out
  assert infer.main(["--input", str(folder), "--output", str(out)]) == 2  # no checkpoint: says how
  assert "python train.py" in capsys.readouterr().err
  # Two files of one name and two suffixes keep apart (not one overwriting the other).
  twins = tmp_path / "twins"
  twins.mkdir()
  Image.open(folder / "tiny.png").save(twins / "a.png")
  Image.open(folder / "large.png").save(twins / "a.jpg")
  infer.main(["--checkpoint", str(trained), "--input", str(twins), "--output", str(tmp_path / "o2"),
              "--no-crf", "--mode", "whole"])
  assert "output name(s) shared" in capsys.readouterr().err
  assert Image.open(tmp_path / "o2" / "a_png.png").size == (30, 20)
  assert Image.open(tmp_path / "o2" / "a_jpg.png").size == (320, 128)


def test_mismatched_workdir_and_init_from_are_clear_errors(data, tmp_path, capsys):
  run_train(data, tmp_path / "run", 2)
  assert train.main(["--data", str(data), "--workdir", str(tmp_path / "run"), "--steps", "4",
                     "--set", "width=0.25"]) == 2
  assert "holds another network (width: checkpoint 0.125, now 0.25)" in capsys.readouterr().err
  assert train.main(["--data", str(data), "--workdir", str(tmp_path / "other"), "--steps", "2",
                     "--set", "width=0.25", "--init-from", str(tmp_path / "run")]) == 2
  assert re.search(r"--init-from .*deconv1_1/layer/kernel has shape \(8, 8, 3, 3\), "
                   r"the model expects \(16, 16, 3, 3\).*another class count or width", capsys.readouterr().err)


def _train_argv(data, workdir, steps, save_every=1, batch_size=8):
  return ["--data", str(data), "--workdir", str(workdir), "--steps", str(steps), "--crop", "64",
          "--batch-size", str(batch_size), "--eval-every", "1000", "--save-every", str(save_every)]


def _train_process(data, workdir, steps, devices=1, save_every=1, extra=(), env=(), **popen):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **dict(env))
  argv = [sys.executable, str(ROOT / "train.py"), *_train_argv(data, workdir, steps, save_every), *extra]
  return subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, **popen)


def _wait_for(path, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline and not path.exists():
    time.sleep(0.1)
  assert path.exists(), f"{path} did not appear in {timeout} s"


@pytest.mark.xdist_group("batch-8-programs")  # see test_training.py
def test_kill_9_loses_no_checkpoint_and_resume_works_on_8_devices(data, tmp_path):
  """SIGKILL mid-run leaves only complete checkpoints; another device count resumes them."""
  proc = _train_process(data, tmp_path, 200)
  _wait_for(tmp_path / "checkpoints" / "3")
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps and steps[-1] >= 3
  for step in steps:  # every checkpoint left behind restores
    variables, meta = checkpoints.restore_variables(tmp_path / "checkpoints" / str(step))
    assert meta["step"] == step and variables["params"]
  proc = _train_process(data, tmp_path, steps[-1] + 2, devices=8)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-3000:]
  assert f"resuming from {tmp_path / 'checkpoints' / str(steps[-1])}" in out
  assert "taking over the lock left by train.py" in out  # kill -9 left its lock file behind
  assert checkpoints.read_meta(tmp_path / "checkpoints")["step"] == steps[-1] + 2


@pytest.mark.xdist_group("batch-8-programs")  # see test_training.py
def test_sigterm_saves_the_current_step_and_the_resumed_run_is_bit_identical(data, tmp_path):
  """Preemption: SIGTERM between regular saves saves the step reached, exits 143, resumes exactly."""
  proc = _train_process(data, tmp_path / "b", 1000, save_every=1000)
  _wait_for(tmp_path / "b" / "metrics.jsonl")  # step 10 is done: compiled and stepping
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 143, out[-3000:]
  stopped = checkpoints.read_meta(tmp_path / "b" / "checkpoints")["step"]
  assert stopped >= 10 and f"stopped by SIGTERM: saved step {stopped}" in out
  assert train.main(_train_argv(data, tmp_path / "b", stopped + 2, save_every=1000)) == 0
  assert train.main(_train_argv(data, tmp_path / "a", stopped + 2, save_every=1000)) == 0  # never stopped
  a, _ = checkpoints.restore_variables(tmp_path / "a" / "checkpoints")
  b, _ = checkpoints.restore_variables(tmp_path / "b" / "checkpoints")
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def test_sigterm_to_one_of_two_hosts_saves_the_same_step_on_both(data, tmp_path):
  """Two processes (JAX's multi-host runtime on CPU): SIGTERM reaches one; JAX's preemption sync
  point makes both save one step and exit 143."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  procs = [_train_process(data, tmp_path, 1000, save_every=1000, env={"JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"},
                          extra=["--batch-size", "2", "--coordinator", f"localhost:{port}",
                                 "--num-processes", "2", "--process-id", str(i)]) for i in range(2)]
  try:
    _wait_for(tmp_path / "metrics.jsonl", timeout=400)
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=300)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  saved = [int(m) for out in outs for m in re.findall(r"stopped by SIGTERM: saved step (\d+)", out)]
  assert [p.returncode for p in procs] == [143, 143], outs[0][-2000:] + outs[1][-2000:]
  assert len(saved) == 2 and saved[0] == saved[1] >= 10
  assert checkpoints.read_meta(tmp_path / "checkpoints")["step"] == saved[0]


def test_evaluate_scores_the_variants_with_the_shared_metric(data, trained, tmp_path, capsys):
  argv = ["--checkpoint", str(trained), "--data", str(data), "--top-k", "5", "--curve", "1", "3",
          "--crf-processes", "1", "--chunk", "3", "--output", str(tmp_path / "eval")]
  assert evaluate.main(argv) == 0
  results = json.loads((tmp_path / "eval" / "results.json").read_text())
  assert list(results["variants"]) == ["whole image", "DeconvNet", "DeconvNet, 1 proposals",
                                       "DeconvNet, 3 proposals", "DeconvNet+CRF"]
  assert Image.open(tmp_path / "eval" / "curve.png").size == (640, 420)
  capsys.readouterr()
  assert evaluate.main(argv) == 0  # everything cached: resumes, same numbers
  assert "resuming: 4 of 4 images already scored" in capsys.readouterr().out
  assert json.loads((tmp_path / "eval" / "results.json").read_text()) == results
  assert "| DeconvNet+CRF |" in (tmp_path / "eval" / "results.md").read_text()
  # The whole-image row equals a direct count with the same metric code.
  model, _ = checkpoints.load_model(trained)
  whole = Segmenter(model, InferenceConfig(mode="whole", crf=False))
  conf = np.zeros((21, 21), np.int64)
  for image_id in read_split(data, "val"):
    ex = read_example(data, image_id)
    conf += metrics.confusion_matrix(ex.label, whole.segment(ex.image).label, 21)
  assert np.isclose(results["variants"]["whole image"]["miou"], metrics.mean_iou(conf))
  # The confusion report: counts sum to the split's non-void pixels; shares per ground-truth row sum to 1.
  report = json.loads((tmp_path / "eval" / "confusion" / "whole_image.json").read_text())
  np.testing.assert_array_equal(report["counts"], conf)
  pixels = sum(int((read_example(data, i).label != 255).sum()) for i in read_split(data, "val"))
  assert np.sum(report["counts"]) == pixels
  for row in report["normalized"]:
    assert row[0] is None or np.isclose(sum(row), 1.0)
  assert Image.open(tmp_path / "eval" / "confusion" / "DeconvNet_CRF.png").size[0] > 21 * 26
  assert "| class | whole image | DeconvNet |" in (tmp_path / "eval" / "results.md").read_text()
  # Two generators side by side: each one's rows are those of its own run; one curve each.
  assert evaluate.main(argv[:-1] + [str(tmp_path / "both"), "--proposals", "windows", "edge_boxes"]) == 0
  both = json.loads((tmp_path / "both" / "results.json").read_text())["variants"]
  assert list(both) == ["whole image"] + [
      f"DeconvNet ({g}){n}" for g in ("windows", "edge_boxes") for n in ("", ", 1 proposals", ", 3 proposals")] + [
      "DeconvNet+CRF (windows)", "DeconvNet+CRF (edge_boxes)"]
  for name, row in results["variants"].items():  # "DeconvNet+CRF" -> "DeconvNet+CRF (windows)", ...
    variant, *count = name.split(", ")
    assert both[", ".join([variant + (" (windows)" if "DeconvNet" in variant else ""), *count])] == row
  assert Image.open(tmp_path / "both" / "curve.png").size == (640, 420)
  assert evaluate.main(argv + ["--proposals", "windows", "network", "--proposals-from", str(tmp_path)]) == 2


def test_evaluate_with_an_fcn_checkpoint_scores_the_ensemble(data, trained, tmp_path):
  run_train(data, tmp_path / "fcn", 2, model="fcn8s-small", stage=0, lr=0.001)
  assert evaluate.main(["--checkpoint", str(trained), "--fcn-checkpoint", str(tmp_path / "fcn"),
                        "--data", str(data), "--top-k", "3", "--crf-processes", "1",
                        "--output", str(tmp_path / "eval")]) == 0
  variants = json.loads((tmp_path / "eval" / "results.json").read_text())["variants"]
  assert set(variants) == {"whole image", "DeconvNet", "DeconvNet+CRF", "FCN-8s", "EDeconvNet",
                           "EDeconvNet+CRF"}
  assert all(0.0 <= v["miou"] <= 1.0 for v in variants.values())


def test_infer_and_evaluate_take_proposals_from_box_files(data, trained, tmp_path, capsys):
  val = read_split(data, "val")
  boxes = tmp_path / "boxes"
  boxes.mkdir()
  for image_id in val:  # each image's ground-truth boxes as (x0, y0, x1, y1, score)
    rows = [[x0, y0, x1, y1, 1.0] for y0, x0, y1, x1 in read_example(data, image_id).boxes.tolist()]
    np.save(boxes / f"{image_id}.npy", np.asarray(rows, np.float64).reshape(-1, 5))
  argv = ["--checkpoint", str(trained), "--data", str(data), "--top-k", "5", "--crf-processes", "1",
          "--proposals-from", str(boxes), "--output", str(tmp_path / "eval")]
  assert evaluate.main(argv) == 0
  assert json.loads((tmp_path / "eval" / "results.json").read_text())["images"] == len(val)
  photos = tmp_path / "photos"
  photos.mkdir()
  for image_id in val:
    (photos / f"{image_id}.jpg").write_bytes((data / "JPEGImages" / f"{image_id}.jpg").read_bytes())
  (boxes / f"{val[0]}.npy").unlink()
  capsys.readouterr()
  assert infer.main(["--checkpoint", str(trained), "--input", str(photos), "--output",
                     str(tmp_path / "out"), "--no-crf", "--proposals-from", str(boxes)]) == 1
  assert f"no box file for image '{val[0]}'" in capsys.readouterr().err
  assert sorted(p.stem for p in (tmp_path / "out").glob("gen_*[0-9].png")) == val[1:]
  assert evaluate.main(argv[:-2] + ["--output", str(tmp_path / "eval2")]) == 2  # a missing file: named
  assert f"no box file for image '{val[0]}'" in capsys.readouterr().err
