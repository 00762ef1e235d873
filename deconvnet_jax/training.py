"""Train state, loss, optimizer and the jitted, mesh-sharded train / eval steps.

The model is split once into a static graph and its state; the steps are pure
functions over (params, batch_stats, opt_state, batch). Under `jax.jit` with the
batch split over the mesh's "data" axis, BatchNorm's batch statistics are the
global batch's, exactly as on one device.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

VOID = 255


@struct.dataclass
class TrainState:
  params: Any  # nnx.State of nnx.Param
  batch_stats: Any  # nnx.State of nnx.BatchStat
  opt_state: Any
  step: jax.Array  # int32 scalar


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """The paper's SGD: lr 0.01, momentum 0.9, weight decay 5e-4 on kernels; optional step decay."""

  learning_rate: float = 0.01
  momentum: float = 0.9
  weight_decay: float = 5e-4
  decay_steps: tuple[int, ...] = ()  # multiply the rate by decay_factor at each of these steps
  decay_factor: float = 0.1


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  lr = optax.piecewise_constant_schedule(
      cfg.learning_rate, {s: cfg.decay_factor for s in cfg.decay_steps})
  decay_kernels = lambda params: jax.tree.map(lambda x: x.ndim > 1, params)
  return optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask=decay_kernels),
                     optax.sgd(lr, momentum=cfg.momentum))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean per-pixel softmax cross-entropy over non-void pixels; also pixel accuracy.

  logits: [B, H, W, K] float32; labels: [B, H, W] int32, 255 = void.
  """
  valid = labels != VOID
  safe = jnp.where(valid, labels, 0)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
  count = jnp.maximum(valid.sum(), 1)
  loss = jnp.sum(jnp.where(valid, losses, 0.0)) / count
  correct = jnp.sum((jnp.argmax(logits, -1) == labels) & valid) / count
  return loss, correct


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


def train_step(graphdef, tx, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
  """One SGD step on a batch {"image": [B, H, W, 3] float, "label": [B, H, W] int32}."""

  def loss_fn(params, batch_stats):
    logits, new_stats = apply_model(graphdef, params, batch_stats, batch["image"], train=True)
    loss, accuracy = cross_entropy(logits, batch["label"])
    return loss, (new_stats, accuracy)

  (loss, (batch_stats, accuracy)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, state.batch_stats)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = TrainState(params, batch_stats, opt_state, state.step + 1)
  return new_state, {"loss": loss, "accuracy": accuracy}


def eval_logits(graphdef, params, batch_stats, images: jax.Array) -> jax.Array:
  """Full-image forward with BatchNorm's stored statistics: [B, H, W, 3] -> [B, H, W, K]."""
  return apply_model(graphdef, params, batch_stats, images, train=False)[0]


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


def jit_train_step(graphdef, tx, mesh: Mesh):
  """train_step jitted over `mesh`: state replicated, batch split on its leading axis."""
  replicated = NamedSharding(mesh, P())
  data = NamedSharding(mesh, P("data"))
  return jax.jit(
      lambda state, batch: train_step(graphdef, tx, state, batch),
      in_shardings=(replicated, data), out_shardings=(replicated, replicated),
      donate_argnums=0)


def jit_eval_logits(graphdef, mesh: Mesh):
  replicated = NamedSharding(mesh, P())
  data = NamedSharding(mesh, P("data"))
  return jax.jit(lambda params, stats, images: eval_logits(graphdef, params, stats, images),
                 in_shardings=(replicated, replicated, data), out_shardings=data)
