"""The two training stages' examples: crops around instances (stage 1) and around proposals (stage 2).

An item (data/items.py) names an image, a box and, for stage 1, the instance
that keeps its class. Cropping enlarges the box 1.2x around its centre, takes the square
region (padding past the border: image zeros after normalisation, labels void),
resizes it to 250 x 250, then takes a random 224 x 224 crop and flips half of
them (SPEC.md section 2).
"""

import dataclasses

import numpy as np
from PIL import Image

from deconvnet_jax.data.items import Item
from deconvnet_jax.labels import VOID, Example


@dataclasses.dataclass(frozen=True)
class CropSpec:
  resize: int = 250
  crop: int = 224
  context: float = 1.2  # box enlargement around its centre


def context_square(box, context: float) -> tuple[float, float, float]:
  """(top, left, side) of the square of side context * longer side, centred on the box."""
  y0, x0, y1, x1 = box
  side = context * max(y1 - y0, x1 - x0)
  return (y0 + y1) / 2 - side / 2, (x0 + x1) / 2 - side / 2, side


def resample_square(array: np.ndarray, top, left, side, size, resample, fill) -> np.ndarray:
  """The square [top, top+side) x [left, left+side) of `array` resized to size x size."""
  im = Image.fromarray(array)
  return np.asarray(im.transform((size, size), Image.Transform.EXTENT,
                                 (left, top, left + side, top + side), resample=resample,
                                 fillcolor=fill))


def square_crop(image: np.ndarray, square, size: int) -> tuple[np.ndarray, np.ndarray]:
  """(top, left, side) square of an RGB image resized to size x size, and where it is inside
  the image: ([size, size, 3] uint8, [size, size] bool). Training and inference share it."""
  top, left, side = square
  crop = resample_square(image, top, left, side, size, Image.Resampling.BILINEAR, (0, 0, 0))
  inside = np.full(image.shape[:2], 255, np.uint8)
  valid = resample_square(inside, top, left, side, size, Image.Resampling.NEAREST, 0) > 0
  return crop, valid


def crop_item(ex: Example, item: Item, spec: CropSpec, rng: np.random.Generator):
  """(image [crop, crop, 3] uint8, label [crop, crop] uint8, valid [crop, crop] bool)."""
  if item.instance:
    label = np.where(ex.label == VOID, VOID, 0).astype(np.uint8)
    inside = ex.instances == item.instance
    label[inside] = ex.label[inside]
  else:
    label = ex.label
  square = context_square(item.box, spec.context)
  image, valid = square_crop(ex.image, square, spec.resize)
  label = resample_square(label, *square, spec.resize, Image.Resampling.NEAREST, VOID)
  y, x = rng.integers(0, spec.resize - spec.crop + 1, 2)
  window = (slice(y, y + spec.crop), slice(x, x + spec.crop))
  image, label, valid = image[window], label[window], valid[window]
  if rng.random() < 0.5:
    image, label, valid = image[:, ::-1], label[:, ::-1], valid[:, ::-1]
  return image, label, valid
