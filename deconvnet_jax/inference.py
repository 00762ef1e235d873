"""Image in, label map out. This version runs the network on the whole image.

Instance-wise inference (proposals -> per-proposal segmentation -> aggregation
-> CRF) is being added on top of the same entry points.
"""

import jax
import numpy as np
from flax import nnx

from deconvnet_jax.models import min_input_size
from deconvnet_jax.normalization import normalize


class Segmenter:
  """A trained model plus what it needs at inference: normalisation and a few compiled shapes."""

  def __init__(self, model: nnx.Module, multiple: int = 32):
    model.eval()
    self.config = model.config
    self.graphdef, self.state = nnx.split(model)
    self.multiple = multiple
    self._forward = jax.jit(lambda state, x: jax.nn.softmax(nnx.merge(self.graphdef, state)(x), -1))
    self.shapes_compiled: set[tuple[int, int]] = set()

  def bucket(self, h: int, w: int) -> tuple[int, int]:
    """Input shape for an h x w image: rounded up to `multiple`, at least the model's minimum."""
    least = min_input_size(self.config) if self.config.arch == "deconvnet" else 1
    up = lambda n: -(-max(n, least) // self.multiple) * self.multiple
    return up(h), up(w)

  def probabilities(self, image: np.ndarray) -> np.ndarray:
    """RGB uint8 [H, W, 3] -> class probabilities [H, W, K] float32 (whole-image forward)."""
    h, w = image.shape[:2]
    bh, bw = self.bucket(h, w)
    x = np.zeros((1, bh, bw, 3), np.float32)
    x[0, :h, :w] = normalize(image, self.config.input_norm)
    self.shapes_compiled.add((bh, bw))
    return np.asarray(self._forward(self.state, x))[0, :h, :w]

  def segment(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 [H, W, 3] -> (label map [H, W] uint8, probabilities [H, W, K])."""
    prob = self.probabilities(image)
    return prob.argmax(-1).astype(np.uint8), prob
