"""The data layer: VOC, train_aug (VOC + SBD) and TFDS splits read lazily; cached item lists; named errors;
train.py / evaluate.py running from VOC + SBD folders and from a prepared TFDS folder."""

import argparse
import dataclasses
import json

import numpy as np
import pytest
from test_sbd import TRAIN_AUG, make_voc_and_sbd

from deconvnet_jax.cli import evaluate
from deconvnet_jax.cli import train
from deconvnet_jax import checkpoints, configs, proposals, train_loop, training
from deconvnet_jax.configs import DataConfig, TrainConfig
from deconvnet_jax.data import items as items_lib
from deconvnet_jax.data import sources, tfds_voc, voc
from deconvnet_jax.labels import DataError


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
  """(VOC2012 folder, SBD dataset folder, TFDS data dir with train_aug prepared from them)."""
  root = tmp_path_factory.mktemp("layer")
  voc_root, sbd = make_voc_and_sbd(root / "manual")
  tfds_voc.prepare(root / "manual", root / "tfds", "train_aug")
  return voc_root, sbd, root / "tfds"


def assert_same_example(a, b):
  assert a.image_id == b.image_id
  for field in ("image", "label", "instances", "boxes", "classes", "ids"):
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)


def assert_headers_match(split):
  """instances(i) and size(i), which decode no image, agree with the decoded example."""
  for i in range(len(split)):
    ex, header = split[i], split.instances(i)
    np.testing.assert_array_equal(header.ids, ex.ids)
    np.testing.assert_array_equal(header.boxes, ex.boxes)
    np.testing.assert_array_equal(header.classes, ex.classes)
    assert split.size(i) == ex.label.shape and split.image_id(i) == ex.image_id


def test_train_aug_split_reads_voc_where_both_have_the_image_and_excludes_voc_val(roots):
  voc_root, sbd, _ = roots
  split = sources.open_split(DataConfig(root=voc_root, sbd=sbd), "train_aug")
  assert [split.image_id(i) for i in range(len(split))] == [i for _, i in TRAIN_AUG]
  assert not {"gen_00003", "gen_00004"} & {split.image_id(i) for i in range(len(split))}  # VOC val
  both = [split.image_id(i) for i in range(len(split))].index("gen_00001")  # in VOC train and SBD
  assert_same_example(split[both], voc.read_example(voc_root, "gen_00001"))
  assert np.any(split[both].label == 255)  # VOC's void band: not SBD's annotation
  sbd_only = [split.image_id(i) for i in range(len(split))].index("sbd_a")
  assert_same_example(split[sbd_only], voc.read_sbd_example(sbd, "sbd_a"))
  assert_headers_match(split)
  val = sources.open_split(DataConfig(root=voc_root, sbd=sbd), "val")
  assert [val.image_id(i) for i in range(len(val))] == ["gen_00003", "gen_00004"]


def test_tfds_split_gives_the_folder_examples_without_tensorflow(roots):
  voc_root, sbd, tfds_dir = roots
  folders = sources.open_split(DataConfig(root=voc_root, sbd=sbd), "train_aug")
  records = sources.open_split(DataConfig(kind="tfds", root=tfds_dir), "train")
  assert len(records) == len(folders) == len(TRAIN_AUG)
  by_id = {records[i].image_id: records[i] for i in range(len(records))}
  for i in range(len(folders)):
    assert_same_example(by_id[folders.image_id(i)], folders[i])
  assert_headers_match(records)
  val = sources.open_split(DataConfig(kind="tfds", root=tfds_dir), "val")
  assert sorted(val[i].image_id for i in range(len(val))) == ["gen_00003", "gen_00004"]
  with pytest.raises(DataError, match="no split 'test'"):
    sources.open_split(DataConfig(kind="tfds", root=tfds_dir), "test")


def test_a_cache_hit_skips_the_instance_pass(roots, tmp_path, monkeypatch, capsys):
  voc_root, sbd, _ = roots
  split = sources.open_split(DataConfig(root=voc_root, sbd=sbd), "train_aug")
  cfg = TrainConfig(stage=1)
  first = train_loop.stage_items(cfg, split, tmp_path)
  assert "computed in" in capsys.readouterr().out
  expected = [(i, tuple(float(v) for v in box), int(n)) for i in range(len(split))
              for box, n in zip(split[i].boxes, split[i].ids)]
  assert [(it.index, it.box, it.instance) for it in first] == expected

  def no_decoding(i):
    raise AssertionError("the instance pass ran despite the cache")

  monkeypatch.setattr(split, "instances", no_decoding)
  monkeypatch.setattr(split, "__getitem__", no_decoding)
  again = train_loop.stage_items(cfg, split, tmp_path)
  assert again == first and "cached in" in capsys.readouterr().out
  # Other settings or other data are another key: computed again.
  with pytest.raises(AssertionError, match="despite the cache"):
    train_loop.stage_items(TrainConfig(stage=2, stage2_iou=0.6), split, tmp_path)
  other = sources.open_split(DataConfig(root=voc_root), "train")
  assert len(train_loop.stage_items(cfg, other, tmp_path)) < len(first)
  assert len(list(tmp_path.glob("items-*.npz"))) == 2


