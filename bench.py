"""Benchmark: DeconvNet forward / train step, pooling and unpooling formulations, machine peak.

  python bench.py                      # paper configuration, 224x224, batch 4
  python bench.py --batch 2 --repeats 3
  python bench.py --batch 64 --torch-rounds 0 --accumulate 0 --no-inference   # on a GPU or TPU: MFU

Every figure in one run, so ratios compare like with like on a shared machine.
Times are medians over --repeats runs after a compile-and-warm-up run. Each
round of the network timings runs each dtype (and PyTorch, when installed) in
a process of its own, as a user's training run would: in one process, the
float32 train step ran 10% slower beside the bfloat16 model's buffers.
"""

import argparse
import dataclasses
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

from deconvnet_jax.host_memory import configure_process

MALLOC = configure_process()  # as the command-line programs do, before JAX starts its threads: see host_memory.py

import jax  # noqa: E402
import jax.numpy as jnp
import numpy as np

from deconvnet_jax import onednn
from deconvnet_jax.configs import ModelConfig, model_config
from deconvnet_jax.data.generated import make_example
from deconvnet_jax.inference import InferenceConfig, Segmenter
from deconvnet_jax.models import VGG16_PLAN, build_model, forward_flops
from deconvnet_jax.ops import max_pool_with_argmax, max_unpool
from deconvnet_jax.training import (OptimConfig, init_train_state, jit_eval_logits, jit_train_step,
                                    make_mesh, make_optimizer, replicate)


def timeit(fn, *args, repeats: int) -> float:
  """Median seconds of fn(*args) after two warm-up calls (the first compiles; the heap grows over the first
  few, see host_memory.py)."""
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


# Dense bfloat16 peaks, TFLOP/s, from the makers' data sheets, by a word of jax's device_kind.
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v4": 275.0, "TPU v5 lite": 197.0,
                    "TPU v5p": 459.0, "TPU v6 lite": 918.0}


def accelerator() -> bool:
  return jax.default_backend() != "cpu"


def published_bf16_peak() -> float | None:
  """The device's data-sheet bfloat16 peak in GFLOP/s, where BF16_PEAK_TFLOPS knows it."""
  kind = jax.devices()[0].device_kind
  return next((1e3 * t for name, t in BF16_PEAK_TFLOPS.items() if name in kind), None)


def machine_peak(repeats: int) -> list[tuple[str, float, float]]:
  """(name, seconds, GFLOP/s) of a large matmul and of 3x3 convs at VGG shapes; on an accelerator also a
  bfloat16 matmul, large enough to fill it."""
  rows = []
  a = jnp.ones((2048, 2048), jnp.float32)
  t = timeit(jax.jit(lambda a: a @ a), a, repeats=repeats)
  rows.append(("matmul 2048^3", t, 2 * 2048**3 / t / 1e9))
  if accelerator():
    a = jnp.ones((8192, 8192), jnp.bfloat16)
    t = timeit(jax.jit(lambda a: a @ a), a, repeats=repeats)
    rows.append(("matmul 8192^3 bfloat16", t, 2 * 8192**3 / t / 1e9))
  for name, h, cin, cout in [("conv1_2", 224, 64, 64), ("conv3_1", 56, 128, 256), ("conv5_1", 14, 512, 512)]:
    x = jnp.ones((4, h, h, cin), jnp.float32)
    w = jnp.ones((3, 3, cin, cout), jnp.float32) * 0.01
    conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
    t = timeit(conv, x, w, repeats=repeats)
    rows.append((f"3x3 conv {name} (batch 4)", t, 2 * 4 * h * h * 9 * cin * cout / t / 1e9))
  return rows


