"""Train state, loss, optimizer and the jitted, mesh-sharded train / eval steps.

The model is split once into a static graph and its state; the steps are pure
functions over (params, batch_stats, opt_state, batch). Under `jax.jit` with the
batch split over the mesh's "data" axis, BatchNorm's batch statistics are the
global batch's, exactly as on one device.
"""

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from deconvnet_jax.configs import OptimConfig
from deconvnet_jax.labels import VOID


@struct.dataclass
class TrainState:
  params: Any  # nnx.State of nnx.Param
  batch_stats: Any  # nnx.State of nnx.BatchStat
  opt_state: Any
  step: jax.Array  # int32 scalar


def learning_rate(cfg: OptimConfig) -> optax.Schedule:
  """Step -> learning rate: cfg.learning_rate, times decay_factor at each of decay_steps."""
  return optax.piecewise_constant_schedule(cfg.learning_rate, {s: cfg.decay_factor for s in cfg.decay_steps})


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  lr = learning_rate(cfg)
  decay_kernels = lambda params: jax.tree.map(lambda x: x.ndim > 1, params)
  return optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask=decay_kernels),
                     optax.sgd(lr, momentum=cfg.momentum))


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Options on the paper's plain cross-entropy (both off by default: the paper used neither)."""

  class_weights: tuple[float, ...] | None = None  # per-class loss weight, e.g. median frequency
  label_smoothing: float = 0.0  # target = (1 - a) one-hot + a / K


def loss_sums(logits: jax.Array, labels: jax.Array, loss: LossConfig = LossConfig()) -> dict:
  """Sums over the batch's pixels: weighted cross-entropy, weight, correct and valid pixels.

  logits: [B, H, W, K] float32; labels: [B, H, W] int32, 255 = void. The loss of
  a batch is loss_sum / weight (a weighted mean; the plain mean without class
  weights), so sums over micro-batches give the whole batch's loss exactly.
  """
  valid = labels != VOID
  safe = jnp.where(valid, labels, 0)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  nll = -jnp.take_along_axis(logp, safe[..., None], -1)[..., 0]
  if loss.label_smoothing:
    nll = (1 - loss.label_smoothing) * nll - loss.label_smoothing * logp.mean(-1)
  weight = valid.astype(jnp.float32)
  if loss.class_weights is not None:
    weight = weight * jnp.asarray(loss.class_weights, jnp.float32)[safe]
  return {"loss_sum": jnp.sum(weight * nll), "weight": jnp.sum(weight),
          "correct": jnp.sum((jnp.argmax(logits, -1) == labels) & valid), "valid": jnp.sum(valid)}


def _ratio(num, den):
  return num / jnp.maximum(den, 1e-12)


def cross_entropy(logits: jax.Array, labels: jax.Array, loss: LossConfig = LossConfig()):
  """(Mean per-pixel cross-entropy over non-void pixels, pixel accuracy); see loss_sums."""
  s = loss_sums(logits, labels, loss)
  return _ratio(s["loss_sum"], s["weight"]), _ratio(s["correct"], s["valid"])


def apply_model(graphdef, params, batch_stats, images, *, train: bool):
  """images [B, H, W, 3] -> (logits [B, H, W, K], new batch_stats)."""
  model = nnx.merge(graphdef, params, batch_stats, copy=True)
  if train:
    model.train()
  else:
    model.eval()
  return model(images), nnx.state(model, nnx.BatchStat)


def init_train_state(model: nnx.Module, tx: optax.GradientTransformation):
  """Splits `model` into its static graph and a TrainState."""
  graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  return graphdef, TrainState(params, batch_stats, tx.init(params), jnp.zeros((), jnp.int32))


