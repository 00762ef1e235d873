"""SBD reading (benchmark_RELEASE/dataset, MATLAB .mat annotations) and the train_aug split."""

import numpy as np
import pytest
import scipy.io

from deconvnet_jax.data.generated import generate, save_sbd_example
from deconvnet_jax.data.voc import read_sbd_example, read_sbd_split, read_source_example, train_aug_ids
from deconvnet_jax.labels import DataError

# SBD images as hand-drawn rectangles: id -> (height, width, [(class, y0, x0, y1, x1), ...]),
# later rectangles drawn over earlier ones. gen_00001 is also in the VOC train split,
# gen_00003 in VOC val (the generated VOC set below has train gen_00000..02, val gen_00003..04).
SBD_TRAIN = {
    "sbd_a": (40, 50, [(12, 5, 5, 30, 20), (15, 0, 15, 38, 45)]),  # dog, person over its right part
    "sbd_b": (30, 36, [(7, 2, 3, 12, 30)]),  # one car: Categories is a scalar once squeezed
    "gen_00001": (32, 32, [(1, 4, 4, 20, 20)]),
}
SBD_VAL = {
    "sbd_c": (24, 28, []),  # background only
    "gen_00003": (32, 32, [(20, 0, 0, 10, 10)]),
}
TRAIN_AUG = [("voc", "gen_00000"), ("voc", "gen_00001"), ("voc", "gen_00002"),
             ("sbd", "sbd_a"), ("sbd", "sbd_b"), ("sbd", "sbd_c")]


def draw(height, width, objects):
  """Class mask [H, W], instance mask [H, W] (ids 1..N in drawing order) and Categories [N]."""
  label = np.zeros((height, width), np.uint8)
  instances = np.zeros((height, width), np.uint8)
  for i, (cls, y0, x0, y1, x1) in enumerate(objects, start=1):
    label[y0:y1, x0:x1], instances[y0:y1, x0:x1] = cls, i
  return label, instances, np.asarray([o[0] for o in objects], np.uint8)


def write_sbd_image(dataset, image_id, height, width, objects, seed=0):
  """img/ID.jpg, cls/ID.mat (GTcls) and inst/ID.mat (GTinst) with SBD's struct and field names."""
  label, instances, categories = draw(height, width, objects)
  image = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
  save_sbd_example(dataset, image_id, image, label, instances, categories)


def make_voc_and_sbd(root):
  """root/VOCdevkit/VOC2012 (generated) and root/benchmark_RELEASE/dataset, as extracted from the archives."""
  voc_root = generate(root / "VOCdevkit" / "VOC2012", num_train=3, num_val=2, seed=5)
  dataset = root / "benchmark_RELEASE" / "dataset"
  for split, images in (("train", SBD_TRAIN), ("val", SBD_VAL)):
    for seed, (image_id, (h, w, objects)) in enumerate(images.items()):
      write_sbd_image(dataset, image_id, h, w, objects, seed)
    (dataset / f"{split}.txt").write_text("".join(f"{i}\n" for i in images))
  return voc_root, dataset


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
  return make_voc_and_sbd(tmp_path_factory.mktemp("sbd"))


def test_sbd_pixels_boxes_and_classes_read_back(roots):
  _, dataset = roots
  ex = read_sbd_example(dataset, "sbd_a")
  assert ex.image.shape == (40, 50, 3) and ex.label.shape == ex.instances.shape == (40, 50)
  assert ex.label[20, 10] == 12 and ex.instances[20, 10] == 1  # the dog
  assert ex.label[20, 22] == 15 and ex.instances[20, 22] == 2  # the person, drawn over the dog
  assert ex.label[0, 0] == 0 and ex.instances[0, 0] == 0
  assert ex.boxes.tolist() == [[5, 5, 30, 15], [0, 15, 38, 45]]  # the dog is cut at x = 15
  assert ex.classes.tolist() == [12, 15]
  assert ex.label.dtype == ex.instances.dtype == np.uint8 and not np.any(ex.label == 255)
  one = read_sbd_example(dataset.parent, "sbd_b")  # benchmark_RELEASE itself is accepted too
  assert one.boxes.tolist() == [[2, 3, 12, 30]] and one.classes.tolist() == [7]
  empty = read_sbd_example(dataset, "sbd_c")
  assert empty.boxes.shape == (0, 4) and empty.classes.shape == (0,)
  assert read_sbd_split(dataset, "val") == ["sbd_c", "gen_00003"]


