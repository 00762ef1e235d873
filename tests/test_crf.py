"""Dense CRF wrapper against a direct pydensecrf call, and its effect on a noisy labelling."""

import sys

import numpy as np
import pytest

from deconvnet_jax.crf import CRFParams, crf_labels, dense_crf, dense_crf_many

try:
  import pydensecrf.densecrf as dcrf
  from pydensecrf.utils import unary_from_softmax
except ImportError:
  dcrf = None
needs_pydensecrf = pytest.mark.skipif(dcrf is None, reason="pip install pydensecrf2")


def random_inputs(seed, h, w, c):
  """A random uint8 image [H, W, 3] and softmax probabilities [H, W, C] float64."""
  rng = np.random.default_rng(seed)
  image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
  logits = 2.0 * rng.normal(size=(h, w, c))
  prob = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  return image, prob


def reference_crf(image, prob, params):
  """The pydensecrf README recipe written out: [C, H, W] softmax in, [H, W, C] out."""
  h, w, c = prob.shape
  crf = dcrf.DenseCRF2D(w, h, c)
  crf.setUnaryEnergy(unary_from_softmax(np.ascontiguousarray(prob.transpose(2, 0, 1))))
  crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
  crf.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb,
                           rgbim=np.ascontiguousarray(image), compat=params.bilateral_compat)
  return np.array(crf.inference(params.iterations)).reshape(c, h, w).transpose(1, 2, 0)


def test_defaults_are_the_reference_codes():
  p = CRFParams()
  assert (p.gaussian_sxy, p.gaussian_compat) == (3, 3)
  assert (p.bilateral_sxy, p.bilateral_srgb, p.bilateral_compat) == (20, 3, 5)
  assert p.iterations == 10


@needs_pydensecrf
@pytest.mark.parametrize("params", [CRFParams(), CRFParams(bilateral_srgb=13, iterations=5)])
def test_matches_direct_pydensecrf_call_on_non_square_views(params):
  big, _ = random_inputs(0, 40, 60, 1)
  image = big[::-1, 7:48][5:28]  # [23, 41, 3] flipped and cropped: not C-contiguous
  assert not image.flags.c_contiguous and image.shape == (23, 41, 3)
  _, prob = random_inputs(1, 23, 41, 5)
  prob_view = np.ascontiguousarray(prob.transpose(2, 0, 1)).transpose(1, 2, 0)  # [H, W, C] strided
  got = dense_crf(image, prob_view, params)
  want = reference_crf(image, prob, params)
  assert got.shape == (23, 41, 5) and got.dtype == np.float32
  np.testing.assert_array_equal(got, want)
  np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
  assert not np.allclose(got, prob, atol=1e-2)  # the pairwise terms did something
  np.testing.assert_array_equal(crf_labels(image, prob, params), want.argmax(-1))


@needs_pydensecrf
def test_fixes_salt_and_pepper_labelling():
  h, w = 40, 64
  truth = np.zeros((h, w), np.int64)
  truth[:, w // 2:] = 1  # [H, W] two regions
  image = np.where(truth[..., None] == 0, [200, 40, 40], [40, 60, 200]).astype(np.uint8)
  rng = np.random.default_rng(0)
  noisy = np.where(rng.random((h, w)) < 0.25, 1 - truth, truth)
  prob = np.where(np.arange(2) == noisy[..., None], 0.7, 0.3)  # [H, W, 2], confident in the noise
  before = np.mean(prob.argmax(-1) == truth)
  after = np.mean(crf_labels(image, prob) == truth)
  assert 0.7 < before < 0.8
  assert after > 0.99, (before, after)


@needs_pydensecrf
def test_many_in_parallel_equals_serial_in_order():
  inputs = [random_inputs(seed, 17 + 3 * seed, 29 - 2 * seed, 4) for seed in range(3)]
  images, probs = [i for i, _ in inputs], [p for _, p in inputs]
  serial = [dense_crf(i, p) for i, p in inputs]
  for processes in (1, 2):
    got = dense_crf_many(images, probs, processes=processes)
    assert len(got) == 3
    for g, s in zip(got, serial):
      np.testing.assert_array_equal(g, s)
  assert dense_crf_many([], []) == []


def test_clear_errors_for_bad_inputs():
  image, prob = random_inputs(0, 10, 12, 3)
  with pytest.raises(ValueError, match=r"image is 10x12 .* prob is 12x10"):
    dense_crf(image, prob.transpose(1, 0, 2))
  with pytest.raises(ValueError, match="uint8"):
    dense_crf(image.astype(np.float32), prob)
  with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
    dense_crf(image[..., :1], prob)
  with pytest.raises(ValueError, match=r"\[H, W, C\] float"):
    dense_crf(image, prob.argmax(-1))
  with pytest.raises(ValueError, match="2 images but 1 probability maps"):
    dense_crf_many([image, image], [prob])


def test_missing_pydensecrf_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "pydensecrf", None)
  monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
  image, prob = random_inputs(0, 4, 5, 2)
  with pytest.raises(ImportError, match="pip install pydensecrf2"):
    dense_crf(image, prob)


@needs_pydensecrf
def test_read_only_inputs_as_decoded_by_pil_work():
  image, prob = random_inputs(5, 9, 14, 3)
  want = dense_crf(image, prob)
  image.flags.writeable = False
  prob.flags.writeable = False
  np.testing.assert_array_equal(dense_crf(image, prob), want)
