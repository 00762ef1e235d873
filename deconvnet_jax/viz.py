"""Pictures: VOC-palette label PNGs and colour overlays."""

import numpy as np
from PIL import Image

from deconvnet_jax.data.voc import voc_colormap


def palette_image(mask: np.ndarray) -> Image.Image:
  """[H, W] uint8 indices as a VOC-palette PNG image (values kept, colours for viewers)."""
  im = Image.fromarray(mask)  # mode L; putpalette turns it into P without touching values
  im.putpalette(voc_colormap().reshape(-1).tolist())
  return im


def overlay(image: np.ndarray, label: np.ndarray, alpha: float = 0.5) -> np.ndarray:
  """Class colours blended over the image where the label is not background: [H, W, 3] uint8."""
  colours = voc_colormap()[label].astype(np.float32)
  blend = np.where((label > 0)[..., None], (1 - alpha) * image + alpha * colours, image)
  return blend.astype(np.uint8)
