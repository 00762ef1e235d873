"""Instance maps back to the image: paste per-proposal score maps, drop unreliable ones, ensemble.

A proposal's network input is the S x S resize of its square (top, left, side)
in image pixels (`data.examples.context_square`; crop pixel i covers
[top + i * side / S, top + (i + 1) * side / S)). Pasting inverts that resize:
an image pixel whose centre lies in the square samples the crop's score map
bilinearly at its centre's crop coordinate. Host-side NumPy only.
"""

import numpy as np

# Pasting works through a square in bands of rows of about this many floats:
# temporaries that stay in cache make a whole-image square ~1.7x faster.
BAND_FLOATS = 2**19


def softmax(scores) -> np.ndarray:
  """Numerically stable softmax over the last axis: [..., C] -> [..., C] float32."""
  x = np.asarray(scores, np.float32)
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _axis_samples(start: float, side: float, size: int, length: int):
  """Covered image pixels along one axis and their bilinear taps into the crop.

  Pixel p is covered when its centre p + 0.5 lies in [start, start + side);
  only pixels inside [0, length) are returned. Returns (first, end, i0 [n] int,
  i1 [n] int, frac [n] float32): the crop coordinate is clamped to [0, size - 1].
  """
  first = max(int(np.ceil(start - 0.5)), 0)
  end = min(int(np.ceil(start + side - 0.5)), length)
  centres = np.arange(first, max(end, first)) + 0.5
  coord = np.clip((centres - start) * (size / side) - 0.5, 0, size - 1)  # [n] float64
  i0 = np.floor(coord).astype(np.int64)
  i1 = np.minimum(i0 + 1, size - 1)
  return first, end, i0, i1, (coord - i0).astype(np.float32)


def _lerp(a: np.ndarray, b: np.ndarray, frac: np.ndarray) -> np.ndarray:
  """a + (b - a) * frac, in place in a (a, b fresh gathers); frac broadcasts."""
  b -= a
  b *= frac
  a += b
  return a


def paste(scores, squares, image_hw, mode: str = "max") -> np.ndarray:
  """Paste K proposal score maps [K, S, S, C] at their squares [K, 3] (top, left, side): [H, W, C] float32.

  mode "max": pixel-wise max into a zero-initialised map (the reference code's
  rule: uncovered pixels score 0 and a negative score never beats 0); "mean":
  average over the proposals covering each pixel, uncovered pixels 0.
  """
  if mode not in ("max", "mean"):
    raise ValueError(f"unknown aggregation mode {mode!r}: use 'max' or 'mean'")
  scores = np.asarray(scores, np.float32)
  squares = np.asarray(squares, np.float64).reshape(-1, 3)
  assert scores.ndim == 4 and scores.shape[1] == scores.shape[2], scores.shape
  assert len(scores) == len(squares), (scores.shape, squares.shape)
  assert np.all(squares[:, 2] > 0), "square sides must be positive"
  height, width = image_hw
  size, classes = scores.shape[2], scores.shape[3]
  out = np.zeros((height, width, classes), np.float32)  # [H, W, C]
  count = np.zeros((height, width, 1), np.float32) if mode == "mean" else None
  for score, (top, left, side) in zip(scores, squares):
    y0, y1, r0, r1, fy = _axis_samples(top, side, size, height)
    x0, x1, c0, c1, fx = _axis_samples(left, side, size, width)
    if y1 <= y0 or x1 <= x0:
      continue
    rows = _lerp(score[r0], score[r1], fy[:, None, None])  # [ny, S, C]
    band = max(BAND_FLOATS // ((x1 - x0) * classes), 1)
    for y in range(y0, y1, band):
      part = rows[y - y0:y - y0 + band]
      patch = _lerp(part[:, c0], part[:, c1], fx[None, :, None])  # [band, nx, C]
      region = out[y:y + len(part), x0:x1]
      if mode == "max":
        np.maximum(region, patch, out=region)
      else:
        region += patch
    if mode == "mean":
      count[y0:y1, x0:x1] += 1
  if mode == "mean":
    np.divide(out, count, out=out, where=count > 0)
  return out


def reliable(scores, min_foreground: float = 0.01, min_confidence: float = 0.0) -> np.ndarray:
  """[K] bool: which proposals' predictions to aggregate, from their score maps [K, S, S, C].

  A proposal is dropped when its predicted foreground (argmax != 0, background
  winning ties) covers less than `min_foreground` of its crop, or when its mean
  max-softmax probability over the crop is below `min_confidence`. A crop that
  sees only background has nothing to add but background scores, which under
  max aggregation could mask another proposal's object.
  """
  scores = np.asarray(scores, np.float32)
  assert scores.ndim == 4, scores.shape
  foreground = (scores.argmax(-1) != 0).mean((1, 2))  # [K]
  keep = foreground >= min_foreground
  # A crop's mean max-probability is at least 1 / C, so a bound <= 0 passes every crop: skip the softmax over all of
  # them, most of this function's time (0.8 of 1.0 s at 50 proposals of 224 x 224 x 21).
  if min_confidence > 0:
    keep &= softmax(scores).max(-1).mean((1, 2)) >= min_confidence  # [K]
  return keep


def ensemble(deconv_scores, fcn_scores) -> np.ndarray:
  """EDeconvNet: DeconvNet's aggregated scores times the rectified FCN scores, [H, W, C] float32.

  This is the reference code's rule, deconv * max(fcn, 0); the caller applies
  softmax and the CRF to the result.
  """
  deconv = np.asarray(deconv_scores, np.float32)
  fcn = np.asarray(fcn_scores, np.float32)
  assert deconv.shape == fcn.shape, (deconv.shape, fcn.shape)
  return deconv * np.maximum(fcn, 0)
