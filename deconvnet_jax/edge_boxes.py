"""EdgeBoxes (Zitnick and Dollar, ECCV 2014) on an edge map computed from the image alone.

edge_map -> edge groups -> affinities between neighbouring groups -> candidate
boxes on the paper's grid -> score: the edge magnitude of groups inside the box,
less the part connected (by a chain of affine groups) to groups that cross its
border, less the edges of its central quarter, over its perimeter^kappa -> the
paper's local refinement of the best. Host-side NumPy and SciPy; no trained
model: the edge map is a thinned colour gradient, not the paper's structured
forest, which is why kappa and the border differ a little from the paper's.

Boxes are [N, 4] (y0, x0, y1, x1) with exclusive ends, as everywhere here.
"""

from typing import NamedTuple

import numpy as np
import scipy.ndimage
import scipy.sparse
import scipy.sparse.csgraph

from deconvnet_jax.boxes import box_sums, integral_image, nms

# The paper's settings: alpha (IoU of neighbouring candidates), gamma, the smallest box
# area and the largest aspect ratio, edges under EDGE_MIN ignored, groups whose magnitude
# sums to under GROUP_MIN dropped; weights under WEIGHT_MIN not followed. Its kappa (1.5)
# favoured large boxes on our denser gradient edges; 1.75 measured best on real photos.
ALPHA = 0.65
KAPPA = 1.75
GAMMA = 2.0
MIN_BOX_AREA = 1000
MAX_ASPECT_RATIO = 3.0
EDGE_MIN = 0.1
GROUP_MIN = 0.5
WEIGHT_MIN = 0.05
# Ours: the gradient's blur (px) and the magnitude that maps to edge strength 1 - 1/e;
# groups are chains of 8-connected edge pixels whose orientations differ by under
# GROUP_TURN, cut at a grid of GROUP_CELL px so that they stay short.
EDGE_SIGMA = 1.5
EDGE_SCALE = 0.04
GROUP_TURN = np.pi / 8
GROUP_CELL = 12
# Candidates scored in full; the rest are ranked by the fast score alone.
FULL_SCORES = 2000
# Boxes refined by the paper's local search: the best REFINED after NMS at REFINE_NMS.
REFINED = 50
REFINE_NMS = 0.6


