"""Aggregation: paste against a per-pixel loop, bilinear exactness, reliable, softmax, ensemble."""

import math

import numpy as np
import pytest
from PIL import Image

from deconvnet_jax import aggregate
from deconvnet_jax.data.examples import resample_square


def bilinear_loop(crop, u, v):
  """[C] float64 value of an [S, S, C] map at crop coordinate (u, v), indices clamped to the edge."""
  size = crop.shape[0]
  i, j = math.floor(u), math.floor(v)
  fu, fv = u - i, v - j
  at = lambda a, b: crop[min(max(a, 0), size - 1), min(max(b, 0), size - 1)].astype(np.float64)
  return ((1 - fu) * (1 - fv) * at(i, j) + (1 - fu) * fv * at(i, j + 1)
          + fu * (1 - fv) * at(i + 1, j) + fu * fv * at(i + 1, j + 1))


def paste_loop(scores, squares, image_hw, mode):
  """Per image pixel: sample every square whose interval holds the pixel centre, then max or mean."""
  height, width = image_hw
  size, classes = scores.shape[2], scores.shape[3]
  out = np.zeros((height, width, classes))
  covered = np.zeros((height, width), bool)
  for y in range(height):
    for x in range(width):
      cy, cx = y + 0.5, x + 0.5
      values = []
      for crop, (top, left, side) in zip(scores, squares):
        if top <= cy < top + side and left <= cx < left + side:
          values.append(bilinear_loop(crop, (cy - top) * size / side - 0.5,
                                      (cx - left) * size / side - 0.5))
      covered[y, x] = bool(values)
      if mode == "max":
        out[y, x] = np.max([np.zeros(classes)] + values, axis=0)
      elif values:
        out[y, x] = np.mean(values, axis=0)
  return out, covered


# 13 x 17 image: overlapping squares, squares past each border and every corner,
# one larger than the image on all sides, one outside it, and a gap nobody covers.
IMAGE_HW = (13, 17)
SQUARES = np.array([
    [2.3, 3.1, 6.4],  # inside
    [4.7, 5.9, 5.2],  # overlaps the first
    [-3.4, 6.2, 7.7],  # past the top
    [8.6, 1.3, 9.1],  # past the bottom
    [3.2, -4.1, 6.3],  # past the left
    [1.7, 12.8, 7.4],  # past the right
    [-2.2, -2.9, 5.5],  # past the top-left corner
    [9.9, 13.3, 4.9],  # past the bottom-right corner
    [-5.6, -3.3, 24.7],  # larger than the image
    [20.1, -8.0, 3.0],  # entirely below the image
])


