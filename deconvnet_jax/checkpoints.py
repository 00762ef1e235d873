"""Orbax checkpoints: the last N under WORKDIR/checkpoints, the best by val mIoU under WORKDIR/best.

Each step directory holds three items:
  variables  {"params": ..., "batch_stats": ...} as plain nested dicts (any Flax code can read them)
  train      {"opt_state": ..., "step": ...}, only what resuming needs besides the variables
  meta       JSON: the model config, input normalisation, class names, data position, metrics
Orbax writes each step to a temporary directory and renames it when complete,
so a killed run never leaves a half-written checkpoint behind.
"""

import contextlib
import dataclasses
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from deconvnet_jax.configs import ModelConfig
from deconvnet_jax.images import atomic_dir
from deconvnet_jax.models import build_model, set_variables


class CheckpointError(ValueError):
  """A checkpoint is missing or does not fit; the message names it."""


def _manager(directory: Path, keep: int | None, create=True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create, cleanup_tmp_directories=create)
  return ocp.CheckpointManager(directory.absolute(), options=options,
                               item_names=("variables", "train", "meta"))


ORBAX_TMP = ".orbax-checkpoint-tmp"  # the suffix of orbax's folders being written


def _remove_until_quiet(directory: Path, pattern: str, quiet: float = 0.5, limit: float = 30.0):
  """Removes what matches until none has come back for `quiet` seconds: when one of a save's
  writers fails, orbax's others (tensorstore threads) may still be creating files in its folder."""
  deadline = time.monotonic() + limit
  while time.monotonic() < deadline:
    found = list(directory.glob(pattern))
    for path in found:
      shutil.rmtree(path, ignore_errors=True)
    time.sleep(quiet)
    if not found and not list(directory.glob(pattern)):
      return


def _meta_args():
  return ocp.args.Composite(meta=ocp.args.JsonRestore())


def _brief(error: BaseException) -> str:
  return f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"


class Checkpoints:
  """Saves to `latest` (keeps `keep`) and, when the metric improves, to `best` (keeps 1).

  Two managers because orbax's best_fn alone would delete the newest checkpoint
  when it is not among the best, and resuming needs the newest.
  A save that fails (a full disk, a read-only folder) raises CheckpointError and
  leaves no temporary folder; the checkpoints written before it stay intact.
  """

  def __init__(self, workdir, keep: int = 3):
    self.workdir = Path(workdir)
    self.latest = _manager(self.workdir / "checkpoints", keep)
    self.best = _manager(self.workdir / "best", 1)
    self.best_metric = None
    self._saving: list[int] = []  # steps whose asynchronous writes may still fail
    if (best := self.best.latest_step()) is not None:
      try:
        self.best_metric = self.best.restore(best, args=_meta_args()).meta.get("metrics", {}).get("val_miou")
      except Exception as e:  # noqa: BLE001 - any unreadable file; the next best save replaces it
        print(f"warning: {self.best.directory / str(best)} is unreadable ({_brief(e)}); "
              "the next improving step replaces it", file=sys.stderr)

  def save(self, step: int, variables: dict, train: dict, meta: dict, metric: float | None = None):
    def args():
      return ocp.args.Composite(variables=ocp.args.StandardSave(variables),
                                train=ocp.args.StandardSave(train), meta=ocp.args.JsonSave(meta))

    with self._failures(step):
      self.latest.save(step, args=args(), force=True)
      if metric is not None and (self.best_metric is None or metric > self.best_metric):
        self.best_metric = metric
        self.best.save(step, args=args(), force=True)

  @contextlib.contextmanager
  def _failures(self, step: int | None):
    """Turns a failed write (now or in an earlier asynchronous save) into a CheckpointError."""
    try:
      if step is not None:  # orbax finishes one save before it starts the next
        self._saving = self._saving[-1:] + [step]
      yield
    except Exception as e:  # noqa: BLE001 - orbax wraps OSError in several types
      failed = ", ".join(str(s) for s in self._saving)
      self._saving = []
      for manager in (self.latest, self.best):
        with contextlib.suppress(Exception):
          manager.wait_until_finished()
        _remove_until_quiet(Path(manager.directory), f"*{ORBAX_TMP}*")
      intact = [s for s in self.latest.all_steps(read=True) if (self.workdir / "checkpoints" / str(s)).is_dir()]
      raise CheckpointError(
          f"{self.workdir / 'checkpoints'}: could not write step {failed} ({_brief(e)}); "
          + (f"the checkpoint of step {max(intact)} is intact" if intact else "no checkpoint was written")
          + "; free space or make the folder writable, then run again to resume") from e
    else:
      if step is None:
        self._saving = []

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def restore_latest(self, variables_target, train_target, check=None) -> tuple[int, dict, dict, dict] | None:
    """(step, variables, train, meta) of the newest checkpoint that reads, or None if there is none.

    Unreadable newer ones (truncated, corrupt) are named in a warning and moved to
    WORKDIR/corrupt/; if none reads, CheckpointError names each with its error.
    `check(meta, path)` may raise CheckpointError to refuse one (another network).
    """
    failures = []
    for step in sorted(self.latest.all_steps(), reverse=True):
      path = self.workdir / "checkpoints" / str(step)
      try:
        meta = self.latest.restore(step, args=_meta_args()).meta
      except Exception as e:  # noqa: BLE001 - any unreadable file
        failures.append((step, e))
        continue
      if check is not None:
        check(meta, path)
      try:
        restored = self.latest.restore(step, args=ocp.args.Composite(
            variables=ocp.args.StandardRestore(variables_target),
            train=ocp.args.StandardRestore(train_target), meta=ocp.args.JsonRestore()))
      except Exception as e:  # noqa: BLE001
        failures.append((step, e))
        continue
      self._set_aside(failures)
      return step, restored.variables, restored.train, restored.meta
    if failures:
      raise CheckpointError(f"{self.workdir / 'checkpoints'}: no checkpoint reads: " + "; ".join(
          f"step {s}: {_brief(e)}" for s, e in failures) + "; restore them from a copy, or use another --workdir")
    return None

  def _set_aside(self, failures):
    """Moves unreadable checkpoints to WORKDIR/corrupt/, so new saves do not collide with their steps."""
    if not failures:
      return
    if jax.process_index() == 0:
      for step, error in failures:
        src = self.workdir / "checkpoints" / str(step)
        dst = self.workdir / "corrupt" / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        src.rename(dst)
        print(f"warning: {src} is unreadable ({_brief(error)}); moved it to {dst} and resumed from the "
              "previous checkpoint", file=sys.stderr)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("deconvnet_jax: corrupt checkpoints set aside")
    self.latest.reload()

  def wait(self):
    with self._failures(None):
      self.latest.wait_until_finished()
      self.best.wait_until_finished()

  def close(self):
    self.latest.close()
    self.best.close()