def pool_unpool(config: ModelConfig, batch: int, size: int, repeats: int) -> dict:
  """Seconds, summed over the five stages, of pooling and both unpooling formulations."""
  shapes, h = [], size
  for plan in VGG16_PLAN:
    shapes.append((batch, h, h, config.channels(plan[-1])))
    h = (h + 1) // 2
  total = {}
  for shape in shapes:
    x = jax.random.normal(jax.random.key(0), shape)
    y, idx = jax.jit(max_pool_with_argmax)(x)
    cot = jax.random.normal(jax.random.key(1), y.shape)
    plain = jax.jit(lambda x: jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "SAME"))
    cases = {
        "max pool, values only (reduce_window)": (plain, x),
        "max_pool_with_argmax forward": (jax.jit(max_pool_with_argmax), x),
        "max_pool_with_argmax backward": (
            jax.jit(jax.grad(lambda x: jnp.sum(max_pool_with_argmax(x)[0] * cot))), x),
    }
    for method in ("select", "scatter"):
      unpool = lambda y, m=method: max_unpool(y, idx, shape[1:3], m)
      cases[f"max_unpool {method} forward"] = (jax.jit(unpool), y)
      cases[f"max_unpool {method} backward"] = (jax.jit(jax.grad(lambda y, u=unpool: jnp.sum(u(y) * x))), y)
    for name, (fn, arg) in cases.items():
      total[name] = total.get(name, 0.0) + timeit(fn, arg, repeats=repeats)
  return total


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="paper")
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--accumulate", type=int, default=2, metavar="K",
                      help="micro-batches for the gradient-accumulation row (0: skip it)")
  parser.add_argument("--torch-rounds", type=int, default=2, metavar="N",
                      help="rounds alternating ours and PyTorch eager (float32, bf16 autocast) when torch "
                           "is installed (0: skip)")
  parser.add_argument("--no-bf16", dest="bf16", action="store_false",
                      help="skip our bfloat16 rows (run where the CPU has bf16 units: avx512_bf16 or amx_bf16)")
  parser.add_argument("--no-inference", dest="inference", action="store_false",
                      help="skip the instance-wise inference timing")
  parser.add_argument("--round", choices=("float32", "bfloat16"), help=argparse.SUPPRESS)  # see timing_round
  args = parser.parse_args()

  config = model_config(args.config)
  b, size = args.batch, args.size
  if args.round:  # a process of timing_round's: its times as JSON, nothing else
    print(json.dumps(Runner(dataclasses.replace(config, dtype=args.round), args).time()))
    return
  convs = "oneDNN's (onednn extra)" if onednn.loaded() else "XLA's"
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}; "
        f"config {args.config}, {size}x{size}, batch {b}, median of {args.repeats}; CPU convolutions: {convs}; "
        f"host malloc: {MALLOC}\n")

  print("| machine | ms | GFLOP/s |\n|---|---:|---:|")
  peak = machine_peak(args.repeats)
  for name, t, g in peak:
    print(f"| {name} | {t * 1e3:.1f} | {g:.0f} |")

  pools = pool_unpool(config, b, size, args.repeats)
  print(f"\n| pool / unpool, 5 stages, batch {b} | ms |\n|---|---:|")
  for name, t in pools.items():
    print(f"| {name} | {t * 1e3:.1f} |")
  for d in ("forward", "backward"):
    ratio = pools[f"max_unpool scatter {d}"] / pools[f"max_unpool select {d}"]
    print(f"| unpool {d}: scatter / select | {ratio:.2f}x |")

  dtypes = ["float32"] + ["bfloat16"] * (args.bf16 and (accelerator() or onednn.cpu_has_bf16()))
  ours = lambda: {dtype: timing_round(args, dtype) for dtype in dtypes}

  rounds = [ours()]
  t_step = rounds[0]["float32"]["train step"]  # for the pool / unpool share
  flops = forward_flops(config, size)
  peaks = {"float32": peak[0][2]}  # of peak: the run's own float32 matmul, and bfloat16's where measured
  peaks["bfloat16"] = next((g for name, _, g in peak if "bfloat16" in name), peaks["float32"])
  share = sum(pools[k] for k in ("max_pool_with_argmax forward", "max_pool_with_argmax backward",
                                 "max_unpool select forward", "max_unpool select backward")) / t_step
  print(f"\n| DeconvNet ({flops / 1e9:.1f} GFLOPs forward per image) | s/img | img/s | GFLOP/s | of peak |")
  print("|---|---:|---:|---:|---:|")
  for dtype in dtypes:
    suffix = "" if dtype == "float32" else f", {dtype}"
    for label, name, f in [("forward (inference BN)", "forward", flops),
                           ("train step (fwd+bwd+SGD)", "train step", 3 * flops)]:
      t = rounds[0][dtype][name]
      g = f * b / t / 1e9
      print(f"| {label}{suffix} | {t / b:.3f} | {b / t:.2f} | {g:.0f} | {g / peaks[dtype]:.0%} |")
  print(f"| pool + unpool (fwd+bwd) share of the train step | {share:.1%} | | | |")
  if "bfloat16" in dtypes and accelerator():
    mfu_table(rounds[0]["bfloat16"]["train step"], 3 * flops * b, peaks["bfloat16"])
  if args.torch_rounds and accelerator():
    print("\n(an accelerator: PyTorch's rows, which run on the CPU, are skipped)")
  elif args.torch_rounds:
    torch_table(args.config, b, size, args.repeats, args.torch_rounds, rounds, ours)
  if args.accumulate > 1:
    accumulation_table(Runner(config, args), args.accumulate)
  if args.inference:
    for dtype in dtypes:  # one model at a time in this process
      inference_table(build_model(dataclasses.replace(config, dtype=dtype)), dtype, args.repeats)


