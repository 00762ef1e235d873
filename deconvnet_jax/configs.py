"""Configurations as frozen dataclasses: the model (named: paper, small, ...), optimizer, data and run."""

import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path

NORMALIZATIONS = ("caffe_bgr", "torchvision_rgb")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """What fixes a network's parameters and how it reads its input."""

  arch: str = "deconvnet"  # "deconvnet" or "fcn8s"
  num_classes: int = 21
  width: float = 1.0  # multiplies every conv/deconv channel count (64 ... 512)
  fc_dim: int = 4096  # fc6/fc7 channels
  fc_kernel: int = 7  # fc6 / fc6-deconv kernel; pool5 must be at least this large
  batch_norm: bool = True  # BatchNorm after every conv / deconv; False: none, or folded into them
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: str = "float32"  # compute dtype; parameters and BN statistics stay float32
  input_norm: str = "caffe_bgr"  # see normalization.py
  unpool_method: str = "select"  # see ops.max_unpool

  def __post_init__(self):
    if self.arch not in ("deconvnet", "fcn8s"):
      raise ValueError(f"arch must be 'deconvnet' or 'fcn8s', got {self.arch!r}")
    if self.input_norm not in NORMALIZATIONS:
      raise ValueError(f"input_norm must be one of {NORMALIZATIONS}, got {self.input_norm!r}")

  def channels(self, n: int) -> int:
    return max(1, round(n * self.width))


MODELS = {
    # The network of SPEC.md section 1: ~252 M parameters.
    "paper": ModelConfig(),
    # 1/8 width, fc 64 with 2x2 fc6: runs 64x64 inputs in tests and on laptops.
    "small": ModelConfig(width=0.125, fc_dim=64, fc_kernel=2),
    "fcn8s": ModelConfig(arch="fcn8s", batch_norm=False),
    "fcn8s-small": ModelConfig(arch="fcn8s", batch_norm=False, width=0.125, fc_dim=64),
}


def model_config(name: str, **overrides) -> ModelConfig:
  """The named configuration with some fields replaced."""
  if name not in MODELS:
    raise ValueError(f"unknown model config {name!r}; choose one of {sorted(MODELS)}")
  return dataclasses.replace(MODELS[name], **overrides)


def parse_field(name: str, text: str):
  """A ModelConfig field's value from command-line text, typed like the field's default."""
  fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
  if name not in fields:
    raise ValueError(f"unknown model config field {name!r}; fields: {', '.join(fields)}")
  kind = type(getattr(ModelConfig(), name))
  if kind is bool:
    if text.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"{name} takes true or false, got {text!r}")
    return text.lower() in ("true", "1")
  return kind(text)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """The paper's SGD: lr 0.01, momentum 0.9, weight decay 5e-4 on kernels; optional step decay."""

  learning_rate: float = 0.01
  momentum: float = 0.9
  weight_decay: float = 5e-4
  decay_steps: tuple[int, ...] = ()  # multiply the rate by decay_factor at each of these steps
  decay_factor: float = 0.1