def train_step(graphdef, tx, state: TrainState, batch: dict, *, micro_batches: int = 1,
               loss: LossConfig = LossConfig()) -> tuple[TrainState, dict]:
  """One SGD step on {"image": [N, H, W, 3] float, "label": [N, H, W] int32}.

  With micro_batches K > 1 (gradient accumulation, Caffe's iter_size), the N
  rows run as K micro-batches of N / K (rows k, k + K, k + 2K, ...: each one
  spread over every device) in a scan. Gradients of the summed loss are added
  up and divided by the whole batch's weight once, so the update is that of one
  step on all N rows, up to float rounding, whenever rows do not interact;
  BatchNorm uses each micro-batch's statistics and updates its running averages
  once per micro-batch, as the reference did.
  """

  def loss_fn(params, batch_stats, micro):
    logits, new_stats = apply_model(graphdef, params, batch_stats, micro["image"], train=True)
    sums = loss_sums(logits, micro["label"], loss)
    return sums["loss_sum"], (new_stats, sums)

  grad_fn = jax.grad(loss_fn, has_aux=True)

  def accumulate(carry, micro):
    grads, batch_stats = carry
    g, (batch_stats, sums) = grad_fn(state.params, batch_stats, micro)
    return (jax.tree.map(jnp.add, grads, g), batch_stats), sums

  if micro_batches == 1:
    grads, (batch_stats, sums) = grad_fn(state.params, state.batch_stats, batch)
  else:
    n = batch["label"].shape[0]
    if n % micro_batches:
      raise ValueError(f"batch of {n} does not split into {micro_batches} micro-batches")
    # [N, ...] -> [K, N / K, ...]; the reshape keeps the "data" sharding on N / K.
    micro = jax.tree.map(lambda x: x.reshape(n // micro_batches, micro_batches, *x.shape[1:])
                         .swapaxes(0, 1), batch)
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    # A rolled loop keeps one micro-batch's activations live on GPU / TPU; XLA:CPU
    # runs rolled loop bodies several times slower (bench.py), and memory is not
    # what limits a CPU, so there the loop is unrolled.
    (grads, batch_stats), sums = jax.lax.scan(accumulate, (zeros, state.batch_stats), micro,
                                              unroll=jax.default_backend() == "cpu")
    sums = jax.tree.map(jnp.sum, sums)
  grads = jax.tree.map(lambda g: _ratio(g, sums["weight"]), grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = TrainState(params, batch_stats, opt_state, state.step + 1)
  return new_state, {"loss": _ratio(sums["loss_sum"], sums["weight"]),
                     "accuracy": _ratio(sums["correct"], sums["valid"])}


def eval_logits(graphdef, params, batch_stats, images: jax.Array) -> jax.Array:
  """Full-image forward with BatchNorm's stored statistics: [B, H, W, 3] -> [B, H, W, K]."""
  return apply_model(graphdef, params, batch_stats, images, train=False)[0]


def default_compilation_cache() -> Path:
  """Where compiled programs are kept across runs: $JAX_COMPILATION_CACHE_DIR, else ~/.cache/deconvnet_jax/xla."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
  return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deconvnet_jax" / "xla"


def enable_compilation_cache(directory) -> None:
  """Turns on JAX's persistent compilation cache in `directory`, for every program however quick.

  XLA compiles slowly on CPU: the small model's first train step takes about 12 s
  on 2 cores, and 3.4 s when its program comes from the cache.
  """
  jax.config.update("jax_compilation_cache_dir", str(directory))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over all devices (all hosts' devices in a multi-host run), axis "data"."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(-1), ("data",))


def replicate(tree, mesh: Mesh):
  """Places a pytree (the train state) on every device of the mesh, as the steps expect."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


def global_batch(host_batch: dict, mesh: Mesh) -> dict:
  """This host's rows of the global batch -> global arrays split over the "data" axis."""
  sharding = NamedSharding(mesh, P("data"))
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), host_batch)


def jit_train_step(graphdef, tx, mesh: Mesh, *, micro_batches: int = 1, loss: LossConfig = LossConfig()):
  """train_step jitted over `mesh`: state replicated, batch split on its leading axis."""
  replicated = NamedSharding(mesh, P())
  data = NamedSharding(mesh, P("data"))
  return jax.jit(
      lambda state, batch: train_step(graphdef, tx, state, batch, micro_batches=micro_batches, loss=loss),
      in_shardings=(replicated, data), out_shardings=(replicated, replicated),
      donate_argnums=0)


def jit_eval_logits(graphdef, mesh: Mesh):
  replicated = NamedSharding(mesh, P())
  data = NamedSharding(mesh, P("data"))
  return jax.jit(lambda params, stats, images: eval_logits(graphdef, params, stats, images),
                 in_shardings=(replicated, replicated, data), out_shardings=data)
