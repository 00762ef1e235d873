"""Host-side batches: random crops with flips for training, padded full images for evaluation."""

import numpy as np

from deconvnet_jax.data.voc import VOID, Example
from deconvnet_jax.normalization import normalize


def random_crop(ex: Example, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """A size x size crop (image padded with zeros after normalisation, labels with 255) + flip."""
  h, w = ex.label.shape
  ph, pw = max(size - h, 0), max(size - w, 0)
  top = rng.integers(-ph, max(h - size, 0) + 1)  # negative: the crop reaches past the border
  left = rng.integers(-pw, max(w - size, 0) + 1)
  image = np.zeros((size, size, 3), np.uint8)
  label = np.full((size, size), VOID, np.uint8)
  ys, xs = slice(max(top, 0), min(top + size, h)), slice(max(left, 0), min(left + size, w))
  dst = (slice(ys.start - top, ys.stop - top), slice(xs.start - left, xs.stop - left))
  image[dst], label[dst] = ex.image[ys, xs], ex.label[ys, xs]
  valid = np.zeros((size, size), bool)
  valid[dst] = True
  if rng.random() < 0.5:
    image, label, valid = image[:, ::-1], label[:, ::-1], valid[:, ::-1]
  return image, label, valid


def train_batch(examples: list[Example], step: int, batch_size: int, crop: int, norm: str,
                seed: int) -> dict:
  """Batch number `step`: {"image": [B, crop, crop, 3] float32, "label": [B, crop, crop] int32}.

  A pure function of (seed, step), so a resumed run continues with the batches
  the interrupted one would have seen.
  """
  rng = np.random.default_rng([seed, step])
  picks = rng.integers(len(examples), size=batch_size)
  crops = [random_crop(examples[i], crop, rng) for i in picks]
  image = np.stack([normalize(c[0], norm) * c[2][..., None] for c in crops])
  label = np.stack([c[1] for c in crops]).astype(np.int32)
  return {"image": image, "label": label}


def padded_eval_batches(examples: list[Example], batch_size: int, norm: str, multiple: int = 32):
  """Full images, grouped by size rounded up to `multiple` and padded (bottom / right) to it.

  Few distinct shapes, so evaluation compiles a few times at most, and little
  padding that training never saw. Yields (images [B, H, W, 3] float32, labels
  [B, H, W] int32 with 255 on padding); short batches are filled with void images.
  """
  bucket = lambda ex: tuple(-(-n // multiple) * multiple for n in ex.label.shape)
  groups: dict[tuple[int, int], list[Example]] = {}
  for ex in examples:
    groups.setdefault(bucket(ex), []).append(ex)
  for (side_h, side_w), group in sorted(groups.items()):
    for start in range(0, len(group), batch_size):
      images = np.zeros((batch_size, side_h, side_w, 3), np.float32)
      labels = np.full((batch_size, side_h, side_w), VOID, np.int32)
      for i, ex in enumerate(group[start:start + batch_size]):
        h, w = ex.label.shape
        images[i, :h, :w] = normalize(ex.image, norm)
        labels[i, :h, :w] = ex.label
      yield images, labels
