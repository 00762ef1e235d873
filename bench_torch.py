"""DeconvNet in PyTorch eager, built from our ModelConfig, for bench.py's side-by-side rows.

The reference prototxt's network as PyTorch runs it: NCHW, 3x3 convs, ceil-mode
max pooling with indices, fc6/fc7 as 7x7 / 1x1 convs, fc6-deconv, max
unpooling with the pooling indices, 3x3 transposed convs, BatchNorm + ReLU
after each, a 1x1 score. SGD with momentum 0.9 and weight decay 5e-4 (on all
parameters: the difference is negligible in time). Needs torch (CPU build:
torch==2.13.0); the library does not.

bench.py runs it as its own process each round (`python bench_torch.py --config
paper ...` prints the timings and torch's version as JSON), so that neither
framework's memory shapes the other's heap; it sets glibc's malloc as bench.py
does (`host_memory`).
"""

import argparse
import json
import time

from deconvnet_jax.host_memory import configure_process

configure_process()  # before torch starts its threads, as bench.py does for JAX

# ruff: noqa: E402

import numpy as np
import torch
from torch import nn

from deconvnet_jax.configs import ModelConfig, model_config
from deconvnet_jax.models import DECODER_PLAN, VGG16_PLAN


def block(layer: nn.Module, features: int, config: ModelConfig) -> nn.Sequential:
  return nn.Sequential(layer, *([nn.BatchNorm2d(features)] if config.batch_norm else []), nn.ReLU(inplace=True))


class TorchDeconvNet(nn.Module):
  """Our DeconvNet's layers and shapes, in PyTorch."""

  def __init__(self, config: ModelConfig):
    super().__init__()
    self.stages, cin = nn.ModuleList(), 3
    for plan in VGG16_PLAN:
      layers = []
      for cout in plan:
        layers.append(block(nn.Conv2d(cin, config.channels(cout), 3, padding=1), config.channels(cout), config))
        cin = config.channels(cout)
      self.stages.append(nn.Sequential(*layers))
    fc, k = config.fc_dim, config.fc_kernel
    self.fc = nn.Sequential(block(nn.Conv2d(cin, fc, k), fc, config), block(nn.Conv2d(fc, fc, 1), fc, config),
                            block(nn.ConvTranspose2d(fc, cin, k), cin, config))
    self.pool = nn.MaxPool2d(2, 2, ceil_mode=True, return_indices=True)
    self.unpool = nn.MaxUnpool2d(2, 2)
    self.decoder = nn.ModuleList()
    for plan in DECODER_PLAN:
      layers = []
      for cout in plan:
        layers.append(block(nn.ConvTranspose2d(cin, config.channels(cout), 3, padding=1), config.channels(cout),
                            config))
        cin = config.channels(cout)
      self.decoder.append(nn.Sequential(*layers))
    self.score = nn.Conv2d(cin, config.num_classes, 1)

  def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, K, H, W]
    pools = []
    for stage in self.stages:
      x = stage(x)
      size = x.shape[-2:]
      x, indices = self.pool(x)
      pools.append((indices, size))
    x = self.fc(x)
    for stage, (indices, size) in zip(self.decoder, reversed(pools)):
      x = stage(self.unpool(x, indices, output_size=size))
    return self.score(x)


def timings(config: ModelConfig, batch: int, size: int, repeats: int, bf16: bool = False) -> dict[str, float]:
  """Median seconds of an eval forward and of a train step (after one warm-up each)."""
  torch.manual_seed(0)
  model = TorchDeconvNet(config)
  optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
  rng = np.random.default_rng(0)
  images = torch.from_numpy(rng.normal(size=(batch, 3, size, size)).astype(np.float32))
  labels = torch.from_numpy(rng.integers(0, config.num_classes, (batch, size, size)))
  autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

  def forward():
    with torch.no_grad(), autocast():
      model(images)

  def step():
    optimizer.zero_grad(set_to_none=True)
    with autocast():
      loss = nn.functional.cross_entropy(model(images), labels, ignore_index=255)
    loss.backward()
    optimizer.step()

  out = {}
  model.eval()
  out["forward"] = median_seconds(forward, repeats)
  model.train()
  out["train step"] = median_seconds(step, repeats)
  return out


def median_seconds(fn, repeats: int) -> float:
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="paper")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
  args = parser.parse_args()
  seconds = timings(model_config(args.config), args.batch, args.size, args.repeats, args.bf16)
  print(json.dumps({**seconds, "version": torch.__version__}))


if __name__ == "__main__":
  main()
