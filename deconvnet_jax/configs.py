"""Named model configurations: the paper's network and small ones for tests and CPUs."""

import dataclasses

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