def edge_map(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(strength [H, W] float32 in [0, 1), thinned to one pixel; orientation [H, W] in [0, pi)).

  The colour gradient of the blurred image in an opponent colour space (Di
  Zenzo's structure tensor over the channels), thinned by non-maximum
  suppression across the edge. Orientation is the gradient's direction, i.e.
  the edge's normal.
  """
  rgb = np.asarray(image, np.float32) / 255.0  # [H, W, 3]
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  channels = ((r + g + b) / 3, (r - g) / 2, (r + g) / 4 - b / 2)
  jxx = jyy = jxy = 0.0
  for c in channels:
    c = scipy.ndimage.gaussian_filter(c, EDGE_SIGMA, mode="nearest")
    gx = scipy.ndimage.sobel(c, axis=1, mode="nearest") / 8
    gy = scipy.ndimage.sobel(c, axis=0, mode="nearest") / 8
    jxx, jyy, jxy = jxx + gx * gx, jyy + gy * gy, jxy + gx * gy
  magnitude = np.sqrt(0.5 * (jxx + jyy + np.sqrt((jxx - jyy)**2 + 4 * jxy**2)))
  theta = np.mod(0.5 * np.arctan2(2 * jxy, jxx - jyy), np.pi).astype(np.float32)
  strength = 1 - np.exp(-magnitude / EDGE_SCALE)
  return (strength * _ridge(strength, theta)).astype(np.float32), theta


def boundary_edges(instances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The edge map of an [H, W] instance map, as `edge_map` returns it: its boundaries alone.

  The ideal edge map (void counts as background): strength 1 on each pixel
  whose label differs from the one above or to its left, so boundaries are one
  pixel thick; orientation from the blurred map's gradient. proposal_recall.py
  scores EdgeBoxes on it to measure the ceiling of any edge map.
  """
  label = np.where(instances == 255, 0, instances).astype(np.float64)  # [H, W]
  on = np.zeros(label.shape, bool)
  on[:, 1:] |= label[:, 1:] != label[:, :-1]
  on[1:] |= label[1:] != label[:-1]
  smooth = scipy.ndimage.gaussian_filter(on.astype(np.float64), EDGE_SIGMA)
  # The normal is across the boundary band: the major axis of the band's local structure tensor
  # (the label values' own gradient would turn at junctions with their arbitrary numbers).
  gx, gy = scipy.ndimage.sobel(smooth, axis=1), scipy.ndimage.sobel(smooth, axis=0)
  jxx, jyy, jxy = (scipy.ndimage.gaussian_filter(v, EDGE_SIGMA) for v in (gx * gx, gy * gy, gx * gy))
  theta = np.mod(0.5 * np.arctan2(2 * jxy, jxx - jyy), np.pi).astype(np.float32)
  return on.astype(np.float32), theta


def _ridge(m: np.ndarray, theta: np.ndarray) -> np.ndarray:
  """[H, W] bool: m is a maximum along the direction theta (ties kept), by linear interpolation."""
  h, w = m.shape
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  dy, dx = np.sin(theta), np.cos(theta)
  ahead = scipy.ndimage.map_coordinates(m, [yy + dy, xx + dx], order=1, mode="nearest")
  behind = scipy.ndimage.map_coordinates(m, [yy - dy, xx - dx], order=1, mode="nearest")
  return (m >= ahead) & (m >= behind)


def _shifted(x: np.ndarray, dy: int, dx: int) -> tuple[np.ndarray, np.ndarray]:
  """Views (a, b) of [H, W] x with b[i, j] the pixel (dy, dx) away from a[i, j]; dy >= 0."""
  h, w = x.shape
  return (x[0:h - dy, max(-dx, 0):w - max(dx, 0)], x[dy:h, max(dx, 0):w - max(-dx, 0)])


class Groups(NamedTuple):
  """Edge groups: `label` [H, W] int32 (-1: no group) and per group [G] arrays."""
  label: np.ndarray
  magnitude: np.ndarray  # summed edge strength
  y: np.ndarray  # strength-weighted mean position
  x: np.ndarray
  theta: np.ndarray  # mean orientation, in [0, pi)
  bounds: np.ndarray  # [G, 4] tight box (y0, x0, y1, x1), exclusive ends


def edge_groups(strength: np.ndarray, theta: np.ndarray) -> Groups:
  """Groups edge pixels: 8-connected neighbours join when their orientations differ by < GROUP_TURN.

  Groups are cut at a grid of GROUP_CELL px and those with a magnitude sum under
  GROUP_MIN are dropped, as the paper drops weak groups.
  """
  h, w = strength.shape
  on = strength > EDGE_MIN
  on[0], on[-1], on[:, 0], on[:, -1] = False, False, False, False
  node = np.full((h, w), -1, np.int64)
  ys, xs = np.nonzero(on)
  node[ys, xs] = np.arange(len(ys))
  cell_id = (np.arange(h)[:, None] // GROUP_CELL) * (w // GROUP_CELL + 1) + np.arange(w)[None, :] // GROUP_CELL
  src, dst = [], []
  for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
    (on_a, on_b), (t_a, t_b), (c_a, c_b), (n_a, n_b) = (_shifted(v, dy, dx) for v in (on, theta, cell_id, node))
    diff = np.abs(t_a - t_b)
    join = on_a & on_b & (np.minimum(diff, np.pi - diff) < GROUP_TURN) & (c_a == c_b)
    src.append(n_a[join])
    dst.append(n_b[join])
  src, dst = np.concatenate(src), np.concatenate(dst)
  graph = scipy.sparse.coo_matrix((np.ones(len(src), np.int8), (src, dst)), shape=(len(ys), len(ys)))
  _, component = scipy.sparse.csgraph.connected_components(graph, directed=False)
  m = strength[ys, xs].astype(np.float64)
  total = np.bincount(component, m)
  keep = total[component] >= GROUP_MIN
  ys, xs, m, component = ys[keep], xs[keep], m[keep], component[keep]
  _, component = np.unique(component, return_inverse=True)
  count = component.max(initial=-1) + 1
  magnitude = np.bincount(component, m, count)
  angle = 2 * theta[ys, xs].astype(np.float64)
  mean_theta = np.mod(0.5 * np.arctan2(np.bincount(component, m * np.sin(angle), count),
                                       np.bincount(component, m * np.cos(angle), count)), np.pi)
  bounds = np.zeros((count, 4), np.int64)
  bounds[:, :2] = np.iinfo(np.int64).max
  np.minimum.at(bounds[:, 0], component, ys)
  np.minimum.at(bounds[:, 1], component, xs)
  np.maximum.at(bounds[:, 2], component, ys + 1)
  np.maximum.at(bounds[:, 3], component, xs + 1)
  label = np.full((h, w), -1, np.int32)
  label[ys, xs] = component
  safe = np.maximum(magnitude, 1e-12)
  return Groups(label, magnitude, np.bincount(component, m * ys, count) / safe,
                np.bincount(component, m * xs, count) / safe, mean_theta, bounds)


def affinities(groups: Groups, radius: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(src, dst, affinity) of neighbouring groups, both directions.

  Groups are neighbours when some of their pixels lie within `radius` px.
  Affinity |cos(theta_i - theta_ij) cos(theta_j - theta_ij)|^gamma, theta_ij
  the direction between their mean positions turned by pi/2: 1 for groups on
  one straight contour. Pairs under WEIGHT_MIN are left out.
  """
  label = groups.label
  pairs = []
  for dy in range(0, radius + 1):
    for dx in range(-radius, radius + 1):
      if dy == 0 and dx <= 0:
        continue
      a, b = _shifted(label, dy, dx)
      both = (a >= 0) & (b >= 0) & (a != b)
      pairs.append(np.stack([np.minimum(a[both], b[both]), np.maximum(a[both], b[both])], 1))
  pairs = np.unique(np.concatenate(pairs), axis=0) if pairs else np.zeros((0, 2), np.int64)
  i, j = pairs[:, 0], pairs[:, 1]
  direction = np.arctan2(groups.y[i] - groups.y[j], groups.x[i] - groups.x[j]) + np.pi / 2
  a = np.abs(np.cos(groups.theta[i] - direction) * np.cos(groups.theta[j] - direction))**GAMMA
  keep = a >= WEIGHT_MIN
  return np.concatenate([i[keep], j[keep]]), np.concatenate([j[keep], i[keep]]), np.tile(a[keep], 2)


def candidates(height: int, width: int) -> np.ndarray:
  """[N, 4] int64 distinct boxes on the paper's grid, neighbours in scale, aspect and position at IoU ~alpha,
  and the whole image."""
  scale_step = np.sqrt(1 / ALPHA)
  aspect_step = (1 + ALPHA) / (2 * ALPHA)
  position_step = (1 - ALPHA) / (1 + ALPHA)
  aspect_radius = int(np.log(MAX_ASPECT_RATIO) / np.log(aspect_step**2))
  min_side = np.sqrt(MIN_BOX_AREA)
  num_scales = int(np.ceil(np.log(max(height, width) / min_side) / np.log(scale_step)))
  out = [np.array([[0, 0, height, width]])]  # the whole image, even when smaller than the grid's boxes
  for s in range(num_scales):
    for a in range(-aspect_radius, aspect_radius + 1):
      side, ratio = min_side * scale_step**s, aspect_step**a
      bh, bw = min(int(side / ratio), height), min(int(side * ratio), width)
      ky, kx = max(2, int(bh * position_step)), max(2, int(bw * position_step))
      y0, x0 = np.meshgrid(np.arange(0, height - bh + 1, ky), np.arange(0, width - bw + 1, kx), indexing="ij")
      y0, x0 = y0.reshape(-1), x0.reshape(-1)
      out.append(np.stack([y0, x0, y0 + bh, x0 + bw], 1))
  return np.unique(np.concatenate(out), axis=0)


class Scorer:
  """Scores boxes of one image by EdgeBoxes; holds the image's groups and tables.

  Not thread-safe (`full` switches the shared graph's edges per box): one per image and thread.
  """

  def __init__(self, image: np.ndarray, edges: tuple[np.ndarray, np.ndarray] | None = None):
    strength, theta = edge_map(image) if edges is None else edges
    self.groups = edge_groups(strength, theta)
    self.src, self.dst, self.affinity = affinities(self.groups)
    # Group magnitudes placed at their mean positions, and pixel strengths, summed by area.
    height, width = strength.shape
    point = np.zeros((height, width))
    self.gy = np.clip(np.round(self.groups.y).astype(np.int64), 0, height - 1)
    self.gx = np.clip(np.round(self.groups.x).astype(np.int64), 0, width - 1)
    np.add.at(point, (self.gy, self.gx), self.groups.magnitude)
    self.group_table = integral_image(point)
    self.pixel_table = integral_image(np.where(strength > EDGE_MIN, strength, 0).astype(np.float64))
    # The affinity graph with path lengths -log(affinity) (a hair above 0, so that sparse
    # storage keeps affinity-1 edges), in CSR order; a box switches edges off by length inf.
    count = len(self.groups.magnitude)
    graph = scipy.sparse.csr_matrix((-np.log(self.affinity.astype(np.float64)) + 1e-9, (self.src, self.dst)),
                                    shape=(count, count))
    graph.sort_indices()
    self.graph, self.length = graph, graph.data.copy()
    self.edge_src = np.repeat(np.arange(count), np.diff(graph.indptr))  # [E] in CSR order
    self.edge_dst = graph.indices
    self.max_length = -np.log(WEIGHT_MIN)
    self.padded = np.pad(self.groups.label, 1, constant_values=-1)

  def fast(self, boxes: np.ndarray) -> np.ndarray:
    """[N] upper bound of `full`: groups inside less the central quarter, no border term."""
    y0, x0, y1, x1 = np.asarray(boxes, np.int64).T
    inside = box_sums(self.group_table, y0, x0, y1, x1)
    return (inside - self._centre(y0, x0, y1, x1)) * self._norm(y0, x0, y1, x1)

  def full(self, boxes: np.ndarray) -> np.ndarray:
    """[N] EdgeBoxes scores: groups inside, less their weight of connection to the border.

    A group's weight is the largest product of affinities along a chain of
    groups inside the box from a group crossing its border (1 for those): a
    shortest path in -log(affinity), by Dijkstra from all crossing groups.
    """
    g, label = self.groups, self.groups.label
    boxes = np.asarray(boxes, np.int64).reshape(-1, 4)
    height, width = label.shape
    assert np.all((boxes[:, :2] >= 0) & (boxes[:, 2:] <= (height, width)) & (boxes[:, 2:] > boxes[:, :2])), \
        "boxes must be non-empty and inside the image"
    out = np.zeros(len(boxes))
    for n, (y0, x0, y1, x1) in enumerate(boxes):
      inside = (self.gy >= y0) & (self.gy < y1) & (self.gx >= x0) & (self.gx < x1)  # [G]
      # Crossing: groups with pixels on the ring just outside the box (the paper: on its outermost
      # pixels, which counts an object's own contour against the box that fits it).
      p = self.padded  # p[y + 1, x + 1] = label[y, x]
      border = np.concatenate([p[y0, x0:x1 + 2], p[y1 + 1, x0:x1 + 2], p[y0:y1 + 2, x0], p[y0:y1 + 2, x1 + 1]])
      crossing = np.zeros(len(inside), bool)
      crossing[border[border >= 0]] = True
      weight = crossing.astype(np.float64)
      if crossing.any() and (inside & ~crossing).any():
        part = inside | crossing  # paths run through these groups only
        self.graph.data = np.where(part[self.edge_src] & part[self.edge_dst], self.length, np.inf)
        distance = scipy.sparse.csgraph.dijkstra(self.graph, indices=np.flatnonzero(crossing), min_only=True,
                                                 limit=self.max_length)
        weight = np.exp(-distance)  # inf (unreached) -> 0
      out[n] = np.dot(inside * (1 - weight), g.magnitude)
    y0, x0, y1, x1 = boxes.T
    return (out - self._centre(y0, x0, y1, x1)) * self._norm(y0, x0, y1, x1)

  def refine(self, box: np.ndarray, score: float, min_size: float = 0) -> tuple[np.ndarray, float]:
    """The paper's local search: each side in turn moves out or in while the score rises, the step halving.

    Sides stay at least `min_size` (or the box's own, if smaller).
    """
    box, (height, width) = np.array(box, np.int64), self.groups.label.shape
    smallest = np.minimum(min_size, box[2:] - box[:2])
    steps = (np.array([box[2] - box[0], box[3] - box[1]]) * (1 - ALPHA) / (1 + ALPHA)).astype(np.int64)
    while True:
      steps //= 2
      if steps.max() <= 2:
        return box, score
      steps = np.maximum(steps, 1)
      for side in range(4):
        moves = np.stack([box, box])
        moves[:, side] += (-steps[side % 2], steps[side % 2])
        moves = moves[(moves[:, :2] >= 0).all(1) & (moves[:, 2:] <= (height, width)).all(1)
                      & (moves[:, 2:] - moves[:, :2] >= np.maximum(smallest, 1)).all(1)]
        if len(moves):
          scores = self.full(moves)
          if scores.max() > score:
            box, score = moves[scores.argmax()], float(scores.max())

  def _centre(self, y0, x0, y1, x1):
    qh, qw = (y1 - y0) // 4, (x1 - x0) // 4
    return box_sums(self.pixel_table, y0 + qh, x0 + qw, y1 - qh, x1 - qw)

  @staticmethod
  def _norm(y0, x0, y1, x1):
    return np.maximum(2.0 * ((y1 - y0) + (x1 - x0)), 1) ** -KAPPA


def edge_boxes(image: np.ndarray, min_size: float = 0,
               edges: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Candidates of an [H, W, 3] uint8 image with their EdgeBoxes scores: (boxes [N, 4] int32, scores [N]).

  edges: (strength, orientation) as `edge_map` returns them (None: `edge_map(image)`).

  Boxes with a side under `min_size` are left out. The FULL_SCORES best by
  the fast score are scored in full; the rest keep a score below all of them.
  Not sorted and not suppressed: `proposals.propose` ranks and applies NMS.
  """
  image = np.asarray(image)
  height, width = image.shape[:2]
  boxes = candidates(height, width)
  sides = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
  boxes = boxes[sides >= min(min_size, height, width)]
  scorer = Scorer(image, edges)
  fast = scorer.fast(boxes)
  best = np.argsort(-fast, kind="stable")[:FULL_SCORES]
  scores = np.full(len(boxes), -np.inf)
  scores[best] = scorer.full(boxes[best])
  rest = np.setdiff1d(np.arange(len(boxes)), best)
  if rest.size:  # below every fully scored box, in fast-score order
    scores[rest] = scores[best].min() - 1 - (fast[best].min() - fast[rest])
  for i in nms(boxes, scores, REFINE_NMS, REFINED):  # the leaders of a first NMS pass
    boxes[i], scores[i] = scorer.refine(boxes[i], scores[i], min_size)
  return boxes.astype(np.int32), scores
