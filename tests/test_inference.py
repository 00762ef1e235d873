"""Instance-wise inference: fixed-shape batches, the FCN ensemble, CRF on and off."""

import jax
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
  # Fewer proposals than a batch: batches of top_k, not padded up to batch_size.
  few = Segmenter(build_model(model_config("small")), InferenceConfig(proposals="windows", top_k=3, input_size=64,
                                                                       crf=False))
  few.segment(make_example(rng, 70, 70)[0])
  assert few.net.compiled == [(3, 64, 64, 3)]


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


def test_flip_averaging_is_mirror_equivariant_and_invariant_on_symmetric_inputs():
  from deconvnet_jax.models import get_variables, set_variables
  model = build_model(model_config("small", num_classes=5), seed=1)
  rng = np.random.default_rng(0)
  variables = get_variables(model)  # random weights everywhere (the score layers start at zero)
  variables["params"] = jax.tree.map(lambda p: (rng.normal(size=p.shape) * np.sqrt(2 / np.prod(p.shape[:-1]))
                                                ).astype(np.float32) if p.ndim > 1 else p, variables["params"])
  set_variables(model, variables)
  model.eval()
  image = rng.integers(0, 256, (70, 90, 3)).astype(np.uint8)  # padded to 96 x 96: padding is not symmetric
  seg = Segmenter(model, InferenceConfig(mode="whole", flip=True, crf=False))
  scores = seg.scores(image)[0]
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())
  close(seg.scores(image[:, ::-1])[0], scores[:, ::-1])
  symmetric = np.concatenate([image[:, :45], image[:, :45][:, ::-1]], axis=1)
  out = seg.scores(symmetric)[0]
  close(out, out[:, ::-1])
  seg.config = InferenceConfig(mode="whole", crf=False)  # the same compiled network, no flip
  plain = seg.scores(symmetric)[0]
  assert np.abs(plain - plain[:, ::-1]).max() > 0.05 * np.abs(plain).max()  # without the flip it is not
  # Instance-wise: each crop is flipped, so one centred box on a symmetric image gives symmetric scores.
  seg.config = InferenceConfig(flip=True, crf=False, input_size=64, batch_size=2)
  out = seg.scores(symmetric, boxes=np.array([[10.0, 15.0, 60.0, 75.0]]))[0]
  close(out, out[:, ::-1])


def test_tiles_cover_the_image_and_a_pointwise_network_is_tiled_exactly():
  from deconvnet_jax.inference import average_views, tile_starts, tiled
  for n, tile in [(100, 100), (101, 100), (300, 96), (1000, 512)]:
    starts = tile_starts(n, tile)
    assert starts[0] == 0 and starts[-1] + min(tile, n) == n
    assert all(b - a <= tile * 2 / 3 + 1 for a, b in zip(starts, starts[1:]))  # a third overlaps
  pointwise = lambda im: np.asarray(im, np.float32)[..., :2] * np.float32([0.5, -2.0])
  image = np.random.default_rng(1).integers(0, 256, (250, 130, 3)).astype(np.uint8)
  np.testing.assert_allclose(tiled(pointwise, image, 96), pointwise(image), rtol=1e-6)
  # Scales: a pointwise network on a flat image gives the same at every scale.
  flat = np.full((1, 40, 60, 3), 7, np.uint8)
  out = average_views(lambda x: pointwise(x), flat, flip=True, scales=(0.5, 1.0, 1.5))
  np.testing.assert_allclose(out, pointwise(flat), rtol=1e-6)
