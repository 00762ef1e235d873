"""Confusion matrix and mean IoU, as the VOC devkit computes them."""

import numpy as np

VOID = 255


def confusion_matrix(label: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
  """[K, K] int64 counts, rows = ground truth, cols = prediction; void (255) pixels skipped."""
  label, pred = np.asarray(label).reshape(-1), np.asarray(pred).reshape(-1)
  keep = label != VOID
  return np.bincount(num_classes * label[keep].astype(np.int64) + pred[keep],
                     minlength=num_classes**2).reshape(num_classes, num_classes)


def iou_per_class(conf: np.ndarray) -> np.ndarray:
  """TP / (TP + FP + FN) per class; NaN where a class is in neither ground truth nor prediction."""
  tp = np.diag(conf).astype(np.float64)
  union = conf.sum(0) + conf.sum(1) - tp
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(union > 0, tp / union, np.nan)


def mean_iou(conf: np.ndarray) -> float:
  """Mean IoU over the classes that occur in ground truth or prediction."""
  return float(np.nanmean(iou_per_class(conf)))


def pixel_accuracy(conf: np.ndarray) -> float:
  return float(np.trace(conf) / max(conf.sum(), 1))
