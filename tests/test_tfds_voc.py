"""The TFDS builder: prepares offline from the official archives or folders, reads back without TensorFlow."""

import shutil
import sys
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from deconvnet_jax.data import tfds_voc
from deconvnet_jax.data.tfds_voc import SBD_ARCHIVE, SBD_FOLDER, VOC_ARCHIVE, VOC_FOLDER
from deconvnet_jax.labels import DataError
from test_sbd import SBD_TRAIN, SBD_VAL, TRAIN_AUG, draw, make_voc_and_sbd

VOC_VAL = ["gen_00003", "gen_00004"]


@pytest.fixture(scope="module")
def manual(tmp_path_factory):
  """Two manual dirs: `folders` (extracted VOC and SBD) and `archives` (the official archive files)."""
  root = tmp_path_factory.mktemp("manual")
  folders, archives = root / "folders", root / "archives"
  voc_root, _ = make_voc_and_sbd(folders)
  # What the real VOC archive also holds and segmentation does not need.
  Image.new("RGB", (8, 8)).save(voc_root / "JPEGImages" / "2007_000001.jpg")
  (voc_root / "Annotations").mkdir()
  (voc_root / "Annotations" / "gen_00000.xml").write_text("<annotation/>")
  (folders / "benchmark_RELEASE" / "benchmark_code_RELEASE").mkdir()
  (folders / "benchmark_RELEASE" / "benchmark_code_RELEASE" / "README").write_text("matlab code")
  archives.mkdir()
  with tarfile.open(archives / VOC_ARCHIVE, "w") as tar:
    tar.add(folders / "VOCdevkit", arcname="VOCdevkit")
  with tarfile.open(archives / SBD_ARCHIVE, "w:gz") as tar:
    tar.add(folders / "benchmark_RELEASE", arcname="benchmark_RELEASE")
  return folders, archives


def records(builder, split):
  return {ex.image_id: ex for ex in map(tfds_voc.example_from_record, builder.as_data_source()[split])}


def check_train_aug(builder, folders):
  """Every record holds the exact pixels, masks, boxes and classes of its source files."""
  train, val = records(builder, "train"), records(builder, "val")
  assert sorted(train) == sorted(i for _, i in TRAIN_AUG) and sorted(val) == VOC_VAL
  for source, image_id in TRAIN_AUG + [("voc", i) for i in VOC_VAL]:
    ex = train.get(image_id) or val[image_id]
    assert ex.image.dtype == ex.label.dtype == ex.instances.dtype == np.uint8
    assert ex.boxes.dtype == ex.classes.dtype == np.int32
    if source == "voc":
      root = folders / VOC_FOLDER
      image = root / "JPEGImages" / f"{image_id}.jpg"
      label = np.asarray(Image.open(root / "SegmentationClass" / f"{image_id}.png"))
      instances = np.asarray(Image.open(root / "SegmentationObject" / f"{image_id}.png"))
      assert np.any(label == 255)  # void survives
    else:
      image = folders / SBD_FOLDER / "img" / f"{image_id}.jpg"
      label, instances, categories = draw(*{**SBD_TRAIN, **SBD_VAL}[image_id])
      assert ex.classes.tolist() == categories.tolist()
    np.testing.assert_array_equal(ex.image, np.asarray(Image.open(image)))
    np.testing.assert_array_equal(ex.label, label)
    np.testing.assert_array_equal(ex.instances, instances)
    assert len(ex.boxes) == len(ex.classes) == len(set(np.unique(instances)) - {0, 255})
    for i, box in enumerate(ex.boxes, start=1):
      ys, xs = np.nonzero(instances == i)
      assert box.tolist() == [ys.min(), xs.min(), ys.max() + 1, xs.max() + 1]
  sbd_a = train["sbd_a"]
  assert sbd_a.label[20, 10] == 12 and sbd_a.instances[20, 10] == 1
  assert sbd_a.boxes.tolist() == [[5, 5, 30, 15], [0, 15, 38, 45]] and sbd_a.classes.tolist() == [12, 15]
  assert train["sbd_c"].boxes.shape == (0, 4)


def test_train_aug_from_folders(manual, tmp_path):
  folders, _ = manual
  builder = tfds_voc.prepare(folders, tmp_path / "tfds", "train_aug")
  check_train_aug(builder, folders)
  assert "tensorflow" not in sys.modules
  # A fresh reader, from the files alone.
  source = tfds.data_source("voc_segmentation/train_aug", data_dir=tmp_path / "tfds")
  assert len(source["train"]) == len(TRAIN_AUG) and len(source["val"]) == len(VOC_VAL)


def test_train_aug_and_voc2012_from_archives(manual, tmp_path, monkeypatch, capsys):
  folders, archives = manual
  check_train_aug(tfds_voc.prepare(archives, tmp_path / "tfds", "train_aug"), folders)
  extracted = tmp_path / "tfds" / "downloads" / "extracted"
  voc_root = extracted / "VOCtrainval_11-May-2012" / VOC_FOLDER
  assert sorted(p.name for p in (voc_root / "JPEGImages").iterdir()) == [f"gen_{i:05d}.jpg" for i in range(5)]
  assert not (voc_root / "Annotations").exists()
  assert not (extracted / "benchmark" / "benchmark_RELEASE" / "benchmark_code_RELEASE").exists()
  capsys.readouterr()
  monkeypatch.setattr(sys, "argv", ["tfds_voc", "--manual-dir", str(archives), "--data-dir",
                                    str(tmp_path / "tfds"), "--config", "voc2012"])
  tfds_voc.main()
  out = capsys.readouterr().out
  assert "extracting" not in out  # the extracted files are reused
  assert "(train 3, val 2 examples)" in out
  builder = tfds.builder("voc_segmentation/voc2012", data_dir=tmp_path / "tfds")
  assert sorted(records(builder, "train")) == ["gen_00000", "gen_00001", "gen_00002"]


def test_missing_or_broken_inputs_raise_data_error_naming_them(manual, tmp_path):
  folders, archives = manual
  lacking = tmp_path / "lacking"
  shutil.copytree(folders / "VOCdevkit", lacking / "VOCdevkit")
  with pytest.raises(DataError, match=f"{lacking}: holds neither {SBD_ARCHIVE} nor {SBD_FOLDER}/"):
    tfds_voc.prepare(lacking, tmp_path / "tfds1", "train_aug")
  with pytest.raises(DataError, match="no such manual directory"):
    tfds_voc.prepare(tmp_path / "nowhere", tmp_path / "tfds1")

  truncated = tmp_path / "truncated"
  truncated.mkdir()
  shutil.copy(archives / VOC_ARCHIVE, truncated)
  data = (archives / SBD_ARCHIVE).read_bytes()
  (truncated / SBD_ARCHIVE).write_bytes(data[:len(data) // 2])
  with pytest.raises(DataError, match=f"{truncated / SBD_ARCHIVE}: cannot read the archive"):
    tfds_voc.prepare(truncated, tmp_path / "tfds2", "train_aug")
  (truncated / VOC_ARCHIVE).write_bytes(b"<html>404</html>")
  with pytest.raises(DataError, match=f"{truncated / VOC_ARCHIVE}: cannot read the archive"):
    tfds_voc.prepare(truncated, tmp_path / "tfds3")

  broken = tmp_path / "broken"
  shutil.copytree(folders, broken)
  (broken / SBD_FOLDER / "inst" / "sbd_b.mat").write_bytes(b"")
  with pytest.raises(DataError, match=r"inst/sbd_b.mat: cannot read as a MATLAB .mat file"):
    tfds_voc.prepare(broken, tmp_path / "tfds4", "train_aug")
