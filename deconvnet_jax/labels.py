"""The label vocabulary every part shares: void, VOC's class names and palette, `Example`, `DataError`.

Data readers, metrics, pictures and inference import these from here and
nothing else from the data package.
"""

import dataclasses
from typing import NamedTuple

import numpy as np

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor")
VOID = 255  # label and instance value of boundaries and unlabelled pixels: ignored by loss and metrics


def voc_colormap(n: int = 256) -> np.ndarray:
  """The standard bit-interleaved VOC palette: [n, 3] uint8 (index 255 is (224, 224, 192))."""
  cmap = np.zeros((n, 3), np.uint8)
  for i in range(n):
    c, r, g, b = i, 0, 0, 0
    for j in range(8):
      r |= ((c >> 0) & 1) << (7 - j)
      g |= ((c >> 1) & 1) << (7 - j)
      b |= ((c >> 2) & 1) << (7 - j)
      c >>= 3
    cmap[i] = (r, g, b)
  return cmap


class Instances(NamedTuple):
  """An image's instances without its pixels: what stage-1 items and proposal recall need."""

  ids: np.ndarray  # [N] int32 id of each instance in `Example.instances`
  boxes: np.ndarray  # [N, 4] int32 (y0, x0, y1, x1), exclusive end
  classes: np.ndarray  # [N] int32


@dataclasses.dataclass
class Example:
  """One annotated image."""

  image_id: str
  image: np.ndarray  # [H, W, 3] uint8 RGB
  label: np.ndarray  # [H, W] uint8 class index, 255 = void
  instances: np.ndarray  # [H, W] uint8 instance id 1..N, 0 = none, 255 = void
  boxes: np.ndarray  # [N, 4] int32 (y0, x0, y1, x1), exclusive end, one per instance
  classes: np.ndarray  # [N] int32 class of each instance
  ids: np.ndarray  # [N] int32 id of each instance in `instances` (ids need not be contiguous)


class DataError(ValueError):
  """A dataset file is missing or wrong; the message names it."""
