"""The training loop behind train.py: data, sharded steps, evaluation, checkpoints, resume."""

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import signal
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from deconvnet_jax import (boxes, checkpoints, class_weights, configs, edge_boxes, locks, metrics, proposals,
                           recipes, training)
from deconvnet_jax.box_files import BoxFiles
from deconvnet_jax.configs import TrainConfig
from deconvnet_jax.data import examples as ex_lib
from deconvnet_jax.data import pipeline, sources
from deconvnet_jax.data import items as items_lib
from deconvnet_jax.images import save_text_atomic
from deconvnet_jax.tensorboard import RunWriter
from deconvnet_jax.labels import DataError
from deconvnet_jax.models import build_model, min_input_size, set_variables

PAPER_TRAIN_IMAGES = 10_582  # train_aug (SPEC.md section 2)


class TrainError(ValueError):
  """A run cannot start or go on as configured; the message says why and what to change."""


def proposal_settings(generator: str = "windows", proposals_from: Path | None = None) -> dict:
  """What the stage-2 proposals depend on: the generator, its settings and its code, or the box files."""
  if proposals_from is not None:
    path = Path(proposals_from).absolute()
    return {"from": str(path), "mtime_ns": path.stat().st_mtime_ns if path.exists() else None}
  code = hashlib.sha1(b"".join(Path(m.__file__).read_bytes() for m in (proposals, edge_boxes, boxes)))
  return {"generator": generator, "top_k": 50, "code": code.hexdigest()[:16]}


def stage_items(cfg: TrainConfig, split, cache_dir: Path | None) -> items_lib.Items:
  """The stage-1/2 item list of `split`, computed once per split and settings and cached in cache_dir."""
  if cfg.stage == 1:
    key = items_lib.cache_key(split, stage=1)
    compute = lambda: items_lib.stage1_items(split)
  else:
    key = items_lib.cache_key(split, stage=2, iou=cfg.stage2_iou, per_image=cfg.proposals_per_image,
                              proposals=proposal_settings(cfg.proposals, cfg.proposals_from))
    if cfg.proposals_from is None:
      propose = lambda i: proposals.propose(split[i].image, generator=cfg.proposals)[0]
    else:
      source = BoxFiles(cfg.proposals_from)
      propose = lambda i: source.boxes(split.image_id(i), *split.size(i))[0]
    compute = lambda: items_lib.stage2_items(split, propose, cfg.stage2_iou, cfg.proposals_per_image)
  start = time.perf_counter()
  items, path, hit = items_lib.cached(cache_dir, key, compute)
  if not len(items):
    raise DataError(f"stage {cfg.stage}: no training examples in {split.name} (no instances"
                    + (f" / no proposal with IoU >= {cfg.stage2_iou})" if cfg.stage == 2 else ")"))
  how = (f"cached in {path}" if hit else f"computed in {time.perf_counter() - start:.1f} s"
         + (f", saved to {path}" if path else ""))
  print(f"stage {cfg.stage}: {len(items):,} examples from {items.num_images():,} of {len(split):,} images ({how})")
  return items


def training_items(cfg: TrainConfig, split, cache_dir: Path | None = None) -> tuple[int, object]:
  """(number of items, make_example(item index, rng)) for the configured stage; images decode on demand."""
  norm = cfg.model.input_norm
  if cfg.stage == 0:
    return len(split), lambda i, rng: pipeline.whole_image_example(split[i], cfg.crop, norm, rng)
  spec = ex_lib.CropSpec(resize=cfg.crop_resize, crop=cfg.crop)
  items = stage_items(cfg, split, cache_dir)

  def make_example(i, rng):
    item = items[i]
    return pipeline.crop_example(split[item.index], item, spec, norm, rng)

  return len(items), make_example


def training_batches(cfg: TrainConfig, split, rows: int, start_step: int = 0,
                     cache_dir: Path | None = None) -> tuple[int, object]:
  """(number of items, this host's batches start_step, start_step + 1, ...) of `rows` global rows each."""
  num_items, make_example = training_items(cfg, split, cache_dir)
  dataset = pipeline.training_dataset(num_items, make_example, rows // jax.process_count(),
                                      cfg.seed, jax.process_index(), jax.process_count())
  return num_items, pipeline.batches_from(dataset, start_step)


