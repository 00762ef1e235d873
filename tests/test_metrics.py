"""mIoU against a brute-force per-class count."""

import numpy as np

from deconvnet_jax.metrics import (confusion_matrix, frequency_weighted_iou, iou_per_class, mean_class_accuracy,
                                   mean_iou, normalized_rows, pixel_accuracy)


def test_miou_matches_brute_force_count():
  rng = np.random.default_rng(0)
  k = 6
  label = rng.integers(0, k - 1, size=(3, 20, 17))  # class 5 never in ground truth
  label[rng.random(label.shape) < 0.2] = 255
  pred = rng.integers(0, k, size=label.shape)
  pred[pred == 3] = 2  # class 3 never predicted
  conf = confusion_matrix(label, pred, k)
  valid = label != 255
  ious = []
  for c in range(k):
    tp = np.sum((label == c) & (pred == c) & valid)
    fp = np.sum((label != c) & (pred == c) & valid)
    fn = np.sum((label == c) & (pred != c) & valid)
    ious.append(tp / (tp + fp + fn))
  np.testing.assert_allclose(iou_per_class(conf), ious)
  assert ious[3] == 0.0 and ious[5] == 0.0  # absent on one side: counted as 0, as the devkit does
  assert np.isclose(mean_iou(conf), np.mean(ious))
  assert np.isclose(pixel_accuracy(conf), np.mean(label[valid] == pred[valid]))


def test_class_absent_everywhere_is_left_out_of_the_mean():
  label = np.array([[0, 1], [1, 255]])
  pred = np.array([[0, 1], [0, 2]])
  ious = iou_per_class(confusion_matrix(label, pred, 4))
  assert np.isnan(ious[3]) and np.isnan(ious[2])  # 2 only predicted on void: not counted
  np.testing.assert_allclose(ious[:2], [1 / 2, 1 / 2])
  assert np.isclose(mean_iou(confusion_matrix(label, pred, 4)), 0.5)


def test_class_accuracy_and_frequency_weighted_iou_match_per_pixel_loops():
  rng = np.random.default_rng(3)
  label = rng.integers(0, 4, (40, 30))
  label[0, :5] = 255
  pred = np.where(rng.random((40, 30)) < 0.7, label, rng.integers(0, 5, (40, 30))) % 5
  pred[label == 255] = 0
  conf = confusion_matrix(label, pred, 5)  # class 4 only predicted, never in the truth
  accs, weights, ious = [], [], []
  for c in range(5):
    truth = [(l, p) for l, p in zip(label.ravel(), pred.ravel()) if l == c]
    if truth:
      accs.append(sum(p == c for _, p in truth) / len(truth))
      tp = len([1 for l, p in zip(label.ravel(), pred.ravel()) if l == c and p == c])
      union = len([1 for l, p in zip(label.ravel(), pred.ravel()) if l != 255 and (l == c or p == c)])
      weights.append(len(truth))
      ious.append(tp / union)
  assert np.isclose(mean_class_accuracy(conf), np.mean(accs))
  assert np.isclose(frequency_weighted_iou(conf), np.dot(weights, ious) / sum(weights))
  rows = normalized_rows(conf)
  np.testing.assert_allclose(rows[:4].sum(1), 1.0)
  assert np.isnan(rows[4]).all()  # no ground truth for class 4
  assert conf.sum() == (label != 255).sum()
