"""The reference solvers as named recipes (SPEC.md section 2), and what a step of one costs.

A recipe fills train.py's defaults; flags given on the command line still win.
"""

import dataclasses

from deconvnet_jax.configs import ModelConfig
from deconvnet_jax.models import forward_flops


@dataclasses.dataclass(frozen=True)
class Recipe:
  stage: int
  steps: int
  lr_decay_steps: tuple[int, ...]
  paper_examples: int  # examples the paper drew from VOC train + SBD for this stage
  model: str = "paper"
  batch_size: int = 8  # per micro-batch (global)
  accumulate: int = 8  # micro-batches per step: an effective batch of 64
  crop: int = 224
  resize: int = 250
  lr: float = 0.01

  def defaults(self) -> dict:
    """train.py argument defaults."""
    return {"stage": self.stage, "steps": self.steps, "lr_decay_steps": list(self.lr_decay_steps),
            "model": self.model, "batch_size": self.batch_size, "accumulate": self.accumulate,
            "crop": self.crop, "resize": self.resize, "lr": self.lr}


RECIPES = {
    # Instance-centred crops: lr 0.01, divided by 10 at 9k of 20k iterations of 8 x 8.
    "paper-stage1": Recipe(stage=1, steps=20_000, lr_decay_steps=(9_000,), paper_examples=200_000),
    # Proposal crops, initialised from stage 1: stepped at 10k of 40k.
    "paper-stage2": Recipe(stage=2, steps=40_000, lr_decay_steps=(10_000,), paper_examples=2_700_000),
}

# Dense bf16 peak TFLOP/s per chip (vendor figures), for rough step-time estimates.
ACCELERATORS = {"A100": 312, "H100 SXM": 989, "TPU v4": 275, "TPU v5e": 197, "TPU v5p": 459}


def step_flops(config: ModelConfig, crop: int, batch: int) -> float:
  """A train step's FLOPs: forward + backward = 3 x forward, per example."""
  return 3 * forward_flops(config, crop) * batch


def step_estimates(config: ModelConfig, crop: int, batch: int, utilisation: float = 0.3) -> dict[str, float]:
  """Seconds per train step per accelerator, at `utilisation` of its peak."""
  flops = step_flops(config, crop, batch)
  return {name: flops / (peak * 1e12 * utilisation) for name, peak in ACCELERATORS.items()}


def describe(name: str, config: ModelConfig, crop: int, batch: int, steps: int) -> str:
  """What train.py prints at the start of a recipe run."""
  r = RECIPES[name]
  est = step_estimates(config, crop, batch)
  rows = ", ".join(f"{k} {v:.2f} s ({v * steps / 3600:.1f} h)" for k, v in est.items())
  return (f"recipe {name}: stage {r.stage}, {steps} steps of {batch} examples "
          f"({r.batch_size} x {r.accumulate} accumulated in the reference), lr {r.lr} / 10 at "
          f"{', '.join(map(str, r.lr_decay_steps))}; the paper drew ~{r.paper_examples:,} examples "
          f"for this stage.\n  expected time per step (and for the run), one chip at 30% of its bf16 "
          f"peak with --dtype bfloat16, {step_flops(config, crop, batch) / 1e12:.1f} TFLOP "
          f"per step: {rows}. These are estimates from FLOP counts; the progress bar shows the "
          "measured rate.")