DATA_KINDS = ("voc", "tfds", "coco")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Which dataset a run reads, and its splits (data/sources.py opens them)."""

  kind: str = "voc"  # "voc": a VOC-layout folder (+ SBD for train_aug); "tfds": a prepared TFDS dir; "coco"
  root: Path | None = None  # the VOC2012 folder, TFDS data dir or COCO root; None: the generated dataset
  sbd: Path | None = None  # SBD's benchmark_RELEASE/dataset: read for the train_aug split
  tfds_config: str = "train_aug"  # the builder's config: "train_aug" or "voc2012"
  coco_class_map: str = "voc"  # "voc": VOC's 20 categories; "coco": all 80
  skip_bad: bool = False  # COCO: skip (and count) images with bad annotations instead of stopping
  train_split: str = "train"  # "train_aug" with a VOC folder and SBD
  val_split: str = "val"

  def __post_init__(self):
    if self.kind not in DATA_KINDS:
      raise ValueError(f"data kind must be one of {DATA_KINDS}, got {self.kind!r}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a training run depends on: train.py fills it, the checkpoint stores it (`to_json`)."""

  model: ModelConfig = MODELS["small"]
  model_name: str = "small"
  data: DataConfig = DataConfig()
  val_limit: int | None = None  # evaluate on the first N val images only (COCO val has 5000)
  stage: int = 1  # 1: instance-centred crops, 2: proposal crops, 0: random crops of whole images
  proposals_per_image: int | None = None  # stage 2: keep at most this many per image
  proposals: str = "windows"  # stage 2: the content-only generator (proposals.GENERATORS)
  proposals_from: Path | None = None  # stage 2: the user's box files (box_files.py) instead of the generator
  stage2_iou: float = 0.5
  steps: int = 300
  epochs: float | None = None  # if set, overrides steps: epochs over the stage's examples
  batch_size: int = 8  # global micro-batch, split over all devices and hosts
  accumulate: int = 1  # micro-batches per step: the update is that of batch_size * accumulate
  crop: int = 128  # network input side
  resize: int | None = None  # stages 1-2: the square is resized to this before cropping; None: crop * 250/224
  optim: OptimConfig = OptimConfig()
  eval_every: int = 100
  save_every: int = 100
  keep: int = 3
  seed: int = 0
  workdir: Path = Path("runs/default")
  init_from: Path | None = None  # a checkpoint whose variables start this run (fresh optimizer)
  class_balance: bool = False  # median-frequency class weights from the training split
  label_smoothing: float = 0.0
  recipe: str | None = None  # a recipes.RECIPES name (already applied to the fields above)

  @property
  def crop_resize(self) -> int:
    """The side the stage-1/2 square is resized to before the random crop (the paper: 250 for 224)."""
    return self.resize or round(self.crop * 250 / 224)


def to_json(config) -> dict:
  """A config dataclass as JSON-ready nested dicts (paths as strings, tuples as lists)."""
  return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def json_digest(value) -> str:
  """16 hex digits naming a JSON-able value (keys sorted, paths as strings): what caches are keyed by."""
  return hashlib.sha1(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def from_json(cls, data: dict):
  """The config dataclass `cls` rebuilt from `to_json`'s dicts; missing fields take their defaults.

  Fields this version does not know (from an older or newer checkpoint) are left out.
  """
  hints = typing.get_type_hints(cls)
  fields = {f.name for f in dataclasses.fields(cls)}
  return cls(**{name: _typed(hints[name], value) for name, value in data.items() if name in fields})


def _typed(hint, value):
  """`value` (from JSON) as the type `hint` names: nested dataclasses, Path, tuples, Optional."""
  if value is None:
    return None
  args = typing.get_args(hint)
  if typing.get_origin(hint) in (typing.Union, types.UnionType):
    return _typed(next(a for a in args if a is not type(None)), value)
  if dataclasses.is_dataclass(hint):
    return from_json(hint, value)
  if hint is Path:
    return Path(value)
  if typing.get_origin(hint) is tuple:
    return tuple(_typed(args[0], v) for v in value)
  return value


def train_config(meta: dict) -> TrainConfig:
  """The training settings a checkpoint's meta recorded.

  A checkpoint that records none (a converted Caffe model) gets the paper's 224 crops (250 resize).
  """
  saved = dict(meta.get("train_config") or {"crop": 224, "resize": 250})
  if not isinstance(saved.get("data", {}), dict):  # before DataConfig: flat data fields
    saved["data"] = {"kind": "coco" if saved.get("coco_class_map") else "voc", "root": saved["data"],
                     **{k: saved[k] for k in ("train_split", "val_split", "skip_bad") if k in saved},
                     **({"coco_class_map": saved["coco_class_map"]} if saved.get("coco_class_map") else {})}
  config = from_json(TrainConfig, saved)
  return dataclasses.replace(config, model=ModelConfig(**meta["model"])) if "model" in meta else config