def mfu_table(t_step: float, step_flops: float, measured: float):
  """The bfloat16 train step's model FLOP utilisation: of the data-sheet peak, and of the run's own matmul."""
  achieved, published = step_flops / t_step / 1e9, published_bf16_peak()
  kind = jax.devices()[0].device_kind
  print(f"\n| bfloat16 train step on {jax.device_count()} x {kind} | GFLOP/s | MFU |\n|---|---:|---:|")
  if published:
    print(f"| of the data-sheet peak ({published / 1e3:.0f} TFLOP/s a chip) | {achieved:.0f} | "
          f"{achieved / (published * jax.device_count()):.0%} |")
  print(f"| of this run's bfloat16 matmul ({measured / 1e3:.0f} TFLOP/s, one chip) | {achieved:.0f} | "
        f"{achieved / (measured * jax.device_count()):.0%} |")


def timing_round(args, dtype: str) -> dict[str, float]:
  """Runner(...).time() for our model in `dtype`, in a process of its own (this script with --round)."""
  return last_json([sys.executable, __file__, "--round", dtype, "--config", args.config, "--batch", str(args.batch),
                    "--size", str(args.size), "--repeats", str(args.repeats)])


def last_json(command: list[str]) -> dict:
  """The JSON object on the last line that `command`, a process of its own, prints."""
  return json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()[-1])


class Runner:
  """Our forward and train step for one model configuration, timed on one batch of random data."""

  def __init__(self, config: ModelConfig, args):
    b, size = args.batch, args.size
    rng = np.random.default_rng(0)
    self.batch = {"image": jnp.asarray(rng.normal(size=(b, size, size, 3)), jnp.float32),
                  "label": jnp.asarray(rng.integers(0, config.num_classes, (b, size, size)), jnp.int32)}
    self.tx, self.mesh = make_optimizer(OptimConfig()), make_mesh()
    self.graphdef, state = init_train_state(build_model(config), self.tx)
    self.holder = [replicate(state, self.mesh)]
    self.forward = jit_eval_logits(self.graphdef, self.mesh)
    self.step = jit_train_step(self.graphdef, self.tx, self.mesh)
    self.repeats = args.repeats

  def one_step(self, batch):
    self.holder[0], metrics = self.step(self.holder[0], batch)
    return metrics["loss"]

  def time(self) -> dict[str, float]:
    state = self.holder[0]
    return {"forward": timeit(self.forward, state.params, state.batch_stats, self.batch["image"],
                              repeats=self.repeats),
            "train step": timeit(self.one_step, self.batch, repeats=self.repeats)}


