"""Box geometry on the host: area, IoU, greedy NMS, and sums over boxes by integral images.

Boxes are [N, 4] (y0, x0, y1, x1) with exclusive ends, as `Example.boxes`.
"""

import numpy as np


def box_area(boxes) -> np.ndarray:
  """[N] area of [N, 4] boxes; inverted boxes count as empty."""
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  return np.maximum(boxes[:, 2] - boxes[:, 0], 0) * np.maximum(boxes[:, 3] - boxes[:, 1], 0)


def box_iou(a, b) -> np.ndarray:
  """[N, M] float64 intersection over union; 0 wherever the union is empty."""
  a = np.asarray(a, np.float64).reshape(-1, 4)
  b = np.asarray(b, np.float64).reshape(-1, 4)
  lo = np.maximum(a[:, None, :2], b[None, :, :2])  # [N, M, 2]
  hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
  inter = np.prod(np.maximum(hi - lo, 0), axis=-1)  # [N, M]
  union = box_area(a)[:, None] + box_area(b)[None, :] - inter
  return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def nms(boxes, scores, iou_threshold: float, top_k: int | None = None) -> np.ndarray:
  """Greedy NMS: int64 indices of the kept boxes, best score first (ties: lower index first).

  A box is dropped when its IoU with an already kept box exceeds `iou_threshold`.
  """
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  scores = np.asarray(scores, np.float64).reshape(-1)
  assert len(boxes) == len(scores), (boxes.shape, scores.shape)
  order = np.argsort(-scores, kind="stable")  # stable: equal scores keep index order
  y0, x0, y1, x1 = boxes[order].T.copy()  # [N] each, best first
  area = np.maximum(y1 - y0, 0) * np.maximum(x1 - x0, 0)
  rest = np.arange(len(order))  # positions in `order` not yet kept or suppressed
  keep = []
  while rest.size and (top_k is None or len(keep) < top_k):
    best, rest = rest[0], rest[1:]
    keep.append(best)
    inter = (np.maximum(np.minimum(y1[rest], y1[best]) - np.maximum(y0[rest], y0[best]), 0)
             * np.maximum(np.minimum(x1[rest], x1[best]) - np.maximum(x0[rest], x0[best]), 0))
    union = area[rest] + area[best] - inter
    # Same IoU as box_iou: an empty union (two empty boxes) gives 0.
    iou = inter / np.maximum(union, np.finfo(np.float64).tiny)
    rest = rest[iou <= iou_threshold]
  return order[np.asarray(keep, np.int64)]


def integral_image(x: np.ndarray) -> np.ndarray:
  """[H + 1, W + 1, ...] summed-area table of [H, W, ...] x, a zero row and column in front."""
  out = np.zeros((x.shape[0] + 1, x.shape[1] + 1, *x.shape[2:]), x.dtype)
  out[1:, 1:] = x
  # Row by row, each add vectorised over the rest: several times faster than np.cumsum
  # over a leading axis of a [H, W, C] array.
  for i in range(2, out.shape[0]):
    out[i] += out[i - 1]
  for j in range(2, out.shape[1]):
    out[:, j] += out[:, j - 1]
  return out


def box_sums(table: np.ndarray, y0, x0, y1, x1) -> np.ndarray:
  """[N, ...] sums of the table's image over boxes, each clipped to the image first."""
  h, w = table.shape[0] - 1, table.shape[1] - 1
  y0, y1 = np.clip(y0, 0, h), np.clip(y1, 0, h)
  x0, x1 = np.clip(x0, 0, w), np.clip(x1, 0, w)
  return table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