def open_data(cfg: TrainConfig) -> tuple[TrainConfig, object, object]:
  """(cfg with the data resolved and the class count checked, train split, val split), both lazy."""
  cfg = dataclasses.replace(cfg, data=sources.resolve_data(cfg.data))
  k = cfg.model.num_classes
  train = sources.open_split(cfg.data, cfg.data.train_split, k, training=True)
  val = sources.open_split(cfg.data, cfg.data.val_split, k, training=False)
  if cfg.val_limit is not None:
    val = sources.Subset(val, cfg.val_limit)
  names = train.class_names
  if cfg.data.kind == "coco" and cfg.data.coco_class_map == "coco" and len(names) != k:
    print(f"the coco class map of this annotation file has {len(names)} classes: num_classes = {len(names)}")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=len(names)))
  if len(names) != cfg.model.num_classes:
    raise TrainError(f"the data has {len(names)} classes, the model {cfg.model.num_classes}: "
                     f"pass --num-classes {len(names)}")
  print(f"training on {train.name}: {len(train):,} images; validating on {val.name}: {len(val):,} images")
  if cfg.recipe and len(train) < PAPER_TRAIN_IMAGES and cfg.data.kind == "voc" and cfg.data.sbd is None:
    print(f"note: the paper trained on train_aug ({PAPER_TRAIN_IMAGES:,} images); add --sbd "
          "benchmark_RELEASE/dataset (or use --tfds with the train_aug config) to train on it")
  return cfg, train, val


def evaluate(forward, state, examples, batch_size: int, norm: str, class_names) -> dict:
  """Full-image mIoU and per-class IoU over `examples` with BatchNorm's stored statistics.

  Adds "collapse": a warning, when the predictions collapsed onto one class.
  """
  num_classes = len(class_names)
  conf = np.zeros((num_classes, num_classes), np.int64)
  for images, labels in pipeline.padded_eval_batches(examples, batch_size, norm):
    pred = np.asarray(forward(state.params, state.batch_stats, images)).argmax(-1)
    conf += metrics.confusion_matrix(labels, pred, num_classes)
  ious = metrics.iou_per_class(conf)
  record = {"val_miou": metrics.mean_iou(conf), "val_pixel_acc": metrics.pixel_accuracy(conf),
            "val_iou": [None if np.isnan(x) else round(float(x), 4) for x in ious]}
  warning = metrics.collapse_warning(conf, class_names)
  return record | ({"collapse": warning} if warning else {})


def sample_predictions(forward, state, examples, batch_size: int, norm: str, n: int = 3):
  """(images, labels, predictions) of the first n examples, each run alone in an evaluation-shaped batch
  (the shapes `evaluate` compiled), for TensorBoard."""
  images, truths, preds = [], [], []
  for i in range(min(n, len(examples))):
    ex = examples[i]
    h, w = ex.label.shape
    (x, _), = pipeline.padded_eval_batches([ex], batch_size, norm, threads=1)
    preds.append(np.asarray(forward(state.params, state.batch_stats, x))[0, :h, :w].argmax(-1))
    images.append(ex.image)
    truths.append(ex.label)
  return images, truths, preds


def loss_config(cfg: TrainConfig, train_split, class_names) -> training.LossConfig:
  """The loss options; class weights are computed once per split and cached in the work dir."""
  weights = None
  if cfg.class_balance:
    key = {"data": train_split.fingerprint, "num_classes": len(class_names)}
    labels = (train_split[i].label for i in tqdm(range(len(train_split)), desc="class frequencies",
                                                 leave=False))
    weights = class_weights.cached_weights(cfg.workdir / "class_weights.json", key, labels, len(class_names))
    print("median-frequency class weights: " +
          ", ".join(f"{n} {w:.2f}" for n, w in zip(class_names, weights)))
    weights = tuple(float(w) for w in weights)
  return training.LossConfig(class_weights=weights, label_smoothing=cfg.label_smoothing)


def _variables(state) -> dict:
  return {"params": nnx.to_pure_dict(state.params), "batch_stats": nnx.to_pure_dict(state.batch_stats)}


def initial_state(cfg: TrainConfig, ckpt: checkpoints.Checkpoints, mesh, tx):
  """(graphdef, replicated TrainState, start step): resumed from the work dir, --init-from, or fresh.

  Resuming takes the newest checkpoint that reads; unreadable newer ones are set aside with a warning.
  """
  model = build_model(cfg.model, cfg.seed)
  resume = ckpt.latest_step() is not None
  if not resume and cfg.init_from is not None:
    variables, meta = checkpoints.restore_variables(cfg.init_from)
    try:
      set_variables(model, variables, source=str(cfg.init_from))
    except ValueError as e:
      raise TrainError(f"--init-from {e}") from e
    print(f"initialised from {cfg.init_from} (step {meta.get('step')}); fresh optimizer")
  graphdef, state = training.init_train_state(model, tx)
  del model
  state = training.replicate(state, mesh)
  if not resume:
    return graphdef, state, 0
  check = lambda meta, path: checkpoints.check_same_model(meta, cfg.model, path)
  restored = ckpt.restore_latest(_variables(state), {"opt_state": state.opt_state, "step": state.step}, check)
  if restored is None:
    return graphdef, state, 0
  step, variables, train, _ = restored
  params, stats = state.params, state.batch_stats
  nnx.replace_by_pure_dict(params, variables["params"])
  nnx.replace_by_pure_dict(stats, variables["batch_stats"])
  state = training.replicate(training.TrainState(params, stats, train["opt_state"], train["step"]), mesh)
  print(f"resuming from {cfg.workdir / 'checkpoints' / str(step)}")
  return graphdef, state, step


