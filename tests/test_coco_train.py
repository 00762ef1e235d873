"""train.py and evaluate.py on a tiny COCO folder, then COCO -> VOC fine-tuning, end to end."""

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from deconvnet_jax.cli import evaluate
from deconvnet_jax.cli import train
from deconvnet_jax import checkpoints
from deconvnet_jax.data import coco
from deconvnet_jax.data.generated import generate, make_example
from deconvnet_jax.labels import VOC_CLASSES

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# The generated shapes' VOC classes as COCO categories (id, name), plus one COCO has and VOC has not.
COCO_OF_VOC = {1: (5, "airplane"), 6: (6, "bus"), 8: (17, "cat"), 15: (1, "person"), 20: (72, "tv")}
CATEGORIES = [{"id": i, "name": n, "supercategory": "x"} for i, n in COCO_OF_VOC.values()] + [
    {"id": 25, "name": "giraffe", "supercategory": "animal"}]


def write_split(root, split: str, n: int, rng):
  """n generated images with one RLE annotation per instance, a giraffe polygon and a crowd region."""
  (root / split).mkdir(parents=True)
  images, anns = [], []
  for image_id in range(1, n + 1):
    image, label, instances = make_example(rng, 64, 96, 3)
    h, w = label.shape
    Image.fromarray(image).save(root / split / f"{image_id:06d}.jpg", quality=95)
    images.append({"id": image_id, "file_name": f"{image_id:06d}.jpg", "height": h, "width": w})
    for k in np.unique(instances[(instances > 0) & (instances < 255)]):
      mask = instances == k
      rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
      anns.append({"id": len(anns) + 1, "image_id": image_id, "iscrowd": 0, "area": int(mask.sum()),
                   "category_id": COCO_OF_VOC[int(np.bincount(label[mask]).argmax())][0],
                   "segmentation": {"size": [h, w], "counts": rle["counts"].decode()},
                   "bbox": [float(v) for v in mask_utils.toBbox(rle)]})
    anns.append({"id": len(anns) + 1, "image_id": image_id, "iscrowd": 0, "category_id": 25, "area": 16.0,
                 "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4]], "bbox": [0, 0, 4, 4]})
    if image_id == 1:
      anns.append({"id": len(anns) + 1, "image_id": 1, "iscrowd": 1, "category_id": 1, "area": 36.0,
                   "segmentation": [[w - 6, h - 6, w, h - 6, w, h, w - 6, h]], "bbox": [w - 6, h - 6, 6, 6]})
  (root / "annotations").mkdir(exist_ok=True)
  (root / "annotations" / f"instances_{split}.json").write_text(
      json.dumps({"images": images, "annotations": anns, "categories": CATEGORIES}))


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("coco")
  rng = np.random.default_rng(0)
  write_split(root, "train2017", 8, rng)
  write_split(root, "val2017", 3, rng)
  return root


def test_coco_labels_agree_with_the_generated_masks(coco_root):
  ds = coco.CocoDataset(coco_root, "train2017", "voc")
  ex = ds[0]
  assert ex.label[-1, -1] == 255  # the crowd region is void
  assert ex.label[0, 0] in (0, 255) and 25 not in ex.label  # the giraffe is background
  assert set(np.unique(ex.label)) <= {0, 1, 6, 8, 15, 20, 255}
  assert len(ds.instances(0).ids) == len(ex.ids) > 0


def test_train_on_coco_then_evaluate_then_fine_tune_on_voc(coco_root, tmp_path, capsys):
  common = ["--crop", "64", "--batch-size", "2", "--save-every", "4", "--eval-every", "4"]
  assert train.main(["--coco", str(coco_root), "--class-map", "voc", "--steps", "4", "--val-limit", "2",
                     "--workdir", str(tmp_path / "coco")] + common) == 0
  out = capsys.readouterr().out
  assert "COCO train2017 (voc class map, 21 classes): 8 images" in out
  assert "training on COCO train2017: 8 images; validating on COCO val2017 (first 2): 2 images" in out
  assert "stage 1:" in out  # instance-centred crops from the COCO instances
  meta = checkpoints.read_meta(tmp_path / "coco")
  assert meta["class_names"] == list(VOC_CLASSES) and meta["train_config"]["data"]["coco_class_map"] == "voc"
  record = json.loads((tmp_path / "coco" / "metrics.jsonl").read_text().splitlines()[-1])
  assert record["step"] == 4 and len(record["val_iou"]) == 21 and np.isfinite(record["loss"])

  assert evaluate.main(["--checkpoint", str(tmp_path / "coco"), "--coco", str(coco_root),
                        "--top-k", "2", "--limit", "2", "--output", str(tmp_path / "eval")]) == 0
  results = json.loads((tmp_path / "eval" / "results.json").read_text())
  assert results["split"] == "val2017" and results["images"] == 2
  assert len(results["variants"]["DeconvNet+CRF"]["iou"]) == 21

  voc = generate(tmp_path / "voc", num_train=4, num_val=2, seed=3, image_size=(64, 64))
  assert train.main(["--data", str(voc), "--init-from", str(tmp_path / "coco"), "--steps", "2",
                     "--workdir", str(tmp_path / "voc_ft")] + common) == 0
  assert "initialised from" in capsys.readouterr().out


def test_train_with_all_80_coco_classes(coco_root, tmp_path):
  assert train.main(["--coco", str(coco_root), "--class-map", "coco", "--steps", "1", "--crop", "64",
                     "--batch-size", "2", "--eval-every", "100", "--save-every", "100",
                     "--workdir", str(tmp_path)]) == 0
  meta = checkpoints.read_meta(tmp_path)
  # The file's 6 categories by id: person, airplane, bus, cat, giraffe, tv (+ background).
  assert meta["model"]["num_classes"] == 7 and meta["class_names"][:3] == ["background", "person", "airplane"]
