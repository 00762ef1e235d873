"""COCO reading: class maps, crowd, overlaps, lazy metadata, skips and bad input, on a tiny COCO written here."""

import json
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image

from deconvnet_jax.data.coco import CocoDataset
from deconvnet_jax.data.examples import CropSpec, crop_item
from deconvnet_jax.data.items import stage1_items
from deconvnet_jax.labels import VOC_CLASSES, DataError

# pycocotools' decode trips NumPy 2's __array__(copy=) deprecation; nothing of ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SPLIT = "val2017"
PERSON, DOG, TV = (VOC_CLASSES.index(n) for n in ("person", "dog", "tvmonitor"))
CATEGORIES = [{"id": 7, "name": "person"}, {"id": 3, "name": "dog"}, {"id": 25, "name": "giraffe"},
              {"id": 12, "name": "tv"}]
COCO_NAMES = ("background", "dog", "person", "tv", "giraffe")  # by category id: 3, 7, 12, 25


def rect(x0, y0, x1, y1):
  return [x0, y0, x1, y0, x1, y1, x0, y1]


def runs(mask: np.ndarray) -> list[int]:
  """COCO's uncompressed RLE counts: alternating 0 / 1 run lengths, column-major, starting with 0s."""
  flat = mask.ravel(order="F").astype(int)
  edges = np.flatnonzero(np.diff(flat)) + 1
  lengths = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
  return [0] + lengths if flat[0] else lengths


def tv_mask():  # an L shape in image 1, given as a compressed RLE string
  m = np.zeros((40, 60), np.uint8)
  m[2:8, 45:55] = 1
  m[8:12, 45:48] = 1
  return m


def crowd_mask():  # a crowd of people in image 1, given as uncompressed RLE counts
  m = np.zeros((40, 60), np.uint8)
  m[32:39, 40:59] = 1
  return m


def annotation(ann_id, image_id, category_id, segmentation, crowd=0):
  return {"id": ann_id, "image_id": image_id, "category_id": category_id, "iscrowd": crowd,
          "segmentation": segmentation, "area": 0.0, "bbox": [0, 0, 0, 0]}


def coco_dict():
  """Image 1: overlaps, crowd, RLEs, a border polygon; 2: a hidden instance and a tie; 3: only a
  giraffe; 4: nothing."""
  images = [{"id": 1, "file_name": "000001.jpg", "height": 40, "width": 60},
            {"id": 2, "file_name": "000002.jpg", "height": 30, "width": 50},
            {"id": 3, "file_name": "000003.jpg", "height": 20, "width": 20},
            {"id": 4, "file_name": "000004.jpg", "height": 20, "width": 30}]
  tv = mask_utils.encode(np.asfortranarray(tv_mask()))["counts"].decode()
  anns = [annotation(10, 1, 7, [rect(5, 4, 35, 30)]),  # person, 780 px
          annotation(11, 1, 3, [rect(20, 10, 30, 20)]),  # dog on the person, 100 px
          annotation(12, 1, 25, [rect(30, 15, 50, 35)]),  # giraffe over the person's right edge
          annotation(13, 1, 7, {"size": [40, 60], "counts": runs(crowd_mask())}, crowd=1),
          annotation(14, 1, 12, {"size": [40, 60], "counts": tv}),
          annotation(15, 1, 7, [rect(-0.4, 33, 8, 40.6)]),  # past the border by < 1 px
          annotation(20, 2, 3, [rect(10, 10, 20, 20)]),  # dog, covered by the two people:
          annotation(21, 2, 7, [rect(10, 10, 15, 20)]),
          annotation(22, 2, 7, [rect(15, 10, 20, 20)]),
          annotation(24, 2, 12, [rect(30, 2, 40, 8)]),  # two identical tvs: 23 wins the tie
          annotation(23, 2, 12, [rect(30, 2, 40, 8)]),
          annotation(25, 2, 3, [rect(0, 22, 4, 26), rect(44, 22, 48, 28)]),  # one dog, two parts
          annotation(26, 2, 25, [rect(44, 2, 50, 6)], crowd=1),  # giraffes: void under "coco" only
          annotation(30, 3, 25, [rect(2, 2, 10, 10)])]
  return {"images": images, "annotations": anns, "categories": CATEGORIES}


