"""PASCAL VOC 2012 layout: class names, palette, split files and per-image records.

Reads an extracted `VOC2012` folder (or any folder in its layout, such as the
generated dataset): JPEGImages/ID.jpg, SegmentationClass/ID.png and
SegmentationObject/ID.png (palette PNGs whose pixel values are indices, 255 =
void) and ImageSets/Segmentation/SPLIT.txt.
"""

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor")
VOID = 255


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


@dataclasses.dataclass
class Example:
  """One annotated image."""

  image_id: str
  image: np.ndarray  # [H, W, 3] uint8 RGB
  label: np.ndarray  # [H, W] uint8 class index, 255 = void
  instances: np.ndarray  # [H, W] uint8 instance id 1..N, 0 = none, 255 = void
  boxes: np.ndarray  # [N, 4] int32 (y0, x0, y1, x1), exclusive end, one per instance id
  classes: np.ndarray  # [N] int32 class of each instance


class DataError(ValueError):
  """A dataset file is missing or wrong; the message names it."""


def read_split(root, split: str) -> list[str]:
  """Image ids listed in ImageSets/Segmentation/SPLIT.txt."""
  path = Path(root) / "ImageSets" / "Segmentation" / f"{split}.txt"
  if not Path(root).is_dir():
    raise DataError(f"{root}: no such dataset folder")
  if not path.is_file():
    raise DataError(f"{path}: split file not found (splits here: "
                    f"{sorted(p.stem for p in path.parent.glob('*.txt')) or 'none'})")
  return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def read_index_png(path: Path, num_classes: int | None = None) -> np.ndarray:
  """A palette or grayscale PNG as its raw indices [H, W] uint8; RGB masks are refused."""
  if not path.is_file():
    raise DataError(f"{path}: mask file not found")
  with Image.open(path) as im:
    if im.mode not in ("P", "L"):
      raise DataError(f"{path}: mask is {im.mode}, expected a palette (P) or grayscale (L) PNG "
                      "holding class indices; convert colours back to indices first")
    mask = np.asarray(im)
  if num_classes is not None:
    bad = np.unique(mask[(mask >= num_classes) & (mask != VOID)])
    if bad.size:
      raise DataError(f"{path}: class indices {bad.tolist()} outside 0..{num_classes - 1} (and 255 void)")
  return mask


def read_image(path: Path) -> np.ndarray:
  if not path.is_file():
    raise DataError(f"{path}: image file not found")
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert("RGB"))
  except OSError as e:
    raise DataError(f"{path}: cannot decode image: {e}") from e


def instance_boxes(label: np.ndarray, instances: np.ndarray, where="") -> tuple[np.ndarray, np.ndarray]:
  """Tight box and majority class of each instance id 1..N."""
  ids = [i for i in np.unique(instances) if 0 < i < VOID]
  boxes, classes = [], []
  for i in ids:
    ys, xs = np.nonzero(instances == i)
    boxes.append((ys.min(), xs.min(), ys.max() + 1, xs.max() + 1))
    cls = label[ys, xs]
    cls = cls[(cls != 0) & (cls != VOID)]
    if cls.size == 0:
      raise DataError(f"{where}: instance {i} covers no object-class pixel in the class mask")
    classes.append(np.bincount(cls).argmax())
  return np.asarray(boxes, np.int32).reshape(-1, 4), np.asarray(classes, np.int32)


def read_example(root, image_id: str, num_classes: int = len(VOC_CLASSES)) -> Example:
  """The image, class mask, instance mask and per-instance boxes / classes of one id."""
  root = Path(root)
  image = read_image(root / "JPEGImages" / f"{image_id}.jpg")
  label_path = root / "SegmentationClass" / f"{image_id}.png"
  label = read_index_png(label_path, num_classes)
  object_path = root / "SegmentationObject" / f"{image_id}.png"
  instances = read_index_png(object_path) if object_path.exists() else np.zeros_like(label)
  for path, mask in ((label_path, label), (object_path, instances)):
    if mask.shape != image.shape[:2]:
      raise DataError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is "
                      f"{image.shape[1]}x{image.shape[0]}")
  boxes, classes = instance_boxes(label, instances, object_path)
  return Example(image_id, image, label, instances, boxes, classes)