def check_settings(cfg: TrainConfig, mesh) -> None:
  """Refuses settings that cannot run, before any work is done."""
  if cfg.batch_size % mesh.size:
    raise TrainError(f"--batch-size {cfg.batch_size} must be a multiple of the {mesh.size} devices")
  if cfg.proposals not in proposals.GENERATORS:
    raise TrainError(f"--proposals {cfg.proposals!r}: stage 2 takes one of {', '.join(proposals.GENERATORS)}")
  if cfg.accumulate < 1:
    raise TrainError(f"--accumulate must be at least 1, got {cfg.accumulate}")
  if cfg.model.arch == "deconvnet" and cfg.crop < min_input_size(cfg.model):
    raise TrainError(f"--crop {cfg.crop} is too small: with fc_kernel={cfg.model.fc_kernel} DeconvNet "
                     f"needs at least {min_input_size(cfg.model)} pixels per side")


@contextlib.contextmanager
def stop_signals():
  """Yields a list that SIGINT (Ctrl-C) and SIGTERM (preemption) append their number to, instead of
  stopping the process, so the loop can save and stop.

  On several hosts SIGTERM is left to JAX's preemption service (see `preempted`), and Ctrl-C stops
  the host it reaches, as usual: one host cannot save alone.
  """
  received: list[int] = []
  handled = [signal.SIGINT, signal.SIGTERM] if jax.process_count() == 1 else []
  previous = {s: signal.signal(s, lambda signum, _: received.append(signum)) for s in handled}
  try:
    yield received
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


def preempted(step: int) -> bool:
  """On several hosts: whether all of them reached the step JAX's preemption service chose to save at.

  Every host calls this after every step; when any host gets SIGTERM, they agree on the next step
  (see jax.experimental.multihost_utils.reached_preemption_sync_point).
  """
  if jax.process_count() == 1:
    return False
  try:
    return multihost_utils.reached_preemption_sync_point(step)
  except RuntimeError:  # the preemption service is off (jax_enable_preemption_service)
    return False


@dataclasses.dataclass
class Result:
  """What run() ends with: the last step, its metrics, and the signal that stopped it (None if it finished)."""
  step: int
  record: dict
  signal: int | None = None


def append_line(path: Path, line: str) -> None:
  """Appends one line, or nothing: a failed write (a full disk) is cut back off before the error."""
  with open(path, "ab", buffering=0) as f:  # unbuffered: closing has nothing left to write
    size = f.seek(0, os.SEEK_END)
    try:
      f.write((line + "\n").encode())
    except OSError as e:
      with contextlib.suppress(OSError):
        os.truncate(path, size)
      raise TrainError(f"{path}: cannot write the metrics line ({e.strerror}); the checkpoints in "
                       f"{path.parent / 'checkpoints'} are intact; free space, then run again to resume") from e


def run(cfg: TrainConfig) -> Result:
  """Trains (resuming from cfg.workdir if it holds checkpoints) until done or stopped by a signal.

  The work dir is locked for the run (another train.py there is refused, naming its pid).
  """
  t_start = time.perf_counter()
  cfg, train_set, val_set = open_data(cfg)
  mesh = training.make_mesh()
  check_settings(cfg, mesh)
  lock = (locks.folder_lock(cfg.workdir, "train.py", "choose another --workdir")
          if jax.process_index() == 0 else contextlib.nullcontext())
  with lock:
    ckpt = checkpoints.Checkpoints(cfg.workdir, cfg.keep)
    try:
      return _train(cfg, train_set, val_set, mesh, ckpt, t_start)
    finally:
      with contextlib.suppress(Exception):  # a failed save has raised already
        ckpt.close()