@pytest.mark.parametrize("mode", ["max", "mean"])
def test_paste_matches_loop(mode):
  rng = np.random.default_rng(0)
  scores = rng.normal(0, 2, (len(SQUARES), 6, 6, 3)).astype(np.float32)  # about half negative
  got = aggregate.paste(scores, SQUARES, IMAGE_HW, mode)
  want, _ = paste_loop(scores, SQUARES, IMAGE_HW, mode)
  assert got.shape == (*IMAGE_HW, 3) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Without the large square some pixels are uncovered: exactly 0 in both modes.
  got = aggregate.paste(scores[:8], SQUARES[:8], IMAGE_HW, mode)
  want, covered = paste_loop(scores[:8], SQUARES[:8], IMAGE_HW, mode)
  assert 0 < covered.sum() < covered.size
  assert np.all(got[~covered] == 0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_paste_negative_scores_keep_the_zero_floor_under_max():
  rng = np.random.default_rng(1)
  scores = -rng.uniform(0.5, 3, (4, 5, 5, 2)).astype(np.float32)
  assert np.all(aggregate.paste(scores, SQUARES[:4], IMAGE_HW, "max") == 0)
  mean = aggregate.paste(scores, SQUARES[:4], IMAGE_HW, "mean")
  want, covered = paste_loop(scores, SQUARES[:4], IMAGE_HW, "mean")
  assert np.all(mean[covered] < 0) and np.all(mean[~covered] == 0)
  np.testing.assert_allclose(mean, want, rtol=1e-5, atol=1e-5)


def test_paste_with_nothing_to_paste_is_zero():
  empty = np.zeros((0, 4, 4, 3), np.float32)
  assert np.all(aggregate.paste(empty, np.zeros((0, 3)), (5, 6)) == 0)
  outside = np.ones((2, 4, 4, 3), np.float32)
  squares = [[-10, 0, 9.4], [0, 6.6, 3]]  # above, and right of, a 5 x 6 image
  for mode in ("max", "mean"):
    assert np.all(aggregate.paste(outside, squares, (5, 6), mode) == 0)
  with pytest.raises(ValueError, match="mode"):
    aggregate.paste(outside, squares, (5, 6), "sum")


@pytest.mark.parametrize("square", [(10.3, -7.9, 57.3), (-4.6, 20.2, 21.7)])
def test_paste_reproduces_a_linear_map_exactly(square):
  """Bilinear sampling reproduces a linear crop map as a linear function of image coordinates."""
  size, top, left, side = 32, *square
  i, j = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
  coef = np.array([[0.7, -1.3, 5.0], [-0.2, 0.4, -3.0]])  # per class: a * row + b * col + c
  crop = np.stack([a * i + b * j + c for a, b, c in coef], -1).astype(np.float32)
  got = aggregate.paste(crop[None], [square], (60, 70), "mean")
  y, x = np.meshgrid(np.arange(60) + 0.5, np.arange(70) + 0.5, indexing="ij")
  u, v = (y - top) * size / side - 0.5, (x - left) * size / side - 0.5
  inside = (u >= 0) & (u <= size - 1) & (v >= 0) & (v <= size - 1)  # not clamped
  assert inside.sum() > 100
  for k, (a, b, c) in enumerate(coef):
    np.testing.assert_allclose(got[..., k][inside], (a * u + b * v + c)[inside], atol=1e-4)


def test_paste_inverts_the_training_crop():
  """An image cropped like a training example (PIL EXTENT, bilinear) and pasted back is unchanged."""
  y, x = np.meshgrid(np.arange(40), np.arange(50), indexing="ij")
  image = (0.8 * y - 0.5 * x + 3).astype(np.float32)  # linear, so both resamplings are exact
  top, left, side, size = 6.4, 9.7, 27.3, 16
  crop = resample_square(image, top, left, side, size, Image.Resampling.BILINEAR, 0)  # [S, S]
  got = aggregate.paste(crop[None, ..., None], [(top, left, side)], image.shape, "mean")[..., 0]
  margin = side / size  # a crop pixel at each edge is clamped when sampled
  rows = slice(math.ceil(top + margin), math.floor(top + side - margin))
  cols = slice(math.ceil(left + margin), math.floor(left + side - margin))
  np.testing.assert_allclose(got[rows, cols], image[rows, cols], atol=1e-3)


def test_reliable_on_hand_made_maps():
  scores = np.zeros((5, 4, 4, 3), np.float32)  # 16 pixels per crop
  scores[0, ..., 0] = 5  # all background
  scores[1, ..., 0] = 5
  scores[1, 0, 0, 2] = 9  # 1 of 16 pixels foreground
  scores[2, ..., 1] = 5  # all foreground, confident
  scores[3, :, :2, 1] = 5  # half foreground, half a 3-way tie (background wins ties)
  # scores[4]: all logits 0 -> background by the tie, max probability 1/3
  np.testing.assert_array_equal(aggregate.reliable(scores), [False, True, True, True, False])
  np.testing.assert_array_equal(aggregate.reliable(scores, min_foreground=0.1),
                                [False, False, True, True, False])
  np.testing.assert_array_equal(aggregate.reliable(scores, min_foreground=0.5),
                                [False, False, True, True, False])
  np.testing.assert_array_equal(aggregate.reliable(scores, min_foreground=0.51),
                                [False, False, True, False, False])
  # Mean max-probability of crop 3: half the pixels at p(5 vs 0, 0), half at 1/3.
  p = math.exp(5) / (math.exp(5) + 2)
  confidence3 = (p + 1 / 3) / 2
  np.testing.assert_array_equal(aggregate.reliable(scores, min_confidence=confidence3 - 1e-4),
                                [False, True, True, True, False])
  np.testing.assert_array_equal(aggregate.reliable(scores, min_confidence=confidence3 + 1e-4),
                                [False, True, True, False, False])
  np.testing.assert_array_equal(aggregate.reliable(scores, 0, 0), [True] * 5)


def test_softmax_matches_float64():
  rng = np.random.default_rng(2)
  logits = rng.normal(0, 30, (6, 7, 21)) + np.array([1000, -1000, 0, 0, 0, 0])[:, None, None]
  got = aggregate.softmax(logits)
  want = np.exp(logits - logits.max(-1, keepdims=True))
  want /= want.sum(-1, keepdims=True)
  assert got.dtype == np.float32 and np.all(np.isfinite(got))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got.sum(-1), 1, rtol=1e-6)


def test_ensemble_multiplies_by_the_rectified_fcn_score():
  deconv = np.array([[[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]]])  # [1, 2, 3]
  fcn = np.array([[[1.5, 4.0, -2.0], [7.0, -0.1, -3.0]]])
  got = aggregate.ensemble(deconv, fcn)
  want = np.zeros_like(deconv)
  for y, x, k in np.ndindex(*deconv.shape):
    want[y, x, k] = deconv[y, x, k] * max(fcn[y, x, k], 0.0)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_array_equal(got, [[[3.0, -4.0, 0.0], [0.0, 0.0, 0.0]]])
