"""The inference network as a serialized `jax.export` artifact, runnable without this package's model code.

OUT/ holds:
  model.jaxexport  StableHLO of (params, RGB uint8 [b, H, W, 3]) -> logits float32 [b, H, W, K],
                   BatchNorm folded, the input normalisation inside; the batch b is symbolic
  params.npz       the parameters p0, p1, ... in the order the function takes them
  meta.json        class names, input size, what the checkpoint was

`load(OUT)` needs only jax and numpy:
  run = load("exported/");  logits = run(rgb_uint8_batch)
"""

import json
from pathlib import Path

import jax
import numpy as np

from deconvnet_jax import onednn

FORMAT = "deconvnet_jax.export/1"


def export_model(model, out, class_names, input_size: int, source: str = "") -> dict:
  """Writes OUT (refused if it exists) for inputs of input_size x input_size and any batch; returns meta."""
  from flax import nnx  # the model code: needed to export, not to load

  from deconvnet_jax.batchnorm import fold_model
  from deconvnet_jax.checkpoints import check_new_dir
  from deconvnet_jax.images import atomic_dir
  from deconvnet_jax.normalization import normalize

  out = Path(out)
  check_new_dir(out)
  model = fold_model(model)
  model.eval()
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten(state)
  norm = model.config.input_norm

  def logits(params: list, images):  # [b, S, S, 3] uint8 -> [b, S, S, K] float32
    x = normalize(images, norm).astype(np.float32)
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, params))(x).astype(np.float32)

  (b,) = jax.export.symbolic_shape("b")
  args = ([jax.ShapeDtypeStruct(p.shape, p.dtype) for p in leaves],
          jax.ShapeDtypeStruct((b, input_size, input_size, 3), np.uint8))
  with onednn.portable():  # a serialized program cannot call this process's oneDNN library
    exported = jax.export.export(jax.jit(logits))(*args)
  meta = {"format": FORMAT, "class_names": list(class_names), "input_size": input_size,
          "input": "RGB uint8 [batch, input_size, input_size, 3]",
          "output": f"logits float32 [batch, input_size, input_size, {len(class_names)}]",
          "source": source, "arch": model.config.arch, "input_norm": norm}
  with atomic_dir(out) as tmp:
    (tmp / "model.jaxexport").write_bytes(exported.serialize())
    np.savez(tmp / "params.npz", **{f"p{i}": np.asarray(p) for i, p in enumerate(leaves)})
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
  return meta


def load(path):
  """A function RGB uint8 [b, S, S, 3] -> logits [b, S, S, K] from an export folder; `.meta` holds meta.json."""
  path = Path(path)
  meta = json.loads((path / "meta.json").read_text())
  if meta.get("format") != FORMAT:
    raise ValueError(f"{path}: not a deconvnet_jax export (format {meta.get('format')!r}, expected {FORMAT!r})")
  exported = jax.export.deserialize(bytearray((path / "model.jaxexport").read_bytes()))
  with np.load(path / "params.npz") as z:
    params = [jax.numpy.asarray(z[f"p{i}"]) for i in range(len(z.files))]

  def run(images) -> np.ndarray:
    return np.asarray(exported.call(params, np.asarray(images, np.uint8)))

  run.meta = meta
  return run
