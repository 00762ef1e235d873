"""The fully connected CRF step (Kraehenbuehl and Koltun 2011) through pydensecrf.

Host-side NumPy only: image [H, W, 3] uint8 RGB and class probabilities
[H, W, C] in, refined probabilities [H, W, C] float32 out. A VOC-sized image with
21 classes costs about 2 s on one core, so `dense_crf_many` spreads images over processes.
"""

import concurrent.futures
import dataclasses
import itertools
import multiprocessing
import os

import numpy as np

# Probabilities are clipped here before -log, as pydensecrf.utils.unary_from_softmax does.
PROB_EPSILON = 1e-5
INSTALL_HINT = ("the dense CRF needs pydensecrf: `pip install pydensecrf2` (it provides the "
                "`pydensecrf` module; the 2018 `pydensecrf` release does not build on current Python)")


@dataclasses.dataclass(frozen=True)
class CRFParams:
  """Kernel widths and Potts weights; defaults are the reference code's."""
  gaussian_sxy: float = 3.0
  gaussian_compat: float = 3.0
  bilateral_sxy: float = 20.0
  bilateral_srgb: float = 3.0
  bilateral_compat: float = 5.0
  iterations: int = 10


def _checked(image, prob) -> tuple[np.ndarray, np.ndarray]:
  """C-contiguous copies of image [H, W, 3] uint8 and prob [H, W, C]; ValueError on bad shapes."""
  image, prob = np.asarray(image), np.asarray(prob)
  if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
    raise ValueError(f"dense_crf: image must be [H, W, 3] uint8 RGB, got {image.shape} {image.dtype}")
  if prob.ndim != 3 or prob.shape[2] < 1 or not np.issubdtype(prob.dtype, np.floating):
    raise ValueError(f"dense_crf: prob must be [H, W, C] float probabilities, got {prob.shape} {prob.dtype}")
  if image.shape[:2] != prob.shape[:2]:
    raise ValueError(f"dense_crf: image is {image.shape[0]}x{image.shape[1]} (HxW) but prob is "
                     f"{prob.shape[0]}x{prob.shape[1]}; resize the probabilities to the image first")
  # A fresh writable copy: pydensecrf rejects read-only buffers (e.g. arrays from PIL).
  return np.array(image, order="C", copy=True), prob


def check_available():
  """Raises the ImportError with install instructions now, rather than in a worker later."""
  try:
    import pydensecrf.densecrf  # noqa: F401 - only whether it imports
  except ImportError as e:
    raise ImportError(INSTALL_HINT) from e


def dense_crf(image, prob, params: CRFParams = CRFParams()) -> np.ndarray:
  """Mean-field refinement of prob [H, W, C] on image [H, W, 3] uint8; returns [H, W, C] float32."""
  image, prob = _checked(image, prob)
  try:
    import pydensecrf.densecrf as dcrf
  except ImportError as e:
    raise ImportError(INSTALL_HINT) from e
  h, w, c = prob.shape
  # -log in float64, then the float32 C-contiguous [C, H*W] that setUnaryEnergy requires.
  p = np.clip(prob.astype(np.float64), PROB_EPSILON, 1.0)
  unary = np.ascontiguousarray(-np.log(p).transpose(2, 0, 1).reshape(c, h * w), dtype=np.float32)
  crf = dcrf.DenseCRF2D(w, h, c)  # width first
  crf.setUnaryEnergy(unary)
  crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
  crf.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb, rgbim=image,
                           compat=params.bilateral_compat)
  q = np.asarray(crf.inference(params.iterations), np.float32)  # [C, H*W]
  return np.ascontiguousarray(q.reshape(c, h, w).transpose(1, 2, 0))


def crf_labels(image, prob, params: CRFParams = CRFParams()) -> np.ndarray:
  """[H, W] uint8 argmax of the refined probabilities."""
  assert np.shape(prob)[-1] <= 256, "uint8 labels hold at most 256 classes"
  return dense_crf(image, prob, params).argmax(-1).astype(np.uint8)


def worker_pool(processes: int | None) -> concurrent.futures.ProcessPoolExecutor:
  """A pool for dense_crf: processes that hold this module and NumPy, not JAX.

  Not forked from this process: forking one that holds JAX/XLA threads can deadlock. Where
  there is a fork server, workers fork from it (a clean, single-threaded interpreter: quick to
  start); else they are spawned. Either way each re-imports the main script, so the scripts
  import their program only under `if __name__ == "__main__"` (soak.py measured 250-450 MB
  per worker when they did not).
  """
  if "forkserver" in multiprocessing.get_all_start_methods():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([])
  else:
    context = multiprocessing.get_context("spawn")
  return concurrent.futures.ProcessPoolExecutor(processes, mp_context=context)


def dense_crf_many(images: list, probs: list, params: CRFParams = CRFParams(),
                   processes: int | None = None) -> list[np.ndarray]:
  """`dense_crf` over many images, in input order, on up to `processes` processes (None: all cores)."""
  if len(images) != len(probs):
    raise ValueError(f"dense_crf_many: {len(images)} images but {len(probs)} probability maps")
  workers = min((os.cpu_count() or 1) if processes is None else processes, len(images))
  if workers <= 1:
    return [dense_crf(image, prob, params) for image, prob in zip(images, probs)]
  with worker_pool(workers) as pool:
    return list(pool.map(dense_crf, images, probs, itertools.repeat(params, len(images))))
