"""The training loop behind train.py: data, sharded steps, evaluation, checkpoints, resume."""

import dataclasses
import json
import math
import signal
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from deconvnet_jax import checkpoints, class_weights, configs, metrics, proposals, recipes, training
from deconvnet_jax.data import examples as ex_lib
from deconvnet_jax.data import coco, generated, pipeline, voc
from deconvnet_jax.models import build_model, set_variables

DEFAULT_DATA = Path("data/generated")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a run depends on; train.py fills it from the command line."""

  model: configs.ModelConfig = configs.MODELS["small"]
  model_name: str = "small"
  data: Path | None = None  # VOC-layout or COCO folder; None: the generated dataset
  coco_class_map: str | None = None  # set: `data` is a COCO folder read with this class map
  skip_bad: bool = False  # COCO: skip (and count) images with bad annotations instead of stopping
  train_split: str = "train"
  val_split: str = "val"
  val_limit: int | None = None  # evaluate on the first N val images only (COCO val has 5000)
  stage: int = 1  # 1: instance-centred crops, 2: proposal crops, 0: random crops of whole images
  proposals_per_image: int | None = None  # stage 2: keep at most this many per image
  stage2_iou: float = 0.5
  steps: int = 300
  epochs: float | None = None  # if set, overrides steps: epochs over the stage's examples
  batch_size: int = 8  # global micro-batch, split over all devices and hosts
  accumulate: int = 1  # micro-batches per step: the update is that of batch_size * accumulate
  crop: int = 128
  resize: int | None = None  # stages 1-2: the square is resized to this before cropping; None: crop * 250/224
  optim: training.OptimConfig = training.OptimConfig()
  eval_every: int = 100
  save_every: int = 100
  keep: int = 3
  seed: int = 0
  workdir: Path = Path("runs/default")
  init_from: Path | None = None  # a checkpoint whose variables start this run (fresh optimizer)
  class_balance: bool = False  # median-frequency class weights from the training split
  label_smoothing: float = 0.0
  recipe: str | None = None  # a recipes.RECIPES name (already applied to the fields above)


def resolve_data(cfg: TrainConfig) -> Path:
  if cfg.data is not None:
    return cfg.data
  if not (DEFAULT_DATA / "ImageSets").exists():
    print(f"No --data given: writing the generated dataset to {DEFAULT_DATA} ...")
    generated.generate(DEFAULT_DATA)
  print(f"No --data given: training on the generated dataset in {DEFAULT_DATA} "
        "(5 shape classes; pass --data VOCdevkit/VOC2012 for VOC).")
  return DEFAULT_DATA


def load_split(cfg: TrainConfig, root: Path, split: str, training: bool):
  """(examples, class names): a VOC split read into memory, or a lazy COCO split.

  COCO training splits skip images without objects of the class map (counted);
  evaluation splits keep them.
  """
  if cfg.coco_class_map:
    ds = coco.CocoDataset(root, split, cfg.coco_class_map, skip_empty=training, skip_bad=cfg.skip_bad)
    print(ds.summary())
    return ds, ds.class_names
  ids = voc.read_split(root, split)
  k = cfg.model.num_classes
  return ([voc.read_example(root, i, k) for i in tqdm(ids, desc=f"reading {split}", leave=False)],
          voc.VOC_CLASSES[:k])


def training_items(cfg: TrainConfig, examples: list[voc.Example]) -> tuple[int, object]:
  """(number of items, make_example(item index, rng)) for the configured stage."""
  norm = cfg.model.input_norm
  if cfg.stage == 0:
    return len(examples), lambda i, rng: pipeline.whole_image_example(examples[i], cfg.crop, norm, rng)
  spec = ex_lib.CropSpec(resize=cfg.resize or round(cfg.crop * 250 / 224), crop=cfg.crop)
  if cfg.stage == 1:
    # A lazy dataset (COCO) gives each image's instances without decoding it.
    headers = ([examples.instances(i) for i in range(len(examples))]
               if hasattr(examples, "instances") else examples)
    items = ex_lib.stage1_items(headers)
  else:
    items = ex_lib.stage2_items(
        examples, proposals.propose, cfg.stage2_iou, cfg.proposals_per_image)
  if not items:
    raise SystemExit(f"stage {cfg.stage}: no training examples (no instances / no proposal with "
                     f"IoU >= {cfg.stage2_iou})")
  print(f"stage {cfg.stage}: {len(items)} examples from {len(examples)} images")
  return len(items), lambda i, rng: pipeline.crop_example(examples[items[i].index], items[i], spec, norm, rng)


def training_batches(cfg: TrainConfig, examples, rows: int, start_step: int = 0) -> tuple[int, object]:
  """(number of items, this host's batches start_step, start_step + 1, ...) of `rows` global rows each."""
  num_items, make_example = training_items(cfg, examples)
  dataset = pipeline.training_dataset(num_items, make_example, rows // jax.process_count(),
                                      cfg.seed, jax.process_index(), jax.process_count())
  return num_items, pipeline.batches_from(dataset, start_step)


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


def loss_config(cfg: TrainConfig, data: Path, train_set: list[voc.Example], class_names) -> training.LossConfig:
  """The loss options; class weights are computed once per split and cached in the work dir."""
  weights = None
  if cfg.class_balance:
    key = {"data": str(Path(data).absolute()), "split": cfg.train_split, "images": len(train_set),
           "num_classes": len(class_names)}
    labels = (ex.label for ex in tqdm(train_set, desc="class frequencies", leave=False))
    weights = class_weights.cached_weights(cfg.workdir / "class_weights.json", key, labels, len(class_names))
    print("median-frequency class weights: " +
          ", ".join(f"{n} {w:.2f}" for n, w in zip(class_names, weights)))
    weights = tuple(float(w) for w in weights)
  return training.LossConfig(class_weights=weights, label_smoothing=cfg.label_smoothing)


def _variables(state) -> dict:
  return {"params": nnx.to_pure_dict(state.params), "batch_stats": nnx.to_pure_dict(state.batch_stats)}


def run(cfg: TrainConfig) -> dict:
  """Trains (resuming from cfg.workdir if it holds checkpoints); returns the last metrics."""
  data = resolve_data(cfg)
  model_cfg = cfg.model
  train_set, class_names = load_split(cfg, data, cfg.train_split, training=True)
  val_set, _ = load_split(cfg, data, cfg.val_split, training=False)
  if cfg.val_limit is not None:
    val_set = [val_set[i] for i in range(min(cfg.val_limit, len(val_set)))]
  if cfg.coco_class_map == "coco" and len(class_names) != model_cfg.num_classes:
    print(f"the coco class map of this annotation file has {len(class_names)} classes: "
          f"num_classes = {len(class_names)}")
    model_cfg = dataclasses.replace(model_cfg, num_classes=len(class_names))
    cfg = dataclasses.replace(cfg, model=model_cfg)
  if len(class_names) != model_cfg.num_classes:
    raise SystemExit(f"the data has {len(class_names)} classes, the model {model_cfg.num_classes}: "
                     f"pass --num-classes {len(class_names)}")
  mesh = training.make_mesh()
  if cfg.batch_size % mesh.size:
    raise SystemExit(f"--batch-size {cfg.batch_size} must be a multiple of the {mesh.size} devices")
  if cfg.accumulate < 1:
    raise SystemExit(f"--accumulate must be at least 1, got {cfg.accumulate}")
  step_batch = cfg.batch_size * cfg.accumulate  # examples per update
  tx = training.make_optimizer(cfg.optim)
  model = build_model(model_cfg, cfg.seed)
  ckpt = checkpoints.Checkpoints(cfg.workdir, cfg.keep)
  start_step = ckpt.latest_step() or 0
  if start_step:
    checkpoints.check_same_model(cfg.workdir / "checkpoints", model_cfg)
  elif cfg.init_from is not None:
    variables, meta = checkpoints.restore_variables(cfg.init_from)
    try:
      set_variables(model, variables, source=str(cfg.init_from))
    except ValueError as e:
      raise SystemExit(f"error: --init-from {e}") from e
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

  num_items, batches = training_batches(cfg, train_set, step_batch, start_step)
  step_fn = training.jit_train_step(graphdef, tx, mesh, micro_batches=cfg.accumulate,
                                    loss=loss_config(cfg, data, train_set, class_names))
  forward = training.jit_eval_logits(graphdef, mesh)
  meta = checkpoints.model_meta(model_cfg, class_names, train_config=_jsonable(cfg))
  cfg.workdir.mkdir(parents=True, exist_ok=True)
  (cfg.workdir / "config.json").write_text(json.dumps(meta, indent=2))
  log = open(cfg.workdir / "metrics.jsonl", "a", encoding="utf-8")
  print(f"{len(train_set)} train / {len(val_set)} val images; model {cfg.model_name}; "
        f"{mesh.size} {jax.devices()[0].platform} device(s); work dir {cfg.workdir}")
  if cfg.accumulate > 1:
    print(f"gradient accumulation: {cfg.accumulate} micro-batches of {cfg.batch_size} per step "
          f"(effective batch {step_batch})")

  interrupted = []
  previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
  record: dict = {}
  step = start_step
  total = cfg.steps if cfg.epochs is None else math.ceil(cfg.epochs * num_items / step_batch)
  if cfg.recipe:
    print(recipes.describe(cfg.recipe, model_cfg, cfg.crop, step_batch, total))
  bar = tqdm(total=total, initial=start_step, desc="train", dynamic_ncols=True)
  t0, done0 = time.perf_counter(), start_step
  try:
    while step < total and not interrupted:
      state, m = step_fn(state, training.global_batch(next(batches), mesh))
      step += 1
      bar.update(1)
      last = step == total
      if step % 10 == 0 or last or step % cfg.save_every == 0:
        loss = float(m["loss"])
        if not np.isfinite(loss):
          raise SystemExit(f"step {step}: loss is {loss}; stopped. The last good checkpoint is in "
                           f"{cfg.workdir / 'checkpoints'}; lower the learning rate (--lr) and resume.")
        rate = (step - done0) * step_batch / (time.perf_counter() - t0)
        bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{rate:.1f}")
        record = {"step": step, "loss": loss, "accuracy": float(m["accuracy"]), "img_per_s": rate}
        if step % cfg.eval_every == 0 or last:
          record |= evaluate(forward, state, val_set, cfg.batch_size, model_cfg.input_norm, class_names)
          ious = zip(class_names, record["val_iou"]) if len(class_names) <= 21 else ()
          bar.write(f"step {step}: loss {loss:.3f}, val mIoU {record['val_miou']:.3f}" +
                    "".join(f", {n[:5]} {x:.2f}" for n, x in ious if x is not None))
          if "collapse" in record:
            bar.write(f"WARNING step {step}: {record['collapse']}")
        log.write(json.dumps(record) + "\n")
        log.flush()
      if step % cfg.save_every == 0 or last or interrupted:
        _save(ckpt, state, step, meta, record)
    if interrupted:
      print(f"\ninterrupted: saved step {step} in {cfg.workdir / 'checkpoints'}; run again to resume")
  finally:
    signal.signal(signal.SIGINT, previous)
    bar.close()
    ckpt.wait()
    ckpt.close()
    log.close()
  return record


def _save(ckpt, state, step, meta, record):
  metric = record.get("val_miou") if record.get("step") == step else None
  ckpt.save(step, _variables(state), {"opt_state": state.opt_state, "step": state.step},
            meta | {"step": step, "data_position": {"next_batch": step},
                    "metrics": record if metric is not None else {}}, metric)


def _jsonable(cfg: TrainConfig) -> dict:
  return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
