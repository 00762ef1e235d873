"""Instance-wise inference: fixed-shape batches, the FCN ensemble, CRF on and off."""

import numpy as np

from deconvnet_jax import aggregate
from deconvnet_jax.configs import model_config
from deconvnet_jax.crf import dense_crf
from deconvnet_jax.data.generated import make_example
from deconvnet_jax.inference import InferenceConfig, Segmenter
from deconvnet_jax.models import build_model


def test_one_compilation_for_any_image_size_and_proposal_count():
  rng = np.random.default_rng(0)
  segmenter = Segmenter(build_model(model_config("small")),  # windows: no whole-image forward
                        InferenceConfig(proposals="windows", top_k=7, input_size=64, batch_size=4, crf=False))
  for size in ((70, 70), (120, 120), (64, 96)):
    image = make_example(rng, *size)[0]
    result = segmenter.segment(image)
    assert result.label.shape == image.shape[:2] and result.prob.shape == (*image.shape[:2], 21)
    np.testing.assert_allclose(result.prob.sum(-1), 1.0, atol=1e-5)
    assert set(result.seconds) == {"proposals", "network", "aggregation", "crf"}
  assert segmenter.net.compiled == [(4, 64, 64, 3)]  # 7 proposals = 2 padded batches of 4


def test_ensemble_and_crf_follow_their_rules():
  rng = np.random.default_rng(1)
  image = make_example(rng, 80, 80)[0]
  deconv, fcn = build_model(model_config("small"), seed=0), build_model(model_config("fcn8s-small"), seed=1)
  cfg = InferenceConfig(top_k=5, input_size=64, batch_size=5, crf=False)
  alone = Segmenter(deconv, cfg)
  both = Segmenter(deconv, cfg, fcn)
  scores, _ = alone.scores(image)
  fcn_scores = both.fcn.whole_image(image)
  ensembled, _ = both.scores(image)
  np.testing.assert_allclose(ensembled, scores * np.maximum(fcn_scores, 0), rtol=1e-5, atol=1e-6)
  with_crf = Segmenter(deconv, InferenceConfig(top_k=5, input_size=64, batch_size=5, crf=True), fcn)
  result = with_crf.segment(image)
  np.testing.assert_allclose(result.prob, dense_crf(image, aggregate.softmax(ensembled)), rtol=1e-5)
  assert result.seconds["crf"] > 0


def test_whole_image_mode_buckets_sizes():
  segmenter = Segmenter(build_model(model_config("small")), InferenceConfig(mode="whole", crf=False))
  for h, w in ((40, 50), (60, 64), (65, 64)):
    assert segmenter.segment(np.zeros((h, w, 3), np.uint8)).label.shape == (h, w)
  assert segmenter.net.compiled == [(1, 64, 64, 3), (1, 96, 64, 3)]
