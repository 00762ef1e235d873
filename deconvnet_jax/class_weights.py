"""Median-frequency class balancing (Eigen and Fergus 2015), computed once per training split.

freq_c = (pixels of class c) / (non-void pixels of the images that contain c);
weight_c = median over present classes of freq / freq_c. A class absent from
the split gets weight 1 (it never reaches the loss).
"""

import json
from pathlib import Path
from typing import Iterable

import numpy as np

from deconvnet_jax.configs import json_digest
from deconvnet_jax.labels import VOID
from deconvnet_jax.images import save_text_atomic


def class_pixel_counts(labels: Iterable[np.ndarray], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """(pixels of each class [K], non-void pixels of the images containing each class [K]), int64."""
  pixels = np.zeros(num_classes, np.int64)
  image_pixels = np.zeros(num_classes, np.int64)
  for label in labels:
    label = np.asarray(label).reshape(-1)
    counts = np.bincount(label[label != VOID], minlength=num_classes)[:num_classes]
    pixels += counts
    image_pixels[counts > 0] += counts.sum()
  return pixels, image_pixels


def median_frequency_weights(pixels: np.ndarray, image_pixels: np.ndarray) -> np.ndarray:
  """weight_c = median(freq) / freq_c over the classes present; 1 for absent classes. [K] float64."""
  present = pixels > 0
  if not present.any():
    raise ValueError("no labelled pixels: cannot compute class weights")
  freq = np.where(present, pixels / np.maximum(image_pixels, 1), np.nan)
  return np.where(present, np.nanmedian(freq) / freq, 1.0)


def cached_weights(path: Path, key: dict, labels: Iterable[np.ndarray], num_classes: int) -> np.ndarray:
  """Median-frequency weights, read from `path` when it holds them for the same `key`, else computed and saved."""
  digest = json_digest(key)
  if path.is_file():
    saved = json.loads(path.read_text())
    if saved.get("key") == digest and len(saved.get("weights", ())) == num_classes:
      return np.asarray(saved["weights"])
  pixels, image_pixels = class_pixel_counts(labels, num_classes)
  weights = median_frequency_weights(pixels, image_pixels)
  save_text_atomic(json.dumps({"key": digest, "source": key, "weights": weights.tolist(),
                               "pixels": pixels.tolist(), "image_pixels": image_pixels.tolist()}, indent=1), path)
  return weights
