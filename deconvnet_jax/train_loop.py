"""The training loop behind train.py: data, sharded steps, evaluation, checkpoints, resume."""

import contextlib
import dataclasses
import hashlib
import json
import math
import signal
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from deconvnet_jax import (boxes, checkpoints, class_weights, configs, edge_boxes, metrics, proposals, recipes,
                           training)
from deconvnet_jax.box_files import BoxFiles
from deconvnet_jax.configs import TrainConfig
from deconvnet_jax.data import examples as ex_lib
from deconvnet_jax.data import pipeline, sources
from deconvnet_jax.data import items as items_lib
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
  """(graphdef, replicated TrainState, start step): resumed from the work dir, --init-from, or fresh."""
  model = build_model(cfg.model, cfg.seed)
  start_step = ckpt.latest_step() or 0
  if start_step:
    checkpoints.check_same_model(cfg.workdir / "checkpoints", cfg.model)
  elif cfg.init_from is not None:
    variables, meta = checkpoints.restore_variables(cfg.init_from)
    try:
      set_variables(model, variables, source=str(cfg.init_from))
    except ValueError as e:
      raise TrainError(f"--init-from {e}") from e
    print(f"initialised from {cfg.init_from} (step {meta.get('step')}); fresh optimizer")
  graphdef, state = training.init_train_state(model, tx)
  del model
  state = training.replicate(state, mesh)
  if start_step:
    variables, train, _ = ckpt.restore(start_step, _variables(state), {"opt_state": state.opt_state,
                                                                       "step": state.step})
    params, stats = state.params, state.batch_stats
    nnx.replace_by_pure_dict(params, variables["params"])
    nnx.replace_by_pure_dict(stats, variables["batch_stats"])
    state = training.replicate(training.TrainState(params, stats, train["opt_state"], train["step"]), mesh)
    print(f"resuming from {cfg.workdir / 'checkpoints' / str(start_step)}")
  return graphdef, state, start_step


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
def sigint_flag():
  """Yields a list that Ctrl-C appends to (instead of raising), so the loop can save and stop."""
  interrupted: list[bool] = []
  previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
  try:
    yield interrupted
  finally:
    signal.signal(signal.SIGINT, previous)


def run(cfg: TrainConfig) -> dict:
  """Trains (resuming from cfg.workdir if it holds checkpoints); returns the last metrics."""
  t_start = time.perf_counter()
  cfg, train_set, val_set = open_data(cfg)
  mesh = training.make_mesh()
  check_settings(cfg, mesh)
  step_batch = cfg.batch_size * cfg.accumulate  # examples per update
  tx = training.make_optimizer(cfg.optim)
  ckpt = checkpoints.Checkpoints(cfg.workdir, cfg.keep)
  try:
    graphdef, state, step = initial_state(cfg, ckpt, mesh, tx)
    num_items, batches = training_batches(cfg, train_set, step_batch, step, cfg.workdir / "items")
    step_fn = training.jit_train_step(graphdef, tx, mesh, micro_batches=cfg.accumulate,
                                      loss=loss_config(cfg, train_set, train_set.class_names))
    forward = training.jit_eval_logits(graphdef, mesh)
    meta = checkpoints.model_meta(cfg.model, train_set.class_names, train_config=configs.to_json(cfg))
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    (cfg.workdir / "config.json").write_text(json.dumps(meta, indent=2))
    print(f"model {cfg.model_name}; {mesh.size} {jax.devices()[0].platform} device(s); work dir {cfg.workdir}")
    if cfg.accumulate > 1:
      print(f"gradient accumulation: {cfg.accumulate} micro-batches of {cfg.batch_size} per step "
            f"(effective batch {step_batch})")
    total = cfg.steps if cfg.epochs is None else math.ceil(cfg.epochs * num_items / step_batch)
    if cfg.recipe:
      print(recipes.describe(cfg.recipe, cfg.model, cfg.crop, step_batch, total))
    evaluate_now = lambda state: evaluate(forward, state, val_set, cfg.batch_size, cfg.model.input_norm,
                                          train_set.class_names)
    record: dict = {}
    start_step, t0 = step, time.perf_counter()
    with (open(cfg.workdir / "metrics.jsonl", "a", encoding="utf-8") as log, sigint_flag() as interrupted,
          tqdm(total=total, initial=step, desc="train", dynamic_ncols=True) as bar):
      while step < total and not interrupted:
        state, m = step_fn(state, training.global_batch(next(batches), mesh))
        step += 1
        bar.update(1)
        if step == start_step + 1:
          jax.block_until_ready(m)
          bar.write(f"first step done {time.perf_counter() - t_start:.1f} s after the start")
        last = step == total
        if step % 10 == 0 or last or step % cfg.save_every == 0:
          rate = (step - start_step) * step_batch / (time.perf_counter() - t0)
          record = _step_record(cfg, step, m, rate)
          bar.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{rate:.1f}")
          if step % cfg.eval_every == 0 or last:
            record |= evaluate_now(state)
            _report(bar, record, train_set.class_names)
          log.write(json.dumps(record) + "\n")
          log.flush()
        if step % cfg.save_every == 0 or last or interrupted:
          _save(ckpt, state, step, meta, record)
    if interrupted:
      print(f"\ninterrupted: saved step {step} in {cfg.workdir / 'checkpoints'}; run again to resume")
  finally:
    ckpt.wait()
    ckpt.close()
  return record


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