def _train(cfg: TrainConfig, train_set, val_set, mesh, ckpt, t_start) -> Result:
  step_batch = cfg.batch_size * cfg.accumulate  # examples per update
  tx = training.make_optimizer(cfg.optim)
  graphdef, state, step = initial_state(cfg, ckpt, mesh, tx)
  num_items, batches = training_batches(cfg, train_set, step_batch, step, cfg.workdir / "items")
  step_fn = training.jit_train_step(graphdef, tx, mesh, micro_batches=cfg.accumulate,
                                    loss=loss_config(cfg, train_set, train_set.class_names))
  forward = training.jit_eval_logits(graphdef, mesh)
  meta = checkpoints.model_meta(cfg.model, train_set.class_names, train_config=configs.to_json(cfg))
  if jax.process_index() == 0:
    save_text_atomic(json.dumps(meta, indent=2), cfg.workdir / "config.json")
  print(f"model {cfg.model_name}; {mesh.size} {jax.devices()[0].platform} device(s); work dir {cfg.workdir}")
  if cfg.accumulate > 1:
    print(f"gradient accumulation: {cfg.accumulate} micro-batches of {cfg.batch_size} per step "
          f"(effective batch {step_batch})")
  total = cfg.steps if cfg.epochs is None else math.ceil(cfg.epochs * num_items / step_batch)
  if cfg.recipe:
    print(recipes.describe(cfg.recipe, cfg.model, cfg.crop, step_batch, total))
  if step >= total:
    print(f"nothing to train: the work dir's checkpoint is at step {step} of {total}; raise --steps "
          "(or --epochs) to go on")
  evaluate_now = lambda state: evaluate(forward, state, val_set, cfg.batch_size, cfg.model.input_norm,
                                        train_set.class_names)
  record: dict = {}
  start_step, t0 = step, time.perf_counter()
  lr = training.learning_rate(cfg.optim)
  events = RunWriter(cfg.workdir, train_set.class_names) if jax.process_index() == 0 else None
  with (stop_signals() as received, tqdm(total=total, initial=step, desc="train", dynamic_ncols=True) as bar,
        contextlib.closing(events) if events else contextlib.nullcontext()):
    while step < total and not received:
      state, m = step_fn(state, training.global_batch(next(batches), mesh))
      step += 1
      bar.update(1)
      if step == start_step + 1:
        jax.block_until_ready(m)
        bar.write(f"first step done {time.perf_counter() - t_start:.1f} s after the start")
      if preempted(step):
        received.append(signal.SIGTERM)
      last = step == total
      if step % 10 == 0 or last or step % cfg.save_every == 0:
        rate = (step - start_step) * step_batch / (time.perf_counter() - t0)
        record = _step_record(cfg, step, m, rate)
        bar.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{rate:.1f}")
        samples = None
        if step % cfg.eval_every == 0 or last:
          record |= evaluate_now(state)
          _report(bar, record, train_set.class_names)
          # On every host, like evaluate: the forward is one program over all devices.
          samples = sample_predictions(forward, state, val_set, cfg.batch_size, cfg.model.input_norm)
        if events:
          append_line(cfg.workdir / "metrics.jsonl", json.dumps(record))
          events.record(record, float(lr(step - 1)))
          if samples:
            events.predictions(step, *samples)
      if (step % cfg.save_every == 0 or last or received) and step > start_step:
        _save(ckpt, state, step, meta, record)
    ckpt.wait()
  if received:
    name = signal.Signals(received[0]).name
    print(f"\nstopped by {name}: saved step {step} in {cfg.workdir / 'checkpoints'}; run again to resume")
  return Result(step, record, received[0] if received else None)


def _step_record(cfg: TrainConfig, step: int, metrics_: dict, rate: float) -> dict:
  """The step's metrics line; a non-finite loss stops the run before anything is saved."""
  loss = float(metrics_["loss"])
  if not np.isfinite(loss):
    raise TrainError(f"step {step}: loss is {loss}; stopped. The last good checkpoint is in "
                     f"{cfg.workdir / 'checkpoints'}; lower the learning rate (--lr) and resume.")
  return {"step": step, "loss": loss, "accuracy": float(metrics_["accuracy"]), "img_per_s": rate}


def _report(bar, record: dict, class_names) -> None:
  ious = zip(class_names, record["val_iou"]) if len(class_names) <= 21 else ()
  bar.write(f"step {record['step']}: loss {record['loss']:.3f}, val mIoU {record['val_miou']:.3f}" +
            "".join(f", {n[:5]} {x:.2f}" for n, x in ious if x is not None))
  if "collapse" in record:
    bar.write(f"WARNING step {record['step']}: {record['collapse']}")


def _save(ckpt, state, step, meta, record):
  metric = record.get("val_miou") if record.get("step") == step else None
  ckpt.save(step, _variables(state), {"opt_state": state.opt_state, "step": state.step},
            meta | {"step": step, "data_position": {"next_batch": step},
                    "metrics": record if metric is not None else {}}, metric)
