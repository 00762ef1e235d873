"""Reading any image a user may have as RGB uint8, and writing files atomically."""

import contextlib
import io
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm")


class ImageError(ValueError):
  """An input file is not a usable image; the message names it."""


# What PIL raises on a damaged or hostile image file.
IMAGE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def open_image(path) -> Image.Image:
  """Image.open of an image to decode, read through memory (PIL reads some lengths a file claims
  with file.read(n), which allocates n bytes first: a PNG chunk can claim 2 GB), and refused
  (DecompressionBombError) past PIL.Image.MAX_IMAGE_PIXELS, where PIL only warns: a few hundred
  bytes could claim a gigabyte of pixels."""
  im = Image.open(io.BytesIO(Path(path).read_bytes()))
  if Image.MAX_IMAGE_PIXELS and im.width * im.height > Image.MAX_IMAGE_PIXELS:
    im.close()
    raise Image.DecompressionBombError(
        f"{im.width}x{im.height} pixels, more than PIL.Image.MAX_IMAGE_PIXELS "
        f"({Image.MAX_IMAGE_PIXELS:,}) against decompression bombs; raise it to read this image")
  return im


def load_rgb(path) -> np.ndarray:
  """[H, W, 3] uint8 RGB from any PIL-readable file: EXIF rotation applied; grayscale,
  palette, RGBA (on white), CMYK and 16-bit images converted."""
  path = Path(path)
  try:
    with open_image(path) as im:
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
  except IMAGE_ERRORS as e:
    raise ImageError(f"{path}: not a readable image ({e})") from e


def _umask() -> int:
  """The process's umask: from /proc on Linux; elsewhere by setting it and back (os.umask can only
  be read so), which another thread creating a file at that moment would see."""
  with contextlib.suppress(OSError, ValueError):
    with open("/proc/self/status", encoding="ascii", errors="replace") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def atomic_path(path):
  """Yields a temporary path beside `path`, renamed onto it only if the block succeeds:
  readers never see a half-written file."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
  os.close(fd)
  try:
    yield tmp
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide the outputs from other users
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


@contextlib.contextmanager
def atomic_dir(path):
  """Yields a new temporary folder beside `path` (absent, or an empty folder), renamed onto it only
  if the block succeeds: a folder of several files appears whole or not at all."""
  path = Path(path)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  try:
    yield tmp
    if path.exists():
      path.rmdir()
    tmp.rename(path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def save_atomic(image: Image.Image, path, **kwargs):
  with atomic_path(path) as tmp:
    image.save(tmp, **kwargs)


def save_text_atomic(text: str, path):
  with atomic_path(path) as tmp:
    Path(tmp).write_text(text, encoding="utf-8")


def save_npy_atomic(array: np.ndarray, path):
  with atomic_path(path) as tmp:
    np.save(tmp, array)
