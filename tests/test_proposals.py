"""Proposals: IoU and NMS against loops, windows, objectness, EdgeBoxes, propose, recall."""

import sys

import numpy as np
import pytest

import proposal_recall
from deconvnet_jax import boxes as geometry
from deconvnet_jax import proposals
from deconvnet_jax.data.generated import generate
from deconvnet_jax.data.voc import read_example, read_split


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
  return generate(tmp_path_factory.mktemp("gen"), 10, 5, seed=0)


def iou_loop(a, b) -> float:
  """IoU of two (y0, x0, y1, x1) boxes, Python floats, inverted boxes empty."""
  area = lambda r: max(r[2] - r[0], 0) * max(r[3] - r[1], 0)
  inter = max(min(a[2], b[2]) - max(a[0], b[0]), 0) * max(min(a[3], b[3]) - max(a[1], b[1]), 0)
  union = area(a) + area(b) - inter
  return inter / union if union > 0 else 0.0


def nms_loop(boxes, scores, threshold, top_k=None) -> list[int]:
  """Textbook greedy NMS: repeatedly take the best remaining box (lowest index on ties)."""
  remaining = list(range(len(boxes)))
  keep = []
  while remaining and (top_k is None or len(keep) < top_k):
    best = max(remaining, key=lambda i: (scores[i], -i))
    keep.append(best)
    remaining = [i for i in remaining if i != best and iou_loop(boxes[best], boxes[i]) <= threshold]
  return keep


