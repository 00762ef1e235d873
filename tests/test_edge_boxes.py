"""EdgeBoxes: edge map, groups, affinities, and box scores against a pure-Python scoreBox."""

import numpy as np
import pytest

from deconvnet_jax import edge_boxes as eb
from deconvnet_jax.boxes import box_iou, nms


def scene(height=72, width=96, seed=0) -> np.ndarray:
  """[H, W, 3] uint8: a bright rectangle, a darker disc, a long diagonal line, mild noise."""
  rng = np.random.default_rng(seed)
  image = np.full((height, width, 3), 60.0)
  y, x = np.mgrid[:height, :width]
  image[(y >= 12) & (y < 40) & (x >= 10) & (x < 36)] = (220, 200, 40)
  image[(y - 48) ** 2 + (x - 66) ** 2 <= 14 ** 2] = (30, 90, 200)
  image[np.abs(y - 0.6 * x - 5) < 1.2] = (250, 250, 250)
  return np.clip(image + rng.normal(0, 3, image.shape), 0, 255).astype(np.uint8)


def score_loop(scorer: eb.Scorer, strength: np.ndarray, box) -> float:
  """The paper's scoreBox, in plain Python: weights spread by relaxation from groups on the ring
  of pixels just outside the box (the paper: on its outermost pixels)."""
  g, label = scorer.groups, scorer.groups.label
  y0, x0, y1, x1 = (int(v) for v in box)
  inside = {k for k in range(len(g.magnitude)) if y0 <= scorer.gy[k] < y1 and x0 <= scorer.gx[k] < x1}
  height, width = label.shape
  # The ring of pixels just outside the box.
  ring = [(y, x) for y in (y0 - 1, y1) for x in range(x0 - 1, x1 + 1)] + [(y, x) for x in (x0 - 1, x1)
                                                                         for y in range(y0 - 1, y1 + 1)]
  ring = [(y, x) for y, x in ring if 0 <= y < height and 0 <= x < width]
  weight = {int(label[p]): 1.0 for p in ring if label[p] >= 0}
  crossing = set(weight)
  neighbours = {}
  for s, d, a in zip(scorer.src, scorer.dst, scorer.affinity):
    neighbours.setdefault(int(s), []).append((int(d), float(a)))
  changed = True
  while changed:
    changed = False
    for k, w in list(weight.items()):
      for q, a in neighbours.get(k, []):
        if w * a >= eb.WEIGHT_MIN and (q in inside or q in crossing) and w * a > weight.get(q, 0) + 1e-12:
          weight[q], changed = w * a, True
  kept = sum(g.magnitude[k] * (1 - weight.get(k, 0.0)) for k in inside)
  qh, qw = (y1 - y0) // 4, (x1 - x0) // 4
  centre = strength[y0 + qh:y1 - qh, x0 + qw:x1 - qw]
  centre = float(np.sum(centre[centre > eb.EDGE_MIN], dtype=np.float64))
  return (kept - centre) / (2.0 * ((y1 - y0) + (x1 - x0))) ** eb.KAPPA


def test_full_score_matches_pure_python_score_box():
  image = scene()
  scorer = eb.Scorer(image)
  strength, _ = eb.edge_map(image)
  assert len(scorer.groups.magnitude) > 10 and len(scorer.src) > 10
  rng = np.random.default_rng(1)
  y0, x0 = rng.integers(0, 42, 60), rng.integers(0, 66, 60)
  boxes = np.stack([y0, x0, y0 + rng.integers(8, 30, 60), x0 + rng.integers(8, 30, 60)], 1)  # inside 72 x 96
  boxes = np.concatenate([[[8, 6, 44, 40], [0, 0, 72, 96], [30, 48, 66, 86]], boxes])  # rectangle, all, disc
  got = scorer.full(boxes)
  want = np.array([score_loop(scorer, strength, b) for b in boxes])
  assert got.shape == (len(boxes),) and got.dtype == np.float64
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
  # The fast score leaves out only the border term, so it bounds the full one from above.
  assert np.all(scorer.fast(boxes) >= got - 1e-9)
  assert np.any(scorer.fast(boxes) > got + 1e-6)


