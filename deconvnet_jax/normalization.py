"""Input normalisation: the one a checkpoint's weights were trained with is applied at inference.

caffe_bgr:        the reference DeconvNet / Caffe VGG16: BGR, 0-255, mean subtracted.
torchvision_rgb:  torchvision's VGG16: RGB in [0, 1], ImageNet mean / std.
"""

import numpy as np

CAFFE_BGR_MEAN = np.array([104.00698793, 116.66876762, 122.67891434], np.float32)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def normalize(images, mode: str):
  """RGB uint8 images [..., H, W, 3] (NumPy or JAX) -> float32 network input."""
  x = images.astype(np.float32)
  if mode == "caffe_bgr":
    return x[..., ::-1] - CAFFE_BGR_MEAN
  if mode == "torchvision_rgb":
    return (x / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
  raise ValueError(f"unknown input normalisation {mode!r}")


def denormalize(x, mode: str) -> np.ndarray:
  """Network input -> RGB uint8, for pictures of what the network saw."""
  x = np.asarray(x, np.float32)
  if mode == "caffe_bgr":
    rgb = (x + CAFFE_BGR_MEAN)[..., ::-1]
  elif mode == "torchvision_rgb":
    rgb = (x * IMAGENET_STD + IMAGENET_MEAN) * 255.0
  else:
    raise ValueError(f"unknown input normalisation {mode!r}")
  return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
