"""BatchNorm at test time (SPEC.md section 2): re-estimated statistics, and folding.

Re-estimation ("precise BN", the reference's compute_bn_statistics): with the
network fixed, run N training batches with every BatchNorm on its batch
statistics and average each layer's per-batch mean and m/(m-1)-corrected
variance (m = B*h*w values per channel). Folding: each BatchNorm becomes a
per-output-channel scale and shift of the conv / deconv before it, giving the
same function as a batch_norm=False network with no normalisation work; the
unfolded checkpoint stays for fine-tuning.
"""

import dataclasses
import functools
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from deconvnet_jax import checkpoints, training
from deconvnet_jax.configs import ModelConfig
from deconvnet_jax.models import Block, Deconv, build_model, get_variables, set_variables

LayerPath = tuple[str, ...]  # module attribute names, e.g. ("encoder", "conv1_1")


def batchnorm_blocks(model: nnx.Module) -> list[tuple[LayerPath, Block]]:
  """(path, block) of every layer -> BatchNorm -> ReLU block, in the model's attribute order."""
  return [(tuple(map(str, path)), m) for path, m in nnx.iter_modules(model)
          if isinstance(m, Block) and m.bn is not None]


def batch_moments(graphdef, params, batch_stats, images: jax.Array) -> dict:
  """One batch, each BatchNorm on its batch statistics -> every BN input's mean and corrected variance.

  images [B, H, W, 3] -> {path: {"bn": {"mean": [C], "var": [C]}}}, float32, nested
  like the model's batch_stats; var = sum((x - mean)^2) / (m - 1), m = B*h*w.
  """
  model = nnx.merge(graphdef, params, batch_stats, copy=True)
  model.train()
  # Every module method's output, among them each block's layer output: the BN's input.
  _, outputs = nnx.capture(model, nnx.Intermediate, method_outputs=nnx.Intermediate)(images)
  outputs = nnx.to_pure_dict(outputs)
  moments: dict = {}
  for path, _ in batchnorm_blocks(model):
    x = _get(outputs, (*path, "layer", "__call__"))[0].astype(jnp.float32)  # [B, h, w, C]
    axes, m = tuple(range(x.ndim - 1)), x.size // x.shape[-1]
    if m < 2:
      raise ValueError(f"{'/'.join(path)}: one value per channel in a batch of {x.shape[0]}; "
                       "the variance needs a batch of at least 2")
    mean = x.mean(axes)
    var = jnp.square(x - mean).sum(axes) / (m - 1)
    _get(moments, path, create=True)["bn"] = {"mean": mean, "var": var}
  return moments


def _accumulate(graphdef, sums, params, batch_stats, images):
  moments = batch_moments(graphdef, params, batch_stats, images)
  return jax.tree.map(jnp.add, sums, moments)


def reestimate(model: nnx.Module, batches: Iterable, num_batches: int, mesh=None) -> dict:
  """BatchNorm statistics averaged over `num_batches` batches, as a batch_stats pure dict (NumPy).

  batches: host batches, each images [B, H, W, 3] or a train batch {"image": ...};
  B and H, W fixed (one compilation). Split over `mesh` (default: all devices).
  """
  if not batchnorm_blocks(model):
    raise ValueError("the model has no BatchNorm layers (FCN-8s, or BatchNorm already folded): "
                     "nothing to re-estimate")
  if num_batches < 1:
    raise ValueError(f"num_batches must be at least 1, got {num_batches}")
  mesh = training.make_mesh() if mesh is None else mesh
  graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  params, batch_stats = training.replicate((params, batch_stats), mesh)
  replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  step = jax.jit(functools.partial(_accumulate, graphdef), donate_argnums=0,
                 in_shardings=(replicated, replicated, replicated, data), out_shardings=replicated)
  # The sums are laid out like the running statistics: {path: {"bn": {"mean", "var"}}}.
  sums = jax.tree.map(jnp.zeros_like, nnx.to_pure_dict(batch_stats))
  batches = iter(batches)
  for i in tqdm(range(num_batches), desc="BN statistics", dynamic_ncols=True):
    batch = next(batches, None)
    if batch is None:
      raise ValueError(f"the batches ran out after {i} of {num_batches}")
    images = np.asarray(batch["image"] if isinstance(batch, dict) else batch, np.float32)
    images = training.global_batch({"image": images}, mesh)["image"]
    sums = step(sums, params, batch_stats, images)
  return jax.tree.map(lambda s: np.asarray(s) / np.float32(num_batches), sums)