def test_edge_map_is_thin_and_oriented_across_the_edge():
  image = np.zeros((40, 60, 3), np.uint8)
  image[:, 30:] = 200  # a vertical step between columns 29 and 30
  image[25:, :] = 200  # and a horizontal one above row 25 on the left
  strength, theta = eb.edge_map(image)
  assert strength.shape == theta.shape == (40, 60) and strength.dtype == np.float32
  assert np.all((strength >= 0) & (strength < 1)) and np.all((theta >= 0) & (theta < np.pi))
  for row in range(3, 20):  # away from the corner: one or two (tied) pixels on the step
    on = np.flatnonzero(strength[row] > eb.EDGE_MIN)
    assert 1 <= len(on) <= 2 and np.all(np.abs(on - 29.5) <= 1), (row, on)
    assert np.all(np.minimum(theta[row, on], np.pi - theta[row, on]) < 0.05)  # normal along x
  for col in range(3, 25):
    on = np.flatnonzero(strength[:, col] > eb.EDGE_MIN)
    assert 1 <= len(on) <= 2 and np.all(np.abs(on - 24.5) <= 1), (col, on)
    assert np.all(np.abs(theta[on, col] - np.pi / 2) < 0.05)  # normal along y


def test_groups_stay_in_one_cell_and_carry_their_pixels():
  image = scene()
  strength, theta = eb.edge_map(image)
  g = eb.edge_groups(strength, theta)
  count = len(g.magnitude)
  assert g.label.shape == strength.shape and g.label.min() == -1 and g.label.max() == count - 1
  assert np.all(g.magnitude >= eb.GROUP_MIN)
  for k in range(count):
    ys, xs = np.nonzero(g.label == k)
    assert len(np.unique(ys // eb.GROUP_CELL)) == 1 and len(np.unique(xs // eb.GROUP_CELL)) == 1
    m = strength[ys, xs].astype(np.float64)
    np.testing.assert_allclose(g.magnitude[k], m.sum(), rtol=1e-6)
    np.testing.assert_allclose([g.y[k], g.x[k]], [(m * ys).sum() / m.sum(), (m * xs).sum() / m.sum()], rtol=1e-6)
    assert tuple(g.bounds[k]) == (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)
  assert np.all(strength[g.label >= 0] > eb.EDGE_MIN)


def test_affinity_is_high_along_a_straight_edge_and_absent_across_a_corner():
  image = np.zeros((60, 90, 3), np.uint8)
  image[20:, 10:] = 255  # a long horizontal edge (row ~20) meeting a vertical one (column ~10)
  strength, theta = eb.edge_map(image)
  g = eb.edge_groups(strength, theta)
  src, dst, affinity = eb.affinities(g)
  assert len(src) == len(dst) == len(affinity) and np.all(affinity >= eb.WEIGHT_MIN)
  horizontal = np.abs(g.theta - np.pi / 2) < 0.1
  vertical = np.minimum(g.theta, np.pi - g.theta) < 0.1
  pairs = {(int(s), int(d)): float(a) for s, d, a in zip(src, dst, affinity)}
  along = [a for (s, d), a in pairs.items() if horizontal[s] and horizontal[d]]
  assert len(along) >= 4 and min(along) > 0.9
  assert not [a for (s, d), a in pairs.items() if horizontal[s] and vertical[d]]
  assert all(pairs[(d, s)] == a for (s, d), a in pairs.items())  # symmetric


def test_candidates_follow_the_paper_grid():
  boxes = eb.candidates(120, 160)
  assert boxes.dtype == np.int64 and len(np.unique(boxes, axis=0)) == len(boxes)
  y0, x0, y1, x1 = boxes.T
  assert np.all((y0 >= 0) & (x0 >= 0) & (y1 <= 120) & (x1 <= 160))
  h, w = y1 - y0, x1 - x0
  assert np.all(h * w >= eb.MIN_BOX_AREA * 0.95)
  assert np.all(np.maximum(h / w, w / h) <= eb.MAX_ASPECT_RATIO)
  # Every box of a random set has a candidate close to it: the grid is dense at IoU ~alpha.
  rng = np.random.default_rng(0)
  y, x = rng.integers(0, 60, 50), rng.integers(0, 80, 50)
  targets = np.stack([y, x, y + rng.integers(40, 60, 50), x + rng.integers(40, 80, 50)], 1)
  assert np.median(box_iou(targets, boxes).max(1)) >= eb.ALPHA
  assert eb.candidates(12, 9).tolist() == [[0, 0, 12, 9]]  # smaller than the smallest grid box


def test_edge_boxes_on_images_without_edges_or_tiny():
  for image in (np.full((50, 60, 3), 128, np.uint8), np.zeros((1, 1, 3), np.uint8),
                np.random.default_rng(0).integers(0, 255, (12, 9, 3)).astype(np.uint8)):
    boxes, scores = eb.edge_boxes(image)
    assert len(boxes) == len(scores) >= 1 and np.all(np.isfinite(scores))
    assert [0, 0, *image.shape[:2]] in boxes.tolist()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_edge_boxes_find_an_object_on_a_plain_background(seed):
  rng = np.random.default_rng(seed)
  image = np.full((90, 120, 3), 90, np.uint8)
  y0, x0 = rng.integers(5, 40), rng.integers(5, 60)
  h, w = rng.integers(30, 45), rng.integers(30, 55)
  image[y0:y0 + h, x0:x0 + w] = rng.integers(150, 255, 3)
  boxes, scores = eb.edge_boxes(image)
  assert boxes.dtype == np.int32 and scores.shape == (len(boxes),)
  top = boxes[nms(boxes, scores, 0.6, 3)]
  # Edges on a box's border rows count as crossing it, so the best boxes keep a margin.
  assert box_iou([[y0, x0, y0 + h, x0 + w]], top).max() >= 0.5


def test_boundary_edges_are_the_instance_boundaries_one_pixel_thick():
  instances = np.zeros((40, 50), np.uint8)
  instances[10:30, 5:20] = 1
  instances[10:30, 20:45] = 2  # touching 1: one boundary between them
  instances[0:4, :] = 255  # void is background
  strength, theta = eb.boundary_edges(instances)
  assert strength.dtype == np.float32 and theta.dtype == np.float32 and strength.shape == instances.shape
  expected = np.zeros(instances.shape, bool)
  label = np.where(instances == 255, 0, instances)
  for y in range(40):  # loop reference: differs from the pixel above or to the left
    for x in range(50):
      expected[y, x] = (y > 0 and label[y, x] != label[y - 1, x]) or (x > 0 and label[y, x] != label[y, x - 1])
  np.testing.assert_array_equal(strength > 0, expected)
  normal = np.minimum(theta, np.pi - theta)  # distance of the normal from horizontal
  assert np.all(normal[15:25, 20] < 0.1)  # the vertical boundaries: normal along x
  assert np.all(np.abs(theta[10, 10:16] - np.pi / 2) < 0.1)  # the horizontal ones (off corners): along y


def test_edge_boxes_on_ideal_edges_rank_separate_objects_first():
  """Given the ideal edge map, the scoring ranks boxes around separate objects above all others."""
  instances = np.zeros((120, 160), np.uint8)
  truth = np.array([[15, 10, 60, 55], [50, 90, 105, 150]])
  for i, (y0, x0, y1, x1) in enumerate(truth, 1):
    instances[y0:y1, x0:x1] = i
  image = np.zeros((120, 160, 3), np.uint8)  # no content: the edges come from `instances` alone
  boxes, scores = eb.edge_boxes(image, edges=eb.boundary_edges(instances))
  top = boxes[nms(boxes, scores, 0.6, 2)]
  assert np.all(box_iou(truth, top).max(1) >= 0.7)