def random_boxes(rng, n, size=20):
  y0, x0 = rng.integers(0, size, (2, n))
  h, w = rng.integers(-2, size // 2, (2, n))  # some empty or inverted
  return np.stack([y0, x0, y0 + h, x0 + w], 1)


def test_box_iou_matches_loop_on_special_and_random_boxes():
  special = np.array([
      [0, 0, 10, 10],  # reference
      [0, 0, 10, 10],  # identical
      [2, 3, 5, 7],  # nested
      [0, 10, 10, 20],  # touching on an edge
      [10, 10, 12, 12],  # touching at a corner
      [30, 30, 40, 40],  # disjoint
      [5, 5, 5, 9],  # empty: zero height
      [5, 5, 5, 5],  # empty point
      [8, 8, 3, 3],  # inverted
      [-5, -5, 5, 5],  # partly outside the image
  ], np.float64)
  rng = np.random.default_rng(0)
  boxes = np.concatenate([special, random_boxes(rng, 60), rng.uniform(0, 20, (20, 4))])
  got = geometry.box_iou(boxes, boxes[::-1])
  want = np.array([[iou_loop(a, b) for b in boxes[::-1]] for a in boxes])
  assert got.shape == (len(boxes), len(boxes)) and got.dtype == np.float64
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
  assert got[0, -1] == 1.0 and got[6, -7] == 0.0  # identical; an empty box with itself
  np.testing.assert_array_equal(geometry.box_area(special[[0, 2, 6, 8]]), [100, 12, 0, 0])
  assert geometry.box_iou(np.zeros((0, 4)), boxes).shape == (0, len(boxes))


@pytest.mark.parametrize("threshold, top_k", [(0.3, None), (0.5, 5), (0.7, None), (0.0, None)])
def test_nms_matches_loop(threshold, top_k):
  rng = np.random.default_rng(1)
  for _ in range(5):
    boxes = random_boxes(rng, 80, size=30).astype(np.float64)
    scores = rng.integers(0, 10, 80).astype(np.float32)  # many ties
    got = geometry.nms(boxes, scores, threshold, top_k)
    assert got.dtype == np.int64
    assert got.tolist() == nms_loop(boxes, scores, threshold, top_k)
  assert geometry.nms(np.zeros((0, 4)), np.zeros(0), 0.5).shape == (0,)


def test_sliding_windows_inside_image_distinct_and_at_least_min_size():
  for height, width, min_size in [(96, 176, 0), (120, 80, 37.5), (375, 500, 112), (20, 30, 50)]:
    windows = proposals.sliding_windows(height, width, min_size=min_size)
    assert windows.dtype == np.int32 and windows.ndim == 2 and windows.shape[1] == 4
    y0, x0, y1, x1 = windows.T
    assert np.all((y0 >= 0) & (x0 >= 0) & (y1 <= height) & (x1 <= width))
    assert np.all(y1 - y0 >= min(min_size, height)) and np.all(x1 - x0 >= min(min_size, width))
    assert len(np.unique(windows, axis=0)) == len(windows)
    # The whole image and every corner are covered.
    assert [0, 0, height, width] in windows.tolist()
    assert y0.min() == 0 and x0.min() == 0 and y1.max() == height and x1.max() == width
  assert proposals.sliding_windows(20, 30, min_size=50).tolist() == [[0, 0, 20, 30]]
  assert 0 < proposals.default_min_size(96, 150) < proposals.default_min_size(200, 150) < 112
  assert proposals.default_min_size(375, 500) == 112


def test_objectness_ranks_objects_above_random_windows(generated):
  rng = np.random.default_rng(0)
  wins = []
  for image_id in read_split(generated, "trainval"):
    ex = read_example(generated, image_id)
    windows = proposals.sliding_windows(*ex.image.shape[:2])
    random = windows[rng.choice(len(windows), 100, replace=False)]
    objects = proposals.objectness(ex.image, ex.boxes)
    others = proposals.objectness(ex.image, random)
    assert objects.shape == (len(ex.boxes),) and others.shape == (100,)
    wins.append(np.mean(objects[:, None] > others[None, :]))  # AUC over (object, random) pairs
  assert np.mean(wins) > 0.9, wins
  assert min(wins) > 0.7, wins


def test_objectness_of_empty_and_outside_boxes_is_zero():
  image = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
  scores = proposals.objectness(image, [[5, 5, 5, 20], [10, 10, 2, 2], [60, 60, 70, 70], [-10, -10, 0, 0]])
  np.testing.assert_array_equal(scores, 0)
  assert np.all(proposals.objectness(np.full((40, 50, 3), 7, np.uint8), [[5, 5, 20, 20]]) == 0)


def test_propose_returns_top_k_sorted_inside_image_and_suppressed(generated):
  ex = read_example(generated, read_split(generated, "val")[0])
  height, width = ex.image.shape[:2]
  for min_size in (None, 0):
    boxes, scores = proposals.propose(ex.image, top_k=20, min_size=min_size, iou_threshold=0.7)
    assert boxes.shape == (20, 4) and boxes.dtype == np.int32 and scores.shape == (20,)
    assert np.all(np.diff(scores) <= 0)
    np.testing.assert_allclose(scores, proposals.objectness(ex.image, boxes))
    assert np.all((boxes[:, :2] >= 0) & (boxes[:, 2:] <= [height, width]))
    smallest = proposals.default_min_size(height, width) if min_size is None else 1
    assert np.all(boxes[:, 2:] - boxes[:, :2] >= smallest)
    iou = geometry.box_iou(boxes, boxes)
    assert np.all(iou[np.triu_indices(20, 1)] <= 0.7)
  # A small image with a large minimum size has fewer windows than asked for.
  boxes, scores = proposals.propose(ex.image[:12, :12], top_k=50, min_size=10, iou_threshold=1.0)
  assert len(boxes) == len(scores) == len(proposals.sliding_windows(12, 12, min_size=10)) < 50
  with pytest.raises(ValueError, match="unknown proposal generator"):
    proposals.propose(ex.image, generator="edgeboxes")


def test_propose_finds_most_objects_and_beats_random_order(generated):
  ids = read_split(generated, "trainval")
  examples = [read_example(generated, i) for i in ids]
  found = [proposals.propose(ex.image, top_k=10, min_size=0)[0] for ex in examples]
  rng = np.random.default_rng(0)
  random = []
  for ex in examples:
    windows = proposals.sliding_windows(*ex.image.shape[:2])
    random.append(windows[rng.permutation(len(windows))[:10]])
  gt = [ex.boxes for ex in examples]
  assert proposals.recall(found, gt) > 0.6
  assert proposals.recall(found, gt) > proposals.recall(random, gt) + 0.3


def test_recall_on_a_hand_made_case():
  gt = [np.array([[0, 0, 10, 10], [20, 20, 30, 30]]), np.array([[0, 0, 4, 4]]), np.zeros((0, 4))]
  found = [
      np.array([[0, 0, 10, 20], [0, 0, 10, 10]]),  # first exact; second box missed
      np.array([[0, 0, 4, 8]]),  # IoU exactly 0.5 counts
      np.array([[0, 0, 5, 5]]),  # no objects here
  ]
  assert proposals.recall(found, gt) == pytest.approx(2 / 3)
  assert proposals.recall(found, gt, iou=0.51) == pytest.approx(1 / 3)
  assert proposals.recall([np.zeros((0, 4))] * 3, gt) == 0
  assert np.isnan(proposals.recall([np.zeros((0, 4))], [np.zeros((0, 4))]))


def test_selective_search_is_optional_with_a_clear_error(monkeypatch):
  image = np.zeros((32, 32, 3), np.uint8)
  monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 now fails
  with pytest.raises(ImportError, match="pip install opencv-contrib-python-headless"):
    proposals.selective_search(image)


def test_selective_search_boxes_inside_image(generated):
  pytest.importorskip("cv2.ximgproc")
  ex = read_example(generated, read_split(generated, "val")[0])
  boxes = proposals.selective_search(ex.image)
  height, width = ex.image.shape[:2]
  assert len(boxes) and np.all((boxes[:, :2] >= 0) & (boxes[:, 2:] <= [height, width]))
  np.testing.assert_array_equal(boxes, proposals.selective_search(ex.image))  # deterministic
  found, _ = proposals.propose(ex.image, top_k=5, min_size=0, generator="selective_search")
  assert len(found) == 5


def test_recall_tool_prints_recall_table(generated, capsys):
  argv = ["--data", str(generated), "--split", "val", "--top-k", "5", "--limit", "4"]
  assert proposal_recall.main(argv + ["--generator", "windows", "random_windows", "oracle_edges"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[1] == "| generator | IoU | @1 | @2 | @5 | s/image |"
  rows = [line.split(" | ") for line in lines[3:9]]
  assert [(r[0], r[1]) for r in rows] == [(f"| {g}", iou) for g in ("windows", "random_windows", "oracle_edges")
                                          for iou in ("0.5", "0.7")]
  for r in rows:  # recall grows with K; IoU 0.7 finds no more than 0.5
    recalls = [float(v) for v in r[2:5]]
    assert recalls == sorted(recalls) and all(0 <= v <= 1 for v in recalls)
  assert all(float(a) >= float(b) for a, b in zip(rows[0][2:5], rows[1][2:5]))
  # Chance finds little; EdgeBoxes on the ground truth's own boundaries finds most objects in 5.
  assert float(rows[2][4]) < float(rows[0][4]) <= float(rows[4][4]) and float(rows[4][4]) >= 0.6
  assert lines[-1].endswith("objects")


@pytest.mark.parametrize("generator", ["windows", "edge_boxes", "selective_search"])
def test_every_generator_gives_valid_ranked_boxes(generated, generator):
  if generator == "selective_search":
    pytest.importorskip("cv2.ximgproc")
  ex = read_example(generated, read_split(generated, "val")[1])
  height, width = ex.image.shape[:2]
  for min_size in (None, 0, 40):
    boxes, scores = proposals.propose(ex.image, top_k=30, min_size=min_size, generator=generator)
    assert 0 < len(boxes) <= 30 and boxes.dtype == np.int32 and scores.shape == (len(boxes),)
    assert np.all(np.diff(scores) <= 0)
    assert np.all((boxes[:, :2] >= 0) & (boxes[:, 2:] <= [height, width]))
    smallest = proposals.default_min_size(height, width) if min_size is None else max(min_size, 1)
    assert np.all(boxes[:, 2:] - boxes[:, :2] >= min(smallest, height, width))
    iou = geometry.box_iou(boxes, boxes)
    assert np.all(iou[np.triu_indices(len(boxes), 1)] <= proposals.NMS_THRESHOLD[generator])


def test_edge_boxes_find_the_generated_objects(generated):
  examples = [read_example(generated, i) for i in read_split(generated, "trainval")]
  found = [proposals.propose(ex.image, top_k=10, min_size=0, generator="edge_boxes")[0] for ex in examples]
  assert proposals.recall(found, [ex.boxes for ex in examples]) > 0.6


def blob_probabilities(height=60, width=80):
  """[H, W, 6] probabilities: a confident class-3 rectangle, a weaker class-5 disc, background elsewhere."""
  prob = np.zeros((height, width, 6))
  prob[..., 0] = 1.0
  y, x = np.mgrid[:height, :width]
  rect = (y >= 10) & (y < 30) & (x >= 5) & (x < 25)
  disc = (y - 40) ** 2 + (x - 60) ** 2 <= 10 ** 2
  prob[rect] = [0.05, 0, 0, 0.95, 0, 0]
  prob[disc] = [0.4, 0, 0, 0, 0, 0.6]
  return prob, (10, 5, 30, 25), (30, 50, 51, 71)


def test_network_boxes_recover_the_segmented_regions():
  prob, rect, disc = blob_probabilities()
  boxes, scores = proposals.network_boxes(prob)
  assert np.all(np.diff(scores) <= 0)  # best first
  assert np.all((boxes[:, :2] >= 0) & (boxes[:, 2:] <= [60, 80]) & (boxes[:, 2:] > boxes[:, :2]))
  np.testing.assert_allclose(boxes[0], rect)  # the confident region's tight box ranks first
  assert np.isclose(scores[0], 0.95)
  ious = geometry.box_iou([rect, disc], boxes)
  assert ious.max(1).tolist() == [1.0, 1.0]  # both regions' tight boxes are there
  # Context versions: centred on the region, 1.25x its sides (clipped at the border).
  np.testing.assert_allclose(boxes[1], (7.5, 2.5, 32.5, 27.5))
  assert proposals.network_boxes(np.stack([np.ones((8, 8)), np.zeros((8, 8))], -1))[0].shape == (0, 4)


def test_mix_puts_network_boxes_first_and_drops_content_boxes_they_cover():
  network = (np.asarray([[0, 0, 10, 10], [20, 20, 40, 40]], float), np.asarray([0.9, 0.8]))
  content = (np.asarray([[0, 0, 10, 11], [50, 50, 60, 60], [5, 5, 30, 30]], float), np.asarray([5.0, 4.0, 3.0]))
  boxes, scores = proposals.mix(network, content, top_k=4)
  np.testing.assert_array_equal(boxes, [[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60], [5, 5, 30, 30]])
  np.testing.assert_array_equal(scores, [0.9, 0.8, 4.0, 3.0])
  assert len(proposals.mix(network, content, top_k=1)[0]) == 1


def test_segmenter_network_proposals_follow_its_whole_image_forward(monkeypatch):
  from deconvnet_jax.configs import model_config
  from deconvnet_jax.data.examples import context_square
  from deconvnet_jax.inference import InferenceConfig, Segmenter
  from deconvnet_jax.models import build_model

  prob, rect, _ = blob_probabilities()
  image = np.zeros((60, 80, 3), np.uint8)
  for mode, count in (("network", 6), ("mix", 8)):  # 2 regions x 3 scales; mix fills up with windows
    segmenter = Segmenter(build_model(model_config("small", num_classes=6)),
                          InferenceConfig(proposals=mode, top_k=8, input_size=64, crf=False))
    monkeypatch.setattr(segmenter.net, "whole_image", lambda _: np.log(prob + 1e-9))
    _, squares = segmenter.proposal_maps(image, Segmenter.new_seconds())
    assert len(squares) == count
    np.testing.assert_allclose(squares[0], context_square(rect, 1.2))
    # The caller's whole-image logits (evaluate.py has them) give the same proposals, with no forward.
    monkeypatch.setattr(segmenter.net, "whole_image", lambda _: pytest.fail("forward run twice"))
    _, given = segmenter.proposal_maps(image, Segmenter.new_seconds(), logits=np.log(prob + 1e-9))
    np.testing.assert_array_equal(given, squares)
  # A forward that segments nothing gives no network proposals: an all-background map, no error.
  monkeypatch.setattr(segmenter.net, "whole_image", lambda _: np.log(blob_probabilities()[0] * 0 + 1e-9) * [
      -1, 1, 1, 1, 1, 1])
  segmenter.config = InferenceConfig(proposals="network", top_k=8, input_size=64, crf=False)
  maps, squares = segmenter.proposal_maps(image, Segmenter.new_seconds())
  assert maps.shape == (0, 64, 64, 6) and squares.shape == (0, 3)
  assert np.all(segmenter.segment(image).label == 0)