def torch_table(config_name: str, b: int, size: int, repeats: int, n: int, rounds: list, ours):
  """The same network in PyTorch eager, float32 and bf16 autocast, in rounds alternating with ours.

  Each PyTorch timing is a process of its own (`bench_torch.py`), as each of ours is (`timing_round`): sharing one,
  its tensors would stay in the heap (with host_memory's reuse setting, measured: our next round ran 40% slower).
  """
  if importlib.util.find_spec("torch") is None:  # not imported here: bench_torch.py's processes run it
    print("\n(torch not installed: no PyTorch rows; pip install torch==2.13.0 for the CPU build)")
    return
  theirs = {"float32": [], "bf16 autocast": []}
  if not onednn.cpu_has_bf16():
    print("\n(this CPU has no avx512_bf16 / amx_bf16: PyTorch's bf16 autocast would be emulated; "
          "its row is skipped)")
    del theirs["bf16 autocast"]
  script = Path(__file__).with_name("bench_torch.py")
  for r in range(n):
    if r:
      rounds.append(ours())
    for name in theirs:
      command = [sys.executable, str(script), "--config", config_name, "--batch", str(b), "--size", str(size),
                 "--repeats", str(repeats)] + ["--bf16"] * (name != "float32")
      theirs[name].append(last_json(command))
  bf16 = "bf16 autocast" in theirs and "bfloat16" in rounds[0]
  span = lambda xs: f"{min(xs):.2f}" if len(xs) == 1 or f"{min(xs):.2f}" == f"{max(xs):.2f}" else \
      f"{min(xs):.2f}-{max(xs):.2f}"
  version = theirs["float32"][0]["version"]  # as the torch processes reported it
  columns = ["ours", f"PyTorch {version} eager float32"]
  columns += ["ours bfloat16", "PyTorch bf16 autocast"] * bf16 + ["ours / PyTorch float32"]
  columns += ["ours / PyTorch, bf16"] * bf16
  print(f"\n| batch {b}, {n} alternating rounds, img/s | " + " | ".join(columns) + " |")
  print("|---|" + "---:|" * len(columns))
  for part in ("train step", "forward"):
    speed = lambda runs, key=None: [b / (r[key] if key else r)[part] for r in runs]
    mine, f32 = speed(rounds, "float32"), speed(theirs["float32"])
    row = f"| {part} | {span(mine)} | {span(f32)}"
    if bf16:
      mine16, theirs16 = speed(rounds, "bfloat16"), speed(theirs["bf16 autocast"])
      row += f" | {span(mine16)} | {span(theirs16)}"
    row += f" | {span([m / t for m, t in zip(mine, f32)])}x"  # round by round
    if bf16:
      row += f" | {span([m / t for m, t in zip(mine16, theirs16)])}x"
    print(row + " |")


def accumulation_table(runner: Runner, k: int):
  """An update over K micro-batches of B in one jitted scan, against K plain steps of B, in this process."""
  t_step = timeit(runner.one_step, runner.batch, repeats=runner.repeats)
  step = jit_train_step(runner.graphdef, runner.tx, runner.mesh, micro_batches=k)
  big = {name: jnp.concatenate([x] * k) for name, x in runner.batch.items()}

  def one_step(batch):
    runner.holder[0], metrics = step(runner.holder[0], batch)
    return metrics["loss"]

  t_acc = timeit(one_step, big, repeats=runner.repeats)
  b = runner.batch["label"].shape[0]
  print(f"\n| gradient accumulation, {k} x batch {b} | s/update | ratio |\n|---|---:|---:|")
  print(f"| {k} plain steps of {b} | {k * t_step:.2f} | 1.00 |")
  print(f"| one step, {k} accumulated micro-batches of {b} | {t_acc:.2f} | {t_acc / (k * t_step):.2f} |")


def inference_table(model, dtype: str, repeats: int):
  """Seconds per VOC-sized image (500x375) for 50 proposals, split by part."""
  image = make_example(np.random.default_rng(0), 375, 375)[0]
  image = np.concatenate([image, image[:, :125]], 1)  # 375 x 500
  segmenter = Segmenter(model, InferenceConfig(top_k=50, batch_size=10))
  segmenter.segment(image)  # compile
  runs = [segmenter.segment(image).seconds for _ in range(max(1, repeats // 2))]
  print(f"\n| instance-wise inference, 500x375, 50 proposals, batch 10, {dtype} | s/image |\n|---|---:|")
  for part in ("proposals", "network", "aggregation", "crf"):
    print(f"| {part} | {np.median([r[part] for r in runs]):.2f} |")
  print(f"| total | {np.median([sum(r.values()) for r in runs]):.2f} |")


if __name__ == "__main__":
  main()
