"""Orbax checkpoints: the last N under WORKDIR/checkpoints, the best by val mIoU under WORKDIR/best.

Each step directory holds three items:
  variables  {"params": ..., "batch_stats": ...} as plain nested dicts (any Flax code can read them)
  train      {"opt_state": ..., "step": ...}, only what resuming needs besides the variables
  meta       JSON: the model config, input normalisation, class names, data position, metrics
Orbax writes each step to a temporary directory and renames it when complete,
so a killed run never leaves a half-written checkpoint behind.
"""

import dataclasses
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from deconvnet_jax.configs import ModelConfig
from deconvnet_jax.models import build_model, set_variables


class CheckpointError(ValueError):
  """A checkpoint is missing or does not fit; the message names it."""


def _manager(directory: Path, keep: int | None, create=True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
  return ocp.CheckpointManager(directory.absolute(), options=options,
                               item_names=("variables", "train", "meta"))


class Checkpoints:
  """Saves to `latest` (keeps `keep`) and, when the metric improves, to `best` (keeps 1).

  Two managers because orbax's best_fn alone would delete the newest checkpoint
  when it is not among the best, and resuming needs the newest.
  """

  def __init__(self, workdir, keep: int = 3):
    self.workdir = Path(workdir)
    self.latest = _manager(self.workdir / "checkpoints", keep)
    self.best = _manager(self.workdir / "best", 1)
    best = self.best.latest_step()
    self.best_metric = (self.best.restore(best, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
                        .meta.get("metrics", {}).get("val_miou") if best is not None else None)

  def save(self, step: int, variables: dict, train: dict, meta: dict, metric: float | None = None):
    def args():
      return ocp.args.Composite(variables=ocp.args.StandardSave(variables),
                                train=ocp.args.StandardSave(train), meta=ocp.args.JsonSave(meta))

    self.latest.save(step, args=args(), force=True)
    if metric is not None and (self.best_metric is None or metric > self.best_metric):
      self.best_metric = metric
      self.best.save(step, args=args(), force=True)

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def restore(self, step: int, variables_target, train_target) -> tuple[dict, dict, dict]:
    """(variables, train, meta) of `step`, laid out (and sharded) like the targets."""
    restored = self.latest.restore(step, args=ocp.args.Composite(
        variables=ocp.args.StandardRestore(variables_target),
        train=ocp.args.StandardRestore(train_target), meta=ocp.args.JsonRestore()))
    return restored.variables, restored.train, restored.meta

  def wait(self):
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


def read_meta(path) -> dict:
  directory, step = _step_dir(path)
  with _manager(directory, None, create=False) as manager:
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def check_same_model(path, config: ModelConfig):
  """Refuses to resume a checkpoint of another network with an error naming what differs."""
  saved = read_meta(path)["model"]
  shape_fields = ("arch", "num_classes", "width", "fc_dim", "fc_kernel", "batch_norm")
  diff = [f"{k}: checkpoint {saved.get(k)!r}, now {getattr(config, k)!r}"
          for k in shape_fields if saved.get(k) != getattr(config, k)]
  if diff:
    raise CheckpointError(f"{path}: holds another network ({'; '.join(diff)}); use another "
                          "--workdir, or --init-from for a compatible one")


def restore_variables(path) -> tuple[dict, dict]:
  """(variables as NumPy nested dicts, meta) of a checkpoint; no model needed."""
  directory, step = _step_dir(path)
  with _manager(directory, None, create=False) as manager:
    restored = manager.restore(step, args=ocp.args.Composite(
        variables=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
  return restored.variables, restored.meta


def load_model(path):
  """The trained model (eval mode) and its meta (config, input_norm, class names) in one call.

  `path`: a train.py work dir (its best checkpoint, else its latest), or one step folder.
  """
  variables, meta = restore_variables(path)
  config = ModelConfig(**meta["model"])
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
  out = Path(out)
  check_new_dir(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    ckpt = Checkpoints(tmp, keep=1)
    step = int(meta.get("step") or 0)
    ckpt.save(step, variables, {"step": np.int32(step)}, meta)
    ckpt.wait()
    ckpt.close()
    if out.exists():
      out.rmdir()
    tmp.rename(out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