def test_a_damaged_cache_is_recomputed(roots, tmp_path):
  voc_root, _, _ = roots
  split = sources.open_split(DataConfig(root=voc_root), "train")
  key = items_lib.cache_key(split, stage=1)
  items, path, hit = items_lib.cached(tmp_path, key, lambda: items_lib.stage1_items(split))
  assert not hit
  path.write_bytes(path.read_bytes()[:40])
  again, _, hit = items_lib.cached(tmp_path, key, lambda: items_lib.stage1_items(split))
  assert not hit and again == items


def data_args(*argv):
  parser = argparse.ArgumentParser()
  sources.add_arguments(parser)
  return parser.parse_args(argv)


def test_bad_setups_give_errors_naming_the_path(roots, tmp_path):
  voc_root, sbd, tfds_dir = roots
  with pytest.raises(DataError, match=f"--sbd {tmp_path / 'nowhere'}: not an SBD folder"):
    sources.from_arguments(data_args("--data", str(voc_root), "--sbd", str(tmp_path / "nowhere")))
  with pytest.raises(DataError, match=f"--sbd {sbd}: SBD adds to a VOC 2012 folder; give --data"):
    sources.from_arguments(data_args("--sbd", str(sbd)))
  with pytest.raises(DataError, match="SBD joins a VOC folder"):
    sources.from_arguments(data_args("--tfds", str(tfds_dir), "--sbd", str(sbd)))
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match=f"{tmp_path / 'empty'}: holds no prepared voc_segmentation/train_aug"
                                      r".*python -m deconvnet_jax.data.tfds_voc .*--config train_aug"):
    sources.from_arguments(data_args("--tfds", str(tmp_path / "empty")))
  with pytest.raises(DataError, match="holds no prepared voc_segmentation/voc2012"):
    sources.from_arguments(data_args("--tfds", str(tfds_dir), "--tfds-config", "voc2012"))
  with pytest.raises(DataError, match="no such TFDS data dir"):
    sources.from_arguments(data_args("--tfds", str(tmp_path / "nowhere")))
  with pytest.raises(DataError, match="name two datasets"):
    sources.from_arguments(data_args("--data", str(voc_root), "--tfds", str(tfds_dir)))
  with pytest.raises(DataError, match=f"{voc_root}: the train_aug split needs SBD"):
    sources.open_split(DataConfig(root=voc_root), "train_aug")
  assert sources.from_arguments(data_args("--data", str(voc_root), "--sbd", str(sbd))) == DataConfig(
      root=voc_root, sbd=sbd, train_split="train_aug")


def test_train_py_reports_a_bad_setup_and_exits_2(roots, tmp_path, capsys):
  voc_root, _, _ = roots
  assert train.main(["--data", str(voc_root), "--sbd", str(tmp_path / "nowhere"),
                     "--workdir", str(tmp_path / "run")]) == 2
  assert f"error: --sbd {tmp_path / 'nowhere'}: not an SBD folder" in capsys.readouterr().err
  assert not (tmp_path / "run").exists()


def run(workdir, data_flags, stage, *more):
  """Trains 2 steps; returns the checkpoint's meta, after checking its typed config is the one asked for."""
  argv = [*data_flags, "--workdir", str(workdir), "--stage", str(stage), "--steps", "2", "--crop", "64",
          "--batch-size", "2", "--eval-every", "2", "--save-every", "2", *more]
  assert train.main(argv) == 0
  meta = checkpoints.read_meta(workdir)
  assert configs.train_config(meta) == train.parse_args(argv)  # stored and restored, typed
  return meta


@pytest.mark.parametrize("kind", ["folders", "tfds"])
def test_stage1_then_stage2_train_on_train_aug(roots, tmp_path, kind, capsys):
  voc_root, sbd, tfds_dir = roots
  flags = (["--data", str(voc_root), "--sbd", str(sbd)] if kind == "folders"
           else ["--tfds", str(tfds_dir)])
  meta = run(tmp_path / "s1", flags, 1)
  out = capsys.readouterr().out
  name = "train_aug (VOC + SBD)" if kind == "folders" else "voc_segmentation/train_aug train"
  assert f"training on {name}: {len(TRAIN_AUG)} images" in out and "stage 1: " in out
  saved = configs.train_config(meta)  # the typed config comes back from the checkpoint
  assert saved.data.kind == ("voc" if kind == "folders" else "tfds") and saved.data.train_split == (
      "train_aug" if kind == "folders" else "train")
  assert saved.crop == 64 and saved.stage == 1 and saved.model.num_classes == 21
  meta = run(tmp_path / "s2", flags, 2, "--init-from", str(tmp_path / "s1"))
  assert meta["step"] == 2 and "stage 2: " in capsys.readouterr().out
  assert configs.train_config(meta).stage == 2
  assert len(list((tmp_path / "s2" / "items").glob("items-*.npz"))) == 1


def test_evaluate_from_tfds_val_defaults_to_the_checkpoints_data(roots, tmp_path, capsys):
  _, _, tfds_dir = roots
  run(tmp_path / "run", ["--tfds", str(tfds_dir)], 1)
  assert evaluate.main(["--checkpoint", str(tmp_path / "run"), "--top-k", "2", "--crf-processes", "1",
                        "--output", str(tmp_path / "eval")]) == 0
  assert "2 images of voc_segmentation/train_aug val" in capsys.readouterr().out
  results = json.loads((tmp_path / "eval" / "results.json").read_text())
  assert results["images"] == 2 and 0 <= results["variants"]["whole image"]["miou"] <= 1
  assert sorted(p.stem for p in (tmp_path / "eval" / "cache" / "val").glob("*/*.npz")) == [
      "gen_00003", "gen_00004"]


def test_stage2_items_from_user_box_files(roots, tmp_path):
  """Box files holding each image's ground-truth boxes (x0, y0, x1, y1) and a far-off box: stage 2 keeps
  exactly the ground-truth ones."""
  voc_root, sbd, _ = roots
  split = sources.open_split(DataConfig(root=voc_root, sbd=sbd), "train_aug")
  boxes_dir = tmp_path / "boxes"
  boxes_dir.mkdir()
  for i in range(len(split)):
    gt = split.instances(i).boxes
    rows = [[x0, y0, x1, y1] for y0, x0, y1, x1 in gt.tolist()] + [[0, 0, 2, 2]]
    (boxes_dir / f"{split.image_id(i)}.json").write_text(json.dumps(rows))
  cfg = TrainConfig(stage=2, proposals_from=boxes_dir)
  items = train_loop.stage_items(cfg, split, tmp_path / "items")
  want = [(i, tuple(float(v) for v in box)) for i in range(len(split)) for box in split.instances(i).boxes]
  assert [(it.index, it.box) for it in items] == want and all(it.instance == 0 for it in items)
  (boxes_dir / f"{split.image_id(0)}.json").write_text("[[0, 0, 1000, 5]]")
  with pytest.raises(Exception, match=f"{split.image_id(0)}.json: box 0 .* lies outside"):
    train_loop.stage_items(cfg, split, None)


def test_stage2_items_from_each_generator_are_cached_apart(roots, tmp_path):
  voc_root, sbd, _ = roots
  split = sources.Subset(sources.open_split(DataConfig(root=voc_root, sbd=sbd), "train_aug"), 3)
  cfg = train.parse_args(["--stage", "2", "--proposals", "edge_boxes"])
  assert cfg.proposals == "edge_boxes"
  cache = tmp_path / "items"
  got = {}
  for generator in ("windows", "edge_boxes"):
    cfg = dataclasses.replace(cfg, proposals=generator)
    items = train_loop.stage_items(cfg, split, cache)
    want = items_lib.stage2_items(split, lambda i: proposals.propose(split[i].image, generator=generator)[0],
                                  cfg.stage2_iou, cfg.proposals_per_image)
    assert [(it.index, it.box, it.instance) for it in items] == [(it.index, it.box, it.instance) for it in want]
    got[generator] = {(it.index, it.box) for it in items}
  assert got["windows"] != got["edge_boxes"]
  assert len(list(cache.glob("items-*.npz"))) == 2  # one cache entry per generator
  with pytest.raises(train_loop.TrainError, match="--proposals 'network': stage 2 takes one of"):
    train_loop.check_settings(dataclasses.replace(cfg, proposals="network"), training.make_mesh())


def test_the_generated_dataset_names_its_shapes_and_a_bad_names_file_is_named(tmp_path):
  from deconvnet_jax.data import generated
  root = generated.generate(tmp_path / "gen", num_train=2, num_val=1, seed=0, image_size=(32, 32))
  split = sources.open_split(DataConfig(root=root), "train")
  assert split.class_names[:2] == ("background", "triangle") and len(split.class_names) == 21
  assert {split.class_names[c] for c in generated.CLASSES} == {"triangle", "rectangle", "ellipse", "cross", "ring"}
  (root / "class_names.txt").write_text("background\n\ncat\n")
  with pytest.raises(DataError, match=r"class_names.txt: expected one class name per line"):
    sources.open_split(DataConfig(root=root), "train")