def _step_dir(path: Path) -> tuple[Path, int]:
  """Resolves a workdir, a checkpoints/best folder or a step folder to (manager dir, step)."""
  path = Path(path)
  if (path / "meta").is_dir() and path.name.isdigit():
    return path.parent, int(path.name)
  for candidate in (path / "best", path / "checkpoints", path):
    steps = sorted(int(p.name) for p in candidate.glob("[0-9]*") if (p / "meta").is_dir())
    if steps:
      return candidate, steps[-1]
  raise CheckpointError(f"{path}: no checkpoint found (expected a train.py work dir, its "
                        "checkpoints/ or best/ folder, or one step folder in them)")


@contextlib.contextmanager
def _reading(directory: Path, step: int):
  """An orbax manager over `directory`; a checkpoint that fails to read raises CheckpointError naming it."""
  try:
    with _manager(directory, None, create=False) as manager:
      yield manager
  except CheckpointError:
    raise
  except Exception as e:  # noqa: BLE001 - truncated or corrupt files raise many types
    raise CheckpointError(f"{directory / str(step)}: unreadable checkpoint ({_brief(e)})") from e


def read_meta(path) -> dict:
  directory, step = _step_dir(path)
  with _reading(directory, step) as manager:
    return manager.restore(step, args=_meta_args()).meta


def check_same_model(meta: dict, config: ModelConfig, path):
  """Refuses to resume a checkpoint (its `meta`, read from `path`) of another network, naming what differs."""
  saved = meta["model"]
  shape_fields = ("arch", "num_classes", "width", "fc_dim", "fc_kernel", "batch_norm")
  diff = [f"{k}: checkpoint {saved.get(k)!r}, now {getattr(config, k)!r}"
          for k in shape_fields if saved.get(k) != getattr(config, k)]
  if diff:
    raise CheckpointError(f"{path}: holds another network ({'; '.join(diff)}); use another "
                          "--workdir, or --init-from for a compatible one")


def restore_variables(path) -> tuple[dict, dict]:
  """(variables as NumPy nested dicts, meta) of a checkpoint; no model needed."""
  directory, step = _step_dir(path)
  with _reading(directory, step) as manager:
    restored = manager.restore(step, args=ocp.args.Composite(
        variables=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
  return restored.variables, restored.meta


def load_model(path, dtype: str | None = None):
  """The trained model (eval mode) and its meta (config, input_norm, class names) in one call.

  `path`: a train.py work dir (its best checkpoint, else its latest), or one step folder.
  `dtype`: the compute dtype to run in ("float32", "bfloat16"); the checkpoint's by default.
  The parameters stay float32 either way.
  """
  variables, meta = restore_variables(path)
  config = ModelConfig(**meta["model"])
  if dtype is not None:
    config = dataclasses.replace(config, dtype=dtype)
  model = nnx.eval_shape(lambda: build_model(config))  # shapes only: no random init to overwrite
  set_variables(model, jax.tree.map(jnp.asarray, variables), source=str(path))
  model.eval()
  return model, meta


def model_meta(config: ModelConfig, class_names, **extra) -> dict:
  return {"model": dataclasses.asdict(config), "input_norm": config.input_norm,
          "class_names": list(class_names), **extra}


def check_new_dir(out):
  """Refuses an `out` that exists (an empty folder is fine) before any work is done."""
  out = Path(out)
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise CheckpointError(f"{out}: already exists; choose a new output folder (nothing was written)")


def write_checkpoint(out, variables: dict, meta: dict):
  """A one-step work dir at `out` that load_model and --init-from read, renamed into place when complete."""
  check_new_dir(out)
  with atomic_dir(out) as tmp:
    ckpt = Checkpoints(tmp, keep=1)
    step = int(meta.get("step") or 0)
    ckpt.save(step, variables, {"step": np.int32(step)}, meta)
    ckpt.wait()
    ckpt.close()
