"""Reading any image a user may have as RGB uint8, and writing files atomically."""

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm")


class ImageError(ValueError):
  """An input file is not a usable image; the message names it."""


def load_rgb(path) -> np.ndarray:
  """[H, W, 3] uint8 RGB from any PIL-readable file: EXIF rotation applied; grayscale,
  palette, RGBA (on white), CMYK and 16-bit images converted."""
  path = Path(path)
  try:
    with Image.open(path) as im:
      im.load()
      im = ImageOps.exif_transpose(im)
      if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im, np.float64)
        im = Image.fromarray(np.clip(a / max(a.max(), 1) * 255, 0, 255).astype(np.uint8))
      if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
      return np.asarray(im.convert("RGB"))
  except FileNotFoundError as e:
    raise ImageError(f"{path}: no such file") from e
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    raise ImageError(f"{path}: not a readable image ({e})") from e


def save_atomic(image: Image.Image, path, **kwargs):
  """Writes next to `path`, then renames: readers never see a half-written file."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
  os.close(fd)
  try:
    image.save(tmp, **kwargs)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def save_npy_atomic(array: np.ndarray, path):
  path = Path(path)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npy")
  try:
    with os.fdopen(fd, "wb") as f:
      np.save(f, array)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise
