"""What survives what: corrupt checkpoints, full disks, read-only folders, two runs in one folder."""

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from deconvnet_jax.cli import infer
from deconvnet_jax.cli import train
from deconvnet_jax import checkpoints, locks
from deconvnet_jax.data.generated import generate
from deconvnet_jax.images import save_npy_atomic

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return generate(tmp_path_factory.mktemp("gen"), num_train=8, num_val=4, seed=1, image_size=(64, 64))


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
  """A 2-step run's work dir, trained once: read as it is, or copied by tests that go on from it."""
  workdir = tmp_path_factory.mktemp("trained")
  assert train.main(argv(data, workdir, 2)) == 0
  return workdir


def argv(data, workdir, steps, *extra):
  return ["--data", str(data), "--workdir", str(workdir), "--steps", str(steps), "--crop", "64",
          "--batch-size", "2", "--eval-every", "1000", "--save-every", "2", *extra]


def truncate_largest_file(folder: Path):
  files = [p for p in folder.rglob("*") if p.is_file()]
  largest = max(files, key=lambda p: p.stat().st_size)
  os.truncate(largest, largest.stat().st_size // 2)


def assert_same_variables(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def test_a_truncated_latest_checkpoint_is_set_aside_and_the_previous_one_resumed(data, tmp_path, capsys):
  assert train.main(argv(data, tmp_path / "ref", 6)) == 0
  assert train.main(argv(data, tmp_path / "run", 4)) == 0  # checkpoints 2 and 4
  truncate_largest_file(tmp_path / "run" / "checkpoints" / "4" / "variables")
  capsys.readouterr()
  assert train.main(argv(data, tmp_path / "run", 6)) == 0
  out, err = capsys.readouterr()
  assert f"warning: {tmp_path / 'run' / 'checkpoints' / '4'} is unreadable" in err
  assert f"resuming from {tmp_path / 'run' / 'checkpoints' / '2'}" in out  # not from step 0
  (aside,) = (tmp_path / "run" / "corrupt").iterdir()
  assert aside.name.startswith("4-")  # kept for the user, out of orbax's way
  a, meta = checkpoints.restore_variables(tmp_path / "ref" / "checkpoints")
  b, meta_b = checkpoints.restore_variables(tmp_path / "run" / "checkpoints")
  assert meta["step"] == meta_b["step"] == 6
  assert_same_variables(a, b)  # steps 3-6 redone exactly


def test_no_readable_checkpoint_and_a_corrupt_init_from_are_named_errors(data, trained, tmp_path, capsys):
  shutil.copytree(trained, tmp_path / "run")
  truncate_largest_file(tmp_path / "run" / "checkpoints" / "2" / "variables")
  capsys.readouterr()
  assert train.main(argv(data, tmp_path / "run", 4)) == 2  # never silently from step 0
  err = capsys.readouterr().err
  assert f"error: {tmp_path / 'run' / 'checkpoints'}: no checkpoint reads: step 2:" in err
  assert "Traceback" not in err and (tmp_path / "run" / "checkpoints" / "2").is_dir()
  assert train.main(argv(data, tmp_path / "new", 2, "--init-from", str(tmp_path / "run" / "checkpoints"))) == 2
  assert f"error: {tmp_path / 'run' / 'checkpoints' / '2'}: unreadable checkpoint" in capsys.readouterr().err
  with pytest.raises(checkpoints.CheckpointError, match="unreadable checkpoint"):
    checkpoints.load_model(tmp_path / "run" / "checkpoints")  # infer.py and evaluate.py's loader


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one_and_no_temporary_folder(data, trained, tmp_path,
                                                                                          capsys, monkeypatch):
  from orbax.checkpoint._src.handlers import json_checkpoint_handler as handler
  shutil.copytree(trained, tmp_path, dirs_exist_ok=True)  # checkpoint 2
  real = handler.JsonCheckpointHandler._save_fn

  async def full_disk(self, x, directory):
    if x.get("step") == 4:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
    return await real(self, x, directory)

  monkeypatch.setattr(handler.JsonCheckpointHandler, "_save_fn", full_disk)
  capsys.readouterr()
  assert train.main(argv(data, tmp_path, 6)) == 2
  err = capsys.readouterr().err
  assert "could not write step 4" in err and "No space left on device" in err
  assert "the checkpoint of step 2 is intact" in err and "Traceback" not in err
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]  # nothing half-written
  assert checkpoints.read_meta(tmp_path / "checkpoints")["step"] == 2
  monkeypatch.setattr(handler.JsonCheckpointHandler, "_save_fn", real)
  assert train.main(argv(data, tmp_path, 4)) == 0  # space freed: resumes from 2
  assert checkpoints.read_meta(tmp_path / "checkpoints")["step"] == 4


def test_a_full_disk_during_a_metrics_line_cuts_it_back_off(data, trained, tmp_path, capsys):
  """/dev/full fails every write with ENOSPC, as a full disk does."""
  shutil.copytree(trained, tmp_path, dirs_exist_ok=True)  # checkpoint 2
  lines = (tmp_path / "metrics.jsonl").read_text()
  (tmp_path / "metrics.jsonl").unlink()
  (tmp_path / "metrics.jsonl").symlink_to("/dev/full")
  assert train.main(argv(data, tmp_path, 10)) == 2
  err = capsys.readouterr().err
  assert f"{tmp_path / 'metrics.jsonl'}: cannot write the metrics line (No space left on device)" in err
  assert "Traceback" not in err and checkpoints.read_meta(tmp_path / "checkpoints")["step"] == 2
  (tmp_path / "metrics.jsonl").unlink()
  (tmp_path / "metrics.jsonl").write_text(lines)
  assert train.main(argv(data, tmp_path, 4)) == 0  # space freed: goes on from step 2
  assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [2, 4]


def test_a_read_only_work_dir_is_refused_before_any_work(data, tmp_path, capsys, monkeypatch):
  real_open = os.open

  def read_only(path, flags, *args, **kwargs):
    if str(path).endswith(".lock"):
      raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
    return real_open(path, flags, *args, **kwargs)

  monkeypatch.setattr(os, "open", read_only)
  assert train.main(argv(data, tmp_path / "run", 2)) == 2
  assert f"{tmp_path / 'run'}: cannot write here (Read-only file system)" in capsys.readouterr().err
  assert not (tmp_path / "run" / "checkpoints").exists()


def hold_lock(folder: Path, command: str) -> subprocess.Popen:
  """Another process holding `folder`'s lock, as a second run would."""
  code = ("import sys, time; from deconvnet_jax.locks import folder_lock\n"
          f"with folder_lock({str(folder)!r}, {command!r}, ''):\n  print('held', flush=True); time.sleep(600)")
  proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "held"
  return proc


def test_a_second_train_py_in_one_work_dir_is_refused_and_a_stale_lock_taken_over(data, tmp_path, capsys):
  holder = hold_lock(tmp_path, "train.py")
  try:
    assert train.main(argv(data, tmp_path, 2)) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}: in use by train.py (pid {holder.pid} on " in err
    assert "choose another --workdir" in err and not (tmp_path / "checkpoints").exists()
  finally:
    holder.kill()  # kill -9: the file stays, the kernel drops the lock
    holder.wait()
  assert train.main(argv(data, tmp_path, 2)) == 0
  assert f"taking over the lock left by train.py (pid {holder.pid}" in capsys.readouterr().err
  assert train.main(argv(data, tmp_path, 2)) == 0  # a clean exit leaves no stale note
  assert "taking over" not in capsys.readouterr().err


def test_a_second_infer_py_into_one_folder_is_refused(data, trained, tmp_path, capsys):
  out = tmp_path / "out"
  holder = hold_lock(out, "infer.py")
  try:
    status = infer.main(["--checkpoint", str(ROOT / "missing"), "--input", str(data / "JPEGImages"),
                         "--output", str(out)])
    assert status == 2  # the checkpoint is checked first
    capsys.readouterr()
    status = infer.main(["--checkpoint", str(trained), "--input", str(data / "JPEGImages"),
                         "--output", str(out), "--no-crf", "--mode", "whole"])
    assert status == 2
    assert f"{out}: in use by infer.py (pid {holder.pid} on " in capsys.readouterr().err
    assert not list(out.glob("*.png"))
  finally:
    holder.kill()
    holder.wait()


def test_a_full_disk_during_infer_stops_with_no_half_written_file(data, trained, tmp_path, capsys, monkeypatch):
  from PIL import Image
  real_save, calls = Image.Image.save, []

  def full_after_a_few(self, fp, *args, **kwargs):
    calls.append(fp)
    if len(calls) > 5:  # the first two images' files (overlay, label), then the disk is full
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(fp))
    return real_save(self, fp, *args, **kwargs)

  monkeypatch.setattr(Image.Image, "save", full_after_a_few)
  out = tmp_path / "out"
  status = infer.main(["--checkpoint", str(trained), "--input", str(data / "JPEGImages"),
                       "--output", str(out), "--no-crf", "--mode", "whole"])
  assert status == 2
  err = capsys.readouterr().err
  assert "cannot write (No space left on device)" in err and "run again to finish the rest" in err
  assert not list(out.glob(".tmp-*"))
  labels = sorted(out.glob("*.png"))
  assert labels and all(p.with_name(p.stem + "_overlay.jpg").exists() for p in labels)
  monkeypatch.setattr(Image.Image, "save", real_save)
  assert infer.main(["--checkpoint", str(trained), "--input", str(data / "JPEGImages"),
                     "--output", str(out), "--no-crf", "--mode", "whole"]) == 0
  total = len(list((data / "JPEGImages").glob("*.jpg")))
  assert f"{total - len(labels)} segmented, {len(labels)} skipped" in capsys.readouterr().out  # the rest only


