"""Confusion matrix and mean IoU, as the VOC devkit computes them."""

import numpy as np

from deconvnet_jax.labels import VOID


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


def mean_class_accuracy(conf: np.ndarray) -> float:
  """Mean over the classes in the ground truth of TP / their ground-truth pixels (FCN's "mean accuracy")."""
  truth = conf.sum(1)
  present = truth > 0
  return float(np.mean(np.diag(conf)[present] / truth[present])) if present.any() else float("nan")


def frequency_weighted_iou(conf: np.ndarray) -> float:
  """Per-class IoU weighted by the class's share of the ground-truth pixels (FCN's "f.w. IU")."""
  truth = conf.sum(1).astype(np.float64)
  ious = np.nan_to_num(iou_per_class(conf))
  return float((truth * ious).sum() / max(truth.sum(), 1))


def normalized_rows(conf: np.ndarray) -> np.ndarray:
  """Each ground-truth row divided by its pixel count: what share of class i was predicted j; NaN rows
  for classes absent from the ground truth."""
  truth = conf.sum(1, keepdims=True).astype(np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(truth > 0, conf / truth, np.nan)


def summary(conf: np.ndarray) -> dict:
  """mIoU, pixel accuracy, mean class accuracy, frequency-weighted IoU and per-class IoU of a confusion matrix."""
  return {"miou": mean_iou(conf), "pixel_acc": pixel_accuracy(conf), "mean_class_acc": mean_class_accuracy(conf),
          "fw_iou": frequency_weighted_iou(conf),
          "iou": [None if np.isnan(x) else round(float(x), 4) for x in iou_per_class(conf)]}


def collapse_warning(conf: np.ndarray, class_names, share: float = 0.95, margin: float = 0.1) -> str | None:
  """A warning when one class takes nearly every predicted pixel while ground truth is varied.

  Fires when a class is predicted on >= `share` of the non-void pixels and
  covers at least `margin` less of the ground truth: the collapse to one class
  (usually background) that segmentation training most often ends in.
  """
  total = conf.sum()
  if total == 0:
    return None
  predicted, truth = conf.sum(0) / total, conf.sum(1) / total
  top = int(np.argmax(predicted))
  if predicted[top] < share or truth[top] > predicted[top] - margin:
    return None
  missed = [class_names[c] for c in np.nonzero(truth > 0)[0] if c != top and conf[c, c] == 0]
  return (f"predictions collapsed: {predicted[top]:.1%} of pixels predicted {class_names[top]!r}, "
          f"which is {truth[top]:.1%} of the ground truth; {len(missed)} of the "
          f"{int((truth > 0).sum())} classes present are never predicted right ({', '.join(missed[:6])}"
          f"{', ...' if len(missed) > 6 else ''}). Common causes: a learning rate too high (--lr), "
          "input normalisation not matching the weights, labels not matching --num-classes; "
          "rare classes may need class balancing (--class-balance).")