def fold(config: ModelConfig, variables: dict) -> tuple[ModelConfig, dict]:
  """Every BatchNorm folded into the conv / deconv before it: the batch_norm=False config and variables.

  Per output channel c, with s = gamma / sqrt(var + eps): kernel[..., c] *= s
  (HWIO; axis 1 of a deconv's [in, out, kh, kw]) and bias = (bias - mean) * s + beta.
  Without BatchNorm the arguments come back unchanged.
  """
  if not config.batch_norm:
    return config, variables
  params = jax.tree.map(np.asarray, variables["params"])
  stats = variables["batch_stats"]
  abstract = nnx.eval_shape(lambda: build_model(config))
  for path, block in batchnorm_blocks(abstract):
    node = _get(params, path)
    layer, bn, running = node["layer"], node.pop("bn"), _get(stats, path)["bn"]
    f64 = lambda x: np.asarray(x, np.float64)
    s = f64(bn["scale"]) / np.sqrt(f64(running["var"]) + block.bn.epsilon)  # [C_out]
    kernel = np.asarray(layer["kernel"], np.float32)  # float32: fc6 / fc6-deconv hold 100 M values each
    shape = [1] * kernel.ndim
    shape[1 if isinstance(block.layer, Deconv) else -1] = -1
    layer["kernel"] = kernel * s.astype(np.float32).reshape(shape)
    layer["bias"] = ((f64(layer["bias"]) - f64(running["mean"])) * s + f64(bn["bias"])).astype(np.float32)
  return dataclasses.replace(config, batch_norm=False), {"params": params, "batch_stats": {}}


def fold_model(model: nnx.Module) -> nnx.Module:
  """The model with BatchNorm folded into its convolutions, in eval mode; a model without BN as it is."""
  config, variables = fold(model.config, get_variables(model))
  if config is model.config:
    return model
  folded = nnx.eval_shape(lambda: build_model(config))
  set_variables(folded, jax.tree.map(jnp.asarray, variables), source="folded variables")
  folded.eval()
  return folded


def reestimate_checkpoint(checkpoint, out, batches: Iterable, num_batches: int, mesh=None,
                          note: dict | None = None) -> dict:
  """Writes `out`: the checkpoint with re-estimated BatchNorm statistics; returns its meta.

  `note` (data, stage, crop, ...) goes into meta["bn_statistics"] beside the batch count.
  """
  checkpoints.check_new_dir(out)
  model, meta = checkpoints.load_model(checkpoint)
  stats = reestimate(model, batches, num_batches, mesh)
  variables = {"params": get_variables(model)["params"], "batch_stats": stats}
  meta = {k: v for k, v in meta.items() if k != "metrics"}  # measured with the old statistics
  meta["bn_statistics"] = {"reestimated_from": str(checkpoint), "batches": num_batches, **(note or {})}
  checkpoints.write_checkpoint(out, variables, meta)
  return meta


def fold_checkpoint(checkpoint, out) -> dict:
  """Writes `out`: the checkpoint with BatchNorm folded (a batch_norm=False network); returns its meta."""
  checkpoints.check_new_dir(out)
  variables, meta = checkpoints.restore_variables(checkpoint)
  config = ModelConfig(**meta["model"])
  if not config.batch_norm:
    raise ValueError(f"{checkpoint}: the network has no BatchNorm (batch_norm=False: FCN-8s, or "
                     "already folded); nothing to fold, use it as it is")
  config, variables = fold(config, variables)
  meta = meta | {"model": dataclasses.asdict(config), "bn_folded_from": str(checkpoint)}
  checkpoints.write_checkpoint(out, variables, meta)
  return meta


def _get(tree: dict, path: LayerPath, create: bool = False) -> dict:
  for key in path:
    tree = tree.setdefault(key, {}) if create else tree[key]
  return tree
