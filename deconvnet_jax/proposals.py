"""Object proposals: box IoU, NMS, and sliding windows ranked by a content-aware objectness.

Boxes are [N, 4] (y0, x0, y1, x1) with exclusive ends, as `Example.boxes`. The
default generator works offline and needs no network: multi-scale sliding
windows, scored with integral images by edges (after EdgeBoxes, Zitnick and
Dollar 2014) times colour contrast with a surrounding ring (after Alexe et al.
2012), then greedy NMS and the top K. Host-side NumPy only.
"""

from math import ceil

import numpy as np

from deconvnet_jax import edge_boxes
from deconvnet_jax.boxes import box_iou, box_sums, integral_image, nms

# Content-only generators (no network), and the NMS threshold each measured best with.
GENERATORS = ("windows", "edge_boxes", "selective_search")
NMS_THRESHOLD = {"windows": 0.7, "edge_boxes": 0.6, "selective_search": 0.7}
# Window sides as fractions of the shorter image side; aspect ratios are height / width.
SCALES = (0.15, 0.2, 0.27, 0.35, 0.45, 0.57, 0.72, 0.87, 1.0)
ASPECT_RATIOS = (0.5, 0.7, 1.0, 1.4, 2.0)
STRIDE_FRACTION = 0.2
# The reference code drops proposals with a side under 112 px on VOC-sized images.
REFERENCE_MIN_SIZE, REFERENCE_SHORT_SIDE = 112, 300
# Objectness, tuned on the generated train split: EdgeBoxes' perimeter exponent,
# the weight of edges crossing the border, the border strip's half width
# (fraction of the side, at least 2 px), colour bins per channel and the ring's width.
EDGE_KAPPA = 1.5
CROSSING_WEIGHT = 1.5
STRIP_FRACTION = 0.05
COLOUR_BINS = 4
RING_FRACTION = 0.25


def default_min_size(height: int, width: int) -> float:
  """The reference 112 px rule, scaled down linearly for images whose shorter side is under 300."""
  return REFERENCE_MIN_SIZE * min(height, width, REFERENCE_SHORT_SIDE) / REFERENCE_SHORT_SIDE


def sliding_windows(height: int, width: int, scales=SCALES, aspect_ratios=ASPECT_RATIOS,
                    stride_fraction: float = STRIDE_FRACTION, min_size: float = 0) -> np.ndarray:
  """[N, 4] int32 distinct windows inside the image, sides at least min(min_size, image side).

  A window is scale x the shorter image side, stretched to the aspect ratio,
  each side raised to `min_size` and clipped to the image; windows step by
  `stride_fraction` of their own side and always reach the far borders. The
  whole image is one of the windows.
  """
  short = min(height, width)
  windows = [np.array([[0, 0, height, width]])]
  for scale in scales:
    for ratio in aspect_ratios:
      h = min(max(round(scale * short * np.sqrt(ratio)), ceil(min_size), 1), height)
      w = min(max(round(scale * short / np.sqrt(ratio)), ceil(min_size), 1), width)
      y0, x0 = np.meshgrid(_offsets(height - h, stride_fraction * h),
                           _offsets(width - w, stride_fraction * w), indexing="ij")
      y0, x0 = y0.reshape(-1), x0.reshape(-1)
      windows.append(np.stack([y0, x0, y0 + h, x0 + w], axis=1))
  windows = np.concatenate(windows)
  # One integer key per box makes the dedupe a 1-D unique.
  y0, x0, y1, x1 = windows.T
  key = ((y0 * (width + 1) + x0) * (height + 1) + y1) * (width + 1) + x1
  return windows[np.unique(key, return_index=True)[1]].astype(np.int32)


def _offsets(span: int, stride: float) -> np.ndarray:
  """Evenly spaced integer offsets from 0 to span inclusive, at most about `stride` apart."""
  n = int(np.ceil(span / max(stride, 1))) + 1
  return np.unique(np.round(np.linspace(0, span, n)).astype(np.int64))


def _smooth(x: np.ndarray, passes: int = 2) -> np.ndarray:
  """[1, 2, 1] / 4 blur along both axes of [H, W, C] x, `passes` times, borders replicated."""
  for _ in range(passes):
    p = np.pad(x, ((1, 1), (0, 0), (0, 0)), mode="edge")
    x = (p[:-2] + 2 * p[1:-1] + p[2:]) / 4
    p = np.pad(x, ((0, 0), (1, 1), (0, 0)), mode="edge")
    x = (p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]) / 4
  return x


def edge_maps(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """|d/dx| and |d/dy| of the blurred image, strongest channel: [H, W] float64 each."""
  x = _smooth(np.asarray(image, np.float64))
  p = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
  gx = np.abs(p[1:-1, 2:] - p[1:-1, :-2]).max(-1)  # strong on vertical edges
  gy = np.abs(p[2:, 1:-1] - p[:-2, 1:-1]).max(-1)  # strong on horizontal edges
  return gx, gy


def _edge_score(image: np.ndarray, y0, x0, y1, x1) -> np.ndarray:
  """EdgeBoxes-like: edges in the box, less its centre and edges crossing its border, / perimeter^kappa."""
  gx, gy = edge_maps(image)
  sx, sy = integral_image(gx), integral_image(gy)
  h, w = y1 - y0, x1 - x0

  def mass(*box):
    return box_sums(sx, *box) + box_sums(sy, *box)

  inside = mass(y0, x0, y1, x1)
  # Object contours lie near the box's border, texture fills its centre.
  centre = mass(y0 + h // 4, x0 + w // 4, y1 - h // 4, x1 - w // 4)
  # An edge crossing a vertical side varies along y (|d/dy|), one crossing a horizontal side along x.
  ty = np.maximum(np.round(STRIP_FRACTION * h).astype(np.int64), 2)
  tx = np.maximum(np.round(STRIP_FRACTION * w).astype(np.int64), 2)
  crossing = (box_sums(sy, y0, x0 - tx, y1, x0 + tx) + box_sums(sy, y0, x1 - tx, y1, x1 + tx)
              + box_sums(sx, y0 - ty, x0, y0 + ty, x1) + box_sums(sx, y1 - ty, x0, y1 + ty, x1))
  perimeter = np.maximum(2.0 * (h + w), 1)
  return (inside - centre - CROSSING_WEIGHT * crossing) / perimeter**EDGE_KAPPA


def _colour_contrast(image: np.ndarray, y0, x0, y1, x1) -> np.ndarray:
  """Chi-squared distance in [0, 1] between colour histograms of the box and a ring around it."""
  q = np.asarray(image, np.int64) * COLOUR_BINS // 256  # [H, W, 3]
  code = (q[..., 0] * COLOUR_BINS + q[..., 1]) * COLOUR_BINS + q[..., 2]
  # Counts stay exact in int32 up to 2**31 pixels.
  table = integral_image(np.eye(COLOUR_BINS**3, dtype=np.int32)[code])  # [H + 1, W + 1, bins^3]
  ry = np.maximum(np.round(RING_FRACTION * (y1 - y0)).astype(np.int64), 2)
  rx = np.maximum(np.round(RING_FRACTION * (x1 - x0)).astype(np.int64), 2)
  inside = box_sums(table, y0, x0, y1, x1).astype(np.float64)  # [N, bins^3]
  ring = box_sums(table, y0 - ry, x0 - rx, y1 + ry, x1 + rx) - inside
  n_in, n_ring = inside.sum(1, keepdims=True), ring.sum(1, keepdims=True)
  p, r = inside / np.maximum(n_in, 1), ring / np.maximum(n_ring, 1)
  chi2 = 0.5 * np.sum((p - r)**2 / np.maximum(p + r, 1e-12), axis=1)
  return np.where((n_in[:, 0] > 0) & (n_ring[:, 0] > 0), chi2, 0.0)


def objectness(image: np.ndarray, boxes) -> np.ndarray:
  """[N] float64 scores of [N, 4] boxes in an [H, W, 3] uint8 image; higher = more object-like.

  The positive part of an EdgeBoxes-like edge score times the box's colour
  contrast with its surroundings, both from integral images. Boxes are rounded
  and clipped to the image; empty ones score 0.
  """
  image = np.asarray(image)
  assert image.ndim == 3 and image.shape[2] == 3, image.shape
  height, width = image.shape[:2]
  boxes = np.round(np.asarray(boxes, np.float64).reshape(-1, 4)).astype(np.int64)
  y0, y1 = np.clip(boxes[:, 0], 0, height), np.clip(boxes[:, 2], 0, height)
  x0, x1 = np.clip(boxes[:, 1], 0, width), np.clip(boxes[:, 3], 0, width)
  y1, x1 = np.maximum(y1, y0), np.maximum(x1, x0)
  score = np.maximum(_edge_score(image, y0, x0, y1, x1), 0) * _colour_contrast(image, y0, x0, y1, x1)
  return np.where((y1 > y0) & (x1 > x0), score, 0.0)


def selective_search(image: np.ndarray, quality: bool = False) -> np.ndarray:
  """[N, 4] int32 distinct selective-search boxes (Uijlings et al. 2013) of an [H, W, 3] uint8 image.

  Uses OpenCV's contrib module, an optional dependency. OpenCV ranks its boxes
  with an unseeded random number, so they come back sorted by coordinates.
  """
  try:
    import cv2  # optional: only this generator needs it
    segmentation = cv2.ximgproc.segmentation
  except (ImportError, AttributeError) as e:
    raise ImportError("selective search needs OpenCV's contrib modules: "
                      "pip install opencv-contrib-python-headless") from e
  search = segmentation.createSelectiveSearchSegmentation()
  search.setBaseImage(np.ascontiguousarray(np.asarray(image)[..., ::-1]))  # OpenCV wants BGR
  if quality:
    search.switchToSelectiveSearchQuality()
  else:
    search.switchToSelectiveSearchFast()
  rects = np.asarray(search.process(), np.int64).reshape(-1, 4)  # (x, y, w, h)
  boxes = np.stack([rects[:, 1], rects[:, 0], rects[:, 1] + rects[:, 3], rects[:, 0] + rects[:, 2]], 1)
  return np.unique(boxes, axis=0).astype(np.int32)


def propose(image: np.ndarray, top_k: int = 50, min_size: float | None = None,
            iou_threshold: float | None = None, generator: str = "windows",
            edges: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Top-K proposals of an [H, W, 3] uint8 image: (boxes [K, 4] int32, scores [K]), best first.

  Candidates -> scores -> NMS. `generator` is one of GENERATORS:
  "windows" (`sliding_windows` ranked by `objectness`), "edge_boxes"
  (`edge_boxes.edge_boxes`) or "selective_search" (OpenCV's, ranked by
  `objectness`). No candidate has a side under `min_size` (None:
  `default_min_size`, the reference's 112 px scaled to the image; 0: no limit).
  iou_threshold: NMS's (None: the generator's, NMS_THRESHOLD).
  edges: edge_boxes only: its edge map (strength, orientation), instead of the image's own.
  """
  height, width = np.shape(image)[:2]
  if generator not in GENERATORS:
    raise ValueError(f"unknown proposal generator {generator!r}: one of {', '.join(GENERATORS)}")
  if min_size is None:
    min_size = default_min_size(height, width)
  if iou_threshold is None:
    iou_threshold = NMS_THRESHOLD[generator]
  if generator == "edge_boxes":
    candidates, scores = edge_boxes.edge_boxes(image, min_size, edges)
  else:
    if generator == "windows":
      candidates = sliding_windows(height, width, min_size=min_size)
    else:
      candidates = selective_search(image)
      sides = np.minimum(candidates[:, 2] - candidates[:, 0], candidates[:, 3] - candidates[:, 1])
      candidates = candidates[sides >= min_size]
    scores = objectness(image, candidates)
  keep = nms(candidates, scores, iou_threshold, top_k)
  return candidates[keep], scores[keep]


def recall(proposals_per_image, gt_boxes_per_image, iou: float = 0.5) -> float:
  """Fraction of ground-truth boxes with IoU >= iou with some proposal of their image (nan if none)."""
  assert len(proposals_per_image) == len(gt_boxes_per_image)
  found = total = 0
  for proposals, gt in zip(proposals_per_image, gt_boxes_per_image):
    overlaps = box_iou(gt, proposals)  # [G, K]
    total += overlaps.shape[0]
    if overlaps.size:
      found += int(np.sum(overlaps.max(axis=1) >= iou))
  return found / total if total else float("nan")


# Network-guided proposals: probability thresholds for the class regions, and the context
# scales their tight boxes are enlarged by (1.0 keeps the tight box).
NETWORK_THRESHOLDS = (0.3, 0.5, 0.7)
NETWORK_SCALES = (1.0, 1.25, 1.6)


def network_boxes(prob: np.ndarray, thresholds=NETWORK_THRESHOLDS, scales=NETWORK_SCALES,
                  min_pixels: int = 16) -> tuple[np.ndarray, np.ndarray]:
  """Boxes around what a whole-image forward segments: (boxes [N, 4] float64, scores [N]), best first.

  prob: [H, W, K] class probabilities, class 0 background. For each foreground
  class and threshold, each connected region of prob >= threshold (8-connected,
  at least `min_pixels`) gives its tight box, enlarged about its centre by each
  scale and clipped to the image. Score: the region's mean probability, times
  0.9 per step away from the tight box, so the tight box of a confident region
  ranks first. Duplicates (the same box from several thresholds) are merged by
  NMS at IoU 0.95.
  """
  import scipy.ndimage  # only this generator needs it

  height, width, num_classes = prob.shape
  boxes, scores = [], []
  for c in range(1, num_classes):
    for t in thresholds:
      regions, n = scipy.ndimage.label(prob[..., c] >= t, structure=np.ones((3, 3)))
      if n == 0:
        continue
      index = np.arange(1, n + 1)
      sizes = scipy.ndimage.sum_labels(np.ones_like(regions), regions, index)
      means = scipy.ndimage.mean(prob[..., c], regions, index)
      for k, found in enumerate(scipy.ndimage.find_objects(regions)):
        if sizes[k] < min_pixels:
          continue
        y0, y1, x0, x1 = found[0].start, found[0].stop, found[1].start, found[1].stop
        for step, scale in enumerate(scales):
          cy, cx, hh, hw = (y0 + y1) / 2, (x0 + x1) / 2, scale * (y1 - y0) / 2, scale * (x1 - x0) / 2
          boxes.append((max(cy - hh, 0), max(cx - hw, 0), min(cy + hh, height), min(cx + hw, width)))
          scores.append(means[k] * 0.9**step)
  if not boxes:
    return np.zeros((0, 4)), np.zeros(0)
  boxes, scores = np.asarray(boxes, np.float64), np.asarray(scores, np.float64)
  keep = nms(boxes, scores, 0.95)
  return boxes[keep], scores[keep]


def mix(network: tuple[np.ndarray, np.ndarray], content: tuple[np.ndarray, np.ndarray],
        top_k: int, iou_threshold: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
  """Network-guided boxes first (best first), then content-aware ones, NMS over both: the top K.

  Each list keeps its own order; a content box is dropped where a network box covers it.
  """
  (nb, ns), (cb, cs) = network, content
  boxes = np.concatenate([np.asarray(nb, np.float64).reshape(-1, 4), np.asarray(cb, np.float64).reshape(-1, 4)])
  # Rank: every network box above every content box, each list in its own order.
  rank = -np.arange(len(boxes), dtype=np.float64)
  keep = nms(boxes, rank, iou_threshold, top_k)
  return boxes[keep], np.concatenate([np.asarray(ns, np.float64), np.asarray(cs, np.float64)])[keep]