def test_outputs_are_readable_by_others_per_the_umask(tmp_path):
  old = os.umask(0o022)
  try:
    save_npy_atomic(np.zeros(3), tmp_path / "a.npy")
    assert stat.S_IMODE((tmp_path / "a.npy").stat().st_mode) == 0o644
    os.umask(0o077)
    save_npy_atomic(np.zeros(3), tmp_path / "b.npy")
    assert stat.S_IMODE((tmp_path / "b.npy").stat().st_mode) == 0o600
  finally:
    os.umask(old)


def test_lock_names_the_holder_and_releases_on_exit(tmp_path):
  with locks.folder_lock(tmp_path, "train.py", "choose another --workdir"):
    with pytest.raises(locks.LockError, match=rf"in use by train.py \(pid {os.getpid()} on .*started "):
      with locks.folder_lock(tmp_path, "train.py", "choose another --workdir"):
        pass
  with locks.folder_lock(tmp_path, "train.py", ""):  # released
    assert time.time()


def test_ctrl_c_and_sigterm_are_recorded_not_raised_and_a_nan_loss_stops_the_run(tmp_path):
  import signal
  from deconvnet_jax import train_loop
  from deconvnet_jax.configs import TrainConfig
  before = signal.getsignal(signal.SIGINT)  # Python's default_int_handler; SIG_IGN under a shell's background job
  with train_loop.stop_signals() as received:
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.1)
  assert received == [signal.SIGINT, signal.SIGTERM]
  assert signal.getsignal(signal.SIGINT) is before  # restored
  cfg = TrainConfig(workdir=tmp_path)
  with pytest.raises(train_loop.TrainError, match=r"step 7: loss is nan; stopped.*lower the learning rate"):
    train_loop._step_record(cfg, 7, {"loss": np.float32("nan"), "accuracy": 0.0}, 1.0)
