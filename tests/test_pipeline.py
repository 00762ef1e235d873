"""Training crops and padded evaluation batches keep image and labels aligned."""

import numpy as np

from deconvnet_jax.data.pipeline import padded_eval_batches, random_crop, training_dataset, whole_image_example
from deconvnet_jax.labels import Example
from deconvnet_jax.normalization import denormalize


def coded_example(h, w):
  """Pixel colour encodes its position; the label is the same code mod 20."""
  y, x = np.mgrid[0:h, 0:w]
  image = np.stack([y, x, (y + x) % 256], -1).astype(np.uint8)
  label = ((y * w + x) % 20).astype(np.uint8)
  return Example("coded", image, label, np.zeros_like(label), np.zeros((0, 4), np.int32),
                 np.zeros(0, np.int32), np.zeros(0, np.int32))


def test_random_crop_keeps_pixels_and_labels_together():
  rng = np.random.default_rng(0)
  for h, w, size in [(50, 60, 32), (20, 70, 32), (10, 12, 32)]:
    ex = coded_example(h, w)
    for _ in range(20):
      image, label, valid = random_crop(ex, size, rng)
      assert image.shape == (size, size, 3) and label.shape == (size, size)
      assert np.all(label[~valid] == 255)
      y, x = image[..., 0].astype(int), image[..., 1].astype(int)
      np.testing.assert_array_equal(label[valid], ((y * w + x) % 20)[valid])
      assert valid.sum() == min(h, size) * min(w, size)


def test_batches_have_fixed_shapes_and_the_normalisation():
  ex = coded_example(40, 30)
  exs = [ex, coded_example(50, 50)]
  make = lambda i, rng: whole_image_example(exs[i], 32, "caffe_bgr", rng)
  batch = training_dataset(2, make, 3, seed=0)[7]
  again = training_dataset(2, make, 3, seed=0)[7]
  np.testing.assert_array_equal(batch["image"], again["image"])  # a function of (seed, step)
  assert batch["image"].shape == (3, 32, 32, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (3, 32, 32) and batch["label"].dtype == np.int32
  batches = list(padded_eval_batches([ex, coded_example(70, 20), ex], 2, "torchvision_rgb"))
  assert [b[0].shape for b in batches] == [(2, 64, 32, 3), (2, 96, 32, 3)]
  np.testing.assert_array_equal(denormalize(batches[1][0][0, :70, :20], "torchvision_rgb"),
                                coded_example(70, 20).image)
  assert np.all(batches[1][1][0, 70:] == 255) and np.all(batches[1][1][1] == 255)  # padding is void