def write_coco(root, data, skip_files=()):
  (root / "annotations").mkdir(parents=True)
  (root / SPLIT).mkdir()
  rng = np.random.default_rng(0)
  for im in data["images"]:
    if im["file_name"] not in skip_files:
      pixels = rng.integers(0, 256, (im["height"], im["width"], 3), np.uint8)
      Image.fromarray(pixels).save(root / SPLIT / im["file_name"], quality=90)
  (root / "annotations" / f"instances_{SPLIT}.json").write_text(json.dumps(data))
  return root


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return write_coco(tmp_path_factory.mktemp("coco"), coco_dict())


def expected_image1(class_map):
  """Image 1's masks painted by hand, smaller regions last."""
  coco = class_map == "coco"
  label, inst = np.zeros((40, 60), np.uint8), np.zeros((40, 60), np.uint8)
  person = COCO_NAMES.index("person") if coco else PERSON
  label[4:30, 5:35], inst[4:30, 5:35] = person, 1  # ann 10
  if coco:  # the giraffe (400 px) covers the person (780 px) where they meet
    label[15:35, 30:50], inst[15:35, 30:50] = 4, 3
  label[10:20, 20:30], inst[10:20, 20:30] = COCO_NAMES.index("dog") if coco else DOG, 2
  crowd = crowd_mask() > 0  # 133 px, over the giraffe too
  label[crowd], inst[crowd] = 255, 255
  tv = tv_mask() > 0
  label[tv], inst[tv] = COCO_NAMES.index("tv") if coco else TV, 4 if coco else 3
  label[33:40, 0:8], inst[33:40, 0:8] = person, 5 if coco else 4  # -0.4 rounds to 0, 40.6 clips
  return label, inst


@pytest.mark.parametrize("class_map", ["voc", "coco"])
def test_image_with_overlaps_crowd_and_rles(root, class_map):
  ds = CocoDataset(root, SPLIT, class_map=class_map)
  ex = ds[0]
  assert ex.image_id == "1" and ex.image.shape == (40, 60, 3) and ex.image.dtype == np.uint8
  label, inst = expected_image1(class_map)
  np.testing.assert_array_equal(ex.label, label)
  np.testing.assert_array_equal(ex.instances, inst)
  assert ex.label.dtype == ex.instances.dtype == np.uint8
  tv_box = (2, 45, 12, 55)
  if class_map == "voc":
    assert ex.ids.tolist() == [1, 2, 3, 4] and ex.classes.tolist() == [PERSON, DOG, TV, PERSON]
    assert ex.boxes.tolist() == [[4, 5, 30, 35], [10, 20, 20, 30], list(tv_box), [33, 0, 40, 8]]
  else:
    assert ex.ids.tolist() == [1, 2, 3, 4, 5] and ex.classes.tolist() == [2, 1, 4, 3, 2]
    assert ex.boxes.tolist() == [[4, 5, 30, 35], [10, 20, 20, 30], [15, 30, 35, 50], list(tv_box),
                                 [33, 0, 40, 8]]
  assert all(b.dtype == np.int32 for b in (ex.ids, ex.boxes, ex.classes))


def test_class_maps(root):
  voc, coco = CocoDataset(root, SPLIT), CocoDataset(root, SPLIT, class_map="coco")
  assert voc.class_names == VOC_CLASSES and voc.num_classes == 21
  assert coco.class_names == COCO_NAMES and coco.num_classes == 5
  # Image 3 holds only a giraffe: no object under "voc", class 4 under "coco".
  assert voc.image_ids == (1, 2) and coco.image_ids == (1, 2, 3)
  ex = coco[2]
  assert ex.label[2:10, 2:10].tolist() == np.full((8, 8), 4).tolist() and ex.label.sum() == 64 * 4
  crowd = (slice(2, 6), slice(44, 50))
  assert np.all(coco[1].label[crowd] == 255) and np.all(coco[1].instances[crowd] == 255)
  assert not voc[1].label[crowd].any() and not voc[1].instances[crowd].any()
  everything = CocoDataset(root, SPLIT, skip_empty=False)
  assert everything.image_ids == (1, 2, 3, 4)
  assert not everything[2].label.any() and everything[2].ids.size == 0
  assert everything[3].boxes.shape == (0, 4)
  with pytest.raises(ValueError, match="unknown class map 'ade'"):
    CocoDataset(root, SPLIT, class_map="ade")


def test_hidden_instance_keeps_its_entry_and_ties_go_to_the_lower_id(root):
  ds = CocoDataset(root, SPLIT)
  ex = ds[1]
  # Annotation order: 20 (dog, hidden by 21 and 22), 21, 22, 23, 24 (hidden: same pixels as 23), 25.
  assert ex.ids.tolist() == [1, 2, 3, 4, 5, 6]
  assert ex.classes.tolist() == [DOG, PERSON, PERSON, TV, TV, DOG]
  assert ex.boxes.tolist() == [[10, 10, 20, 20], [10, 10, 20, 15], [10, 15, 20, 20], [2, 30, 8, 40],
                               [2, 30, 8, 40], [22, 0, 28, 48]]
  inst = np.zeros((30, 50), np.uint8)
  inst[10:20, 10:15], inst[10:20, 15:20], inst[2:8, 30:40] = 2, 3, 4
  inst[22:26, 0:4], inst[22:28, 44:48] = 6, 6
  np.testing.assert_array_equal(ex.instances, inst)
  label = np.zeros((30, 50), np.uint8)
  label[10:20, 10:20], label[2:8, 30:40], label[inst == 6] = PERSON, TV, DOG
  np.testing.assert_array_equal(ex.label, label)


@pytest.mark.parametrize("class_map", ["voc", "coco"])
def test_metadata_needs_no_decoding_and_matches_it(root, class_map):
  ds = CocoDataset(root, SPLIT, class_map=class_map)
  for i in range(len(ds)):
    ex, meta = ds[i], ds.instances(i)
    for a, b in zip((ex.ids, ex.boxes, ex.classes), meta):
      np.testing.assert_array_equal(a, b)
    assert ds.size(i) == ex.label.shape and ds.image_file(i).name == f"{ds.image_ids[i]:06d}.jpg"
  assert [e.image_id for e in ds] == [str(i) for i in ds.image_ids]
  with pytest.raises(IndexError):
    ds[len(ds)]


def test_polygon_boxes_hold_their_pixels(tmp_path):
  """Random polygons: each instance's pixels lie inside its box (from the polygon's extent)."""
  rng = np.random.default_rng(1)
  images, anns = [], []
  for i in range(1, 4):
    images.append({"id": i, "file_name": f"{i}.jpg", "height": 30, "width": 40})
    for k in range(4):
      centre = rng.uniform((5, 5), (35, 25))
      points = centre + rng.uniform(-8, 8, (rng.integers(3, 7), 2))
      points = np.clip(points, -0.9, (40.9, 30.9))
      anns.append(annotation(10 * i + k, i, 7, [points.ravel().round(2).tolist()]))
  ds = CocoDataset(write_coco(tmp_path, {"images": images, "annotations": anns,
                                         "categories": CATEGORIES}), SPLIT)
  for ex in ds:
    for n, (y0, x0, y1, x1) in zip(ex.ids, ex.boxes):
      assert 0 <= y0 < y1 <= 30 and 0 <= x0 < x1 <= 40
      ys, xs = np.nonzero(ex.instances == n)
      assert np.all((ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1))


def test_decoding_from_threads_matches_sequential(root):
  ds = CocoDataset(root, SPLIT, class_map="coco")
  with ThreadPoolExecutor(4) as pool:
    parallel = list(pool.map(ds.__getitem__, [0, 1, 2] * 4))
  for ex, again in zip(parallel, [ds[i] for i in [0, 1, 2] * 4]):
    np.testing.assert_array_equal(ex.label, again.label)
    np.testing.assert_array_equal(ex.instances, again.instances)


def test_stage1_items_and_crops_from_coco(root):
  ds = CocoDataset(root, SPLIT)
  examples = list(ds)
  items = stage1_items(examples)
  assert items == stage1_items([ds.instances(i) for i in range(len(ds))])  # without decoding
  assert len(items) == 4 + 6
  spec = CropSpec(resize=40, crop=32)
  image, label, valid = crop_item(examples[items[1].index], items[1], spec, np.random.default_rng(0))
  assert image.shape == (32, 32, 3) and label.shape == valid.shape == (32, 32)
  assert set(np.unique(label)) <= {0, DOG, 255} and DOG in label  # only the centred dog keeps its class


def test_skips_are_counted_and_summarised(root):
  ds = CocoDataset(root, SPLIT)
  assert len(ds) == 2 and ds.skipped == {"no objects of the chosen classes": 2}
  assert ds.summary() == ("COCO val2017 (voc class map, 21 classes): 2 images; "
                          "skipped no objects of the chosen classes: 2")


BAD_ANNOTATIONS = {  # annotation 99 on image 1 -> (segmentation, crowd, message)
    "empty polygon list": ([], 0, "empty polygon list"),
    "two points (pycocotools would read a box)": ([[1, 1, 20, 20]], 0, "at least 3"),
    "odd coordinate count": ([[1, 1, 20, 1, 20]], 0, "at least 3"),
    "not numbers": ([[1, 1, 20, "a", 3, 4]], 0, "at least 3"),
    "zero area (COCO's annotation 918)": ([[29.65, 38.33, 29.65, 38.33, 30.68, 38.33, 30.68, 38.33]],
                                          0, "zero-area"),
    "past the border": ([rect(50, 5, 61.5, 10)], 0, "outside the 60x40 image by more than 1 px"),
    "RLE of another size": ({"size": [40, 61], "counts": [10, 5, 2425]}, 1, r"RLE size \[40, 61\]"),
    "RLE runs too short": ({"size": [40, 60], "counts": [10, 5, 100]}, 1, "runs sum to 115"),
    "RLE string too short": ({"size": [40, 60], "counts": "52"}, 0, "runs sum to"),
    "RLE string malformed": ({"size": [40, 60], "counts": "0\x7f"}, 0, "malformed string"),
    "empty RLE": ({"size": [40, 60], "counts": [2400]}, 1, "zero-area"),
    "not a segmentation": (17, 0, "must be a list of polygons or an RLE"),
    "iscrowd 2": ([rect(1, 1, 5, 5)], 2, "'iscrowd' must be 0 or 1"),
}


@pytest.mark.parametrize("case", BAD_ANNOTATIONS)
def test_bad_annotation_names_file_and_id_or_is_skipped(tmp_path, case):
  segmentation, crowd, message = BAD_ANNOTATIONS[case]
  data = coco_dict()
  data["annotations"].append(annotation(99, 1, 7, segmentation, crowd))
  root = write_coco(tmp_path, data)
  where = re.escape(f"{root / 'annotations' / 'instances_val2017.json'}: annotation 99 (image 1)")
  with pytest.raises(DataError, match=f"{where}.*{message}.*skip_bad=True"):
    CocoDataset(root, SPLIT)
  ds = CocoDataset(root, SPLIT, skip_bad=True)
  assert ds.image_ids == (2,) and ds.skipped["bad annotation"] == 1
  assert re.search(f"{where}.*{message}", ds.problems[0]) and "bad annotation: 1" in ds.summary()


def test_bad_annotation_of_an_unmapped_category_is_not_read_under_voc(tmp_path):
  data = coco_dict()
  data["annotations"].append(annotation(99, 1, 25, []))  # a giraffe
  root = write_coco(tmp_path, data)
  assert CocoDataset(root, SPLIT).image_ids == (1, 2)
  with pytest.raises(DataError, match="annotation 99 .*empty polygon list"):
    CocoDataset(root, SPLIT, class_map="coco")


def test_polygon_just_past_the_border_is_clipped(tmp_path):
  data = coco_dict()
  data["annotations"] = [annotation(1, 1, 7, [rect(52, -0.6, 60.9, 5)])]
  ex = CocoDataset(write_coco(tmp_path, data), SPLIT)[0]
  expected = np.zeros((40, 60), np.uint8)
  expected[0:5, 52:60] = PERSON  # -0.6 rounds to -1, 60.9 to 61: both clip to the image
  np.testing.assert_array_equal(ex.label, expected)
  assert ex.boxes.tolist() == [[0, 52, 5, 60]]


def test_unknown_category_and_unknown_image(tmp_path):
  data = coco_dict()
  data["annotations"] += [annotation(98, 2, 99, [rect(1, 1, 5, 5)]),
                          annotation(99, 77, 7, [rect(1, 1, 5, 5)])]
  root = write_coco(tmp_path, data)
  path = re.escape(str(root / "annotations" / "instances_val2017.json"))
  with pytest.raises(DataError, match=f"{path}: annotation 98 \\(image 2\\): category_id 99 is not in"):
    CocoDataset(root, SPLIT)
  data["annotations"].pop(-2)
  (root / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
  with pytest.raises(DataError, match=f"{path}: annotation 99: image_id 77 is not in 'images'"):
    CocoDataset(root, SPLIT)
  ds = CocoDataset(root, SPLIT, skip_bad=True)
  assert ds.image_ids == (1, 2) and ds.skipped["annotations of unknown images"] == 1


def test_too_many_instances(tmp_path):
  data = coco_dict()
  data["annotations"] = [annotation(k, 1, 3, [rect(k % 60, k // 60, k % 60 + 1, k // 60 + 1)])
                         for k in range(255)]
  root = write_coco(tmp_path, data)
  with pytest.raises(DataError, match="image 1 has 255 instances of the chosen classes"):
    CocoDataset(root, SPLIT)
  assert CocoDataset(root, SPLIT, skip_bad=True).skipped["too many instances"] == 1
  data["annotations"].pop()
  (root / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
  ex = CocoDataset(root, SPLIT)[0]
  expected = np.zeros(2400, np.uint8)
  expected[:254] = np.arange(1, 255)
  np.testing.assert_array_equal(ex.instances, expected.reshape(40, 60))


def test_missing_and_broken_image_files(tmp_path):
  root = write_coco(tmp_path, coco_dict(), skip_files=("000002.jpg",))
  image = root / SPLIT / "000002.jpg"
  with pytest.raises(DataError, match=f"{re.escape(str(image))}: image file not found "
                                      r"\(1 of the 2 images.*skip_bad=True"):
    CocoDataset(root, SPLIT)
  ds = CocoDataset(root, SPLIT, skip_bad=True)
  assert ds.image_ids == (1,) and ds.skipped["missing image file"] == 1
  # Found at load but unreadable or of another size when decoded: named then.
  (root / SPLIT / "000001.jpg").write_bytes(b"not a jpeg")
  with pytest.raises(DataError, match="000001.jpg: cannot decode image"):
    ds[0]
  Image.new("RGB", (60, 41)).save(root / SPLIT / "000001.jpg")
  with pytest.raises(DataError, match=r"000001.jpg: image is 60x41 but .*instances_val2017.json "
                                      r"says 60x40 \(image 1\)"):
    ds[0]
  (root / SPLIT).rename(root / "elsewhere")
  with pytest.raises(DataError, match=f"{re.escape(str(root / SPLIT))}: no such image folder"):
    CocoDataset(root, SPLIT)


@pytest.mark.parametrize("content, message", [
    (None, r"annotation file not found \(expected ROOT/annotations/instances_SPLIT.json; "
           r"found here: \['instances_train2017.json'\]"),
    ("{", "not valid JSON"),
    ("[]", "not a COCO instances file .top level is a list"),
    (json.dumps({"images": [], "annotations": []}), "not a COCO instances file: no categories"),
    (json.dumps({"images": {}, "annotations": [], "categories": []}), "'images' is a dict"),
    (json.dumps({"images": [{"id": 1, "height": 4, "width": 4}], "annotations": [],
                 "categories": CATEGORIES}), "image 1: 'file_name' must be a non-empty string"),
    (json.dumps({"images": [{"id": "1"}], "annotations": [], "categories": CATEGORIES}),
     r"images\[0\]: 'id' must be an integer"),
    (json.dumps({"images": [], "annotations": [{"id": 5, "image_id": 1}], "categories": CATEGORIES}),
     "annotation 5: 'category_id' must be an integer"),
    (json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "giraffe"}]}),
     "no category has a VOC class's COCO name"),
    (json.dumps({"images": [], "annotations": [], "categories": CATEGORIES + [CATEGORIES[0]]}),
     r"category 7 \('person'\) listed twice"),
])
def test_files_not_in_coco_instances_format(tmp_path, content, message):
  (tmp_path / "annotations").mkdir()
  (tmp_path / SPLIT).mkdir()
  (tmp_path / "annotations" / "instances_train2017.json").write_text("{}")
  path = tmp_path / "annotations" / f"instances_{SPLIT}.json"
  if content is not None:
    path.write_text(content)
  with pytest.raises(DataError, match=f"{re.escape(str(path))}: .*{message}"):
    CocoDataset(tmp_path, SPLIT)
