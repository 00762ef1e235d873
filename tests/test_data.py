"""VOC-layout reading and the generated dataset."""

import numpy as np
import pytest
from PIL import Image

from deconvnet_jax.data.generated import CLASSES, generate
from deconvnet_jax.viz import palette_image
from deconvnet_jax.data.voc import read_example, read_split
from deconvnet_jax.labels import DataError, voc_colormap


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
  return generate(tmp_path_factory.mktemp("gen"), num_train=6, num_val=3, seed=3)


def test_voc_colormap_matches_published_entries():
  cmap = voc_colormap()
  assert cmap[0].tolist() == [0, 0, 0] and cmap[1].tolist() == [128, 0, 0]
  assert cmap[15].tolist() == [192, 128, 128] and cmap[255].tolist() == [224, 224, 192]


def test_generated_dataset_reads_back_consistently(generated):
  assert read_split(generated, "train") == [f"gen_{i:05d}" for i in range(6)]
  assert len(read_split(generated, "val")) == 3
  for image_id in read_split(generated, "trainval"):
    ex = read_example(generated, image_id)
    assert ex.image.dtype == np.uint8 and ex.image.shape[:2] == ex.label.shape == ex.instances.shape
    assert set(np.unique(ex.label)) <= {0, 255, *CLASSES}
    assert np.any(ex.label == 255)  # void band around objects
    # Every instance's pixels carry its class; the box is tight around them.
    for i, box, cls in zip(ex.ids, ex.boxes, ex.classes):
      ys, xs = np.nonzero(ex.instances == i)
      assert (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1) == tuple(box)
      assert np.all(ex.label[ys, xs] == cls)
    assert np.all((ex.instances == 0) == (ex.label == 0))
  a = read_example(generated, "gen_00001")
  b = read_example(generate(generated.parent / "again", 6, 3, seed=3), "gen_00001")
  np.testing.assert_array_equal(a.image, b.image)


def test_bad_files_are_named(generated, tmp_path):
  with pytest.raises(DataError, match="no such dataset folder"):
    read_split(tmp_path / "nowhere", "train")
  with pytest.raises(DataError, match=r"test.txt: split file not found"):
    read_split(generated, "test")
  with pytest.raises(DataError, match=r"JPEGImages/missing.jpg: image file not found"):
    read_example(generated, "missing")
  image_id = "gen_00000"
  label_path = generated / "SegmentationClass" / f"{image_id}.png"
  original = label_path.read_bytes()
  try:
    label = np.asarray(Image.open(label_path))
    Image.fromarray(voc_colormap()[label]).save(label_path)  # an RGB rendering of the mask
    with pytest.raises(DataError, match=f"{image_id}.png: mask is RGB"):
      read_example(generated, image_id)
    palette_image(np.full_like(label, 30)).save(label_path)
    with pytest.raises(DataError, match=r"class indices \[30\] outside 0..20"):
      read_example(generated, image_id)
    palette_image(label[:-1]).save(label_path)
    with pytest.raises(DataError, match="but its image is"):
      read_example(generated, image_id)
  finally:
    label_path.write_bytes(original)