def test_train_aug_is_sbd_and_voc_train_minus_voc_val(roots):
  voc_root, dataset = roots
  items = train_aug_ids(voc_root, dataset)
  assert items == TRAIN_AUG
  assert not {i for _, i in items} & {"gen_00003", "gen_00004"}  # VOC val, even where SBD has it
  # gen_00001 is in both: VOC's annotation wins, and VOC's void (255) survives reading.
  ex = read_source_example("voc", voc_root, "gen_00001")
  assert np.any(ex.label == 255) and np.any(ex.instances == 255)
  assert not np.any(read_source_example("sbd", dataset, "gen_00001").label == 255)
  with pytest.raises(ValueError, match="unknown source 'coco'"):
    read_source_example("coco", voc_root, "gen_00001")


def _damaged(tmp_path, damage):
  """A one-image SBD folder (sbd_a) after `damage(dataset)`."""
  dataset = tmp_path / "benchmark_RELEASE" / "dataset"
  write_sbd_image(dataset, "sbd_a", *SBD_TRAIN["sbd_a"])
  damage(dataset)
  return dataset


def _save(path, struct, **fields):
  scipy.io.savemat(path, {struct: fields})


GOOD = draw(*SBD_TRAIN["sbd_a"])

BAD = {
    "missing cls": (lambda d: (d / "cls/sbd_a.mat").unlink(), r"cls/sbd_a.mat: annotation file not found"),
    "missing inst": (lambda d: (d / "inst/sbd_a.mat").unlink(), r"inst/sbd_a.mat: annotation file not found"),
    "missing image": (lambda d: (d / "img/sbd_a.jpg").unlink(), r"img/sbd_a.jpg: image file not found"),
    "not a mat file": (lambda d: (d / "cls" / "sbd_a.mat").write_bytes(b"<html>not found</html>"),
                       r"cls/sbd_a.mat: cannot read as a MATLAB .mat file"),
    "no struct": (lambda d: _save(d / "cls" / "sbd_a.mat", "GTinst", Segmentation=GOOD[0]),
                  r"cls/sbd_a.mat: no struct GTcls in the file \(variables here: \['GTinst'\]\)"),
    "no field": (lambda d: _save(d / "inst" / "sbd_a.mat", "GTinst", Segmentation=GOOD[1]),
                 r"inst/sbd_a.mat: struct GTinst has no field Categories"),
    "size mismatch": (lambda d: _save(d / "cls" / "sbd_a.mat", "GTcls", Segmentation=GOOD[0][:-1]),
                      r"cls/sbd_a.mat: mask is 50x39 but its image is 50x40"),
    "class out of range": (lambda d: _save(d / "cls" / "sbd_a.mat", "GTcls", Segmentation=GOOD[0] * 2),
                           r"cls/sbd_a.mat: class indices \[24, 30\] outside 0..20"),
    "not a mask": (lambda d: _save(d / "cls" / "sbd_a.mat", "GTcls", Segmentation=GOOD[0] - 0.5),
                   r"cls/sbd_a.mat: GTcls.Segmentation: expected a 2-D array of integers"),
    "too few categories": (lambda d: _save(d / "inst" / "sbd_a.mat", "GTinst", Segmentation=GOOD[1],
                                           Categories=np.uint8(12)),
                           r"inst/sbd_a.mat: instance id 2 in Segmentation but only 1 Categories"),
    "bad category": (lambda d: _save(d / "inst" / "sbd_a.mat", "GTinst", Segmentation=GOOD[1],
                                     Categories=np.array([12, 21], np.uint8)),
                     r"inst/sbd_a.mat: GTinst.Categories must list classes 1..20"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_sbd_files_raise_data_error_naming_the_file(tmp_path, case):
  damage, message = BAD[case]
  dataset = _damaged(tmp_path, damage)
  with pytest.raises(DataError, match=message):
    read_sbd_example(dataset, "sbd_a")


def test_missing_sbd_split_is_named(tmp_path, roots):
  voc_root, _ = roots
  dataset = _damaged(tmp_path, lambda d: (d / "train.txt").write_text("sbd_a\n"))
  with pytest.raises(DataError, match=r"dataset/val.txt: SBD split file not found"):
    train_aug_ids(voc_root, dataset)
  with pytest.raises(DataError, match=r"nowhere: no such SBD folder"):
    read_sbd_split(tmp_path / "nowhere", "train")
