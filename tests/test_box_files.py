"""User-supplied proposals: JSON, CSV and NPY box files read in pixel (x0, y0, x1, y1); named errors."""

import json

import numpy as np
import pytest

from deconvnet_jax.box_files import BoxFileError, BoxFiles

# (x0, y0, x1, y1, score) in a 40 x 30 (W x H) image; the middle box scores best.
ROWS = [[0, 0, 20, 10, 0.5], [5, 5, 40, 30, 0.9], [10, 2, 12.5, 29, 0.1]]
# The same as (y0, x0, y1, x1), best first.
WANT = [[5, 5, 30, 40], [0, 0, 10, 20], [2, 10, 29, 12.5]]


def write_all_formats(folder):
  folder.mkdir()
  (folder / "a.json").write_text(json.dumps({"boxes": [r[:4] for r in ROWS], "scores": [r[4] for r in ROWS]}))
  (folder / "b.csv").write_text("x0,y0,x1,y1,score\n" + "".join(",".join(map(str, r)) + "\n" for r in ROWS))
  np.save(folder / "c.npy", np.asarray(ROWS))
  (folder / "d.json").write_text(json.dumps([r[:4] for r in ROWS]))  # no scores: file order


def test_every_format_gives_the_same_boxes_best_first(tmp_path):
  write_all_formats(tmp_path / "boxes")
  source = BoxFiles(tmp_path / "boxes")
  for image_id in "abc":
    boxes, scores = source.boxes(image_id, 30, 40)
    np.testing.assert_allclose(boxes, WANT, err_msg=image_id)
    np.testing.assert_allclose(scores, [0.9, 0.5, 0.1])
  boxes, _ = source.boxes("d", 30, 40)
  np.testing.assert_allclose(boxes, [[0, 0, 10, 20], [5, 5, 30, 40], [2, 10, 29, 12.5]])
  table = tmp_path / "all.json"
  table.write_text(json.dumps({"a": {"boxes": [r[:4] for r in ROWS], "scores": [r[4] for r in ROWS]},
                               "e": []}))
  np.testing.assert_allclose(BoxFiles(table).boxes("a", 30, 40)[0], WANT)
  assert BoxFiles(table).boxes("e", 30, 40)[0].shape == (0, 4)


def test_boxes_a_pixel_past_the_border_are_clipped(tmp_path):
  (tmp_path / "x.csv").write_text("-0.6,-1,40.5,31\n")
  boxes, _ = BoxFiles(tmp_path).boxes("x", 30, 40)
  np.testing.assert_allclose(boxes, [[0, 0, 30, 40]])


@pytest.mark.parametrize("name, content, message", [
    ("bad.csv", "1,2,3\n", r"bad.csv: box line 1 is '1,2,3'; expected x0,y0,x1,y1\[,score\]"),
    ("bad.csv", "x0,y0,x1,y1\n1,2,a,4\n", r"box line 1 is '1,2,a,4'"),
    ("bad.json", "{not json", r"bad.json: not valid JSON"),
    ("bad.json", '{"box": []}', r"bad.json: expected \{\"boxes\""),
    ("bad.json", '{"boxes": [[0, 0, 5, 5]], "scores": [1, 2]}', r"bad.json: 1 boxes but 2 scores"),
    ("bad.json", '[[0, 0, 5]]', r"bad.json: boxes must be rows of 4 numbers"),
    ("bad.json", '[[0, 0, 50, 5]]', r"bad.json: box 0 \[0.0, 0.0, 50.0, 5.0\] lies outside the 40x30 image"),
    ("bad.json", '[[0, 0, 5, 5], [6, 0, 6, 5]]', r"bad.json: box 1 \[6.0, 0.0, 6.0, 5.0\] is empty"),
    ("bad.json", '[[0, 0, 5, NaN]]', r"bad.json: box 0 .* is not finite"),
])
def test_bad_files_name_the_file_and_the_box(tmp_path, name, content, message):
  (tmp_path / name).write_text(content)
  with pytest.raises(BoxFileError, match=message):
    BoxFiles(tmp_path).boxes("bad", 30, 40)


def test_missing_files_and_images_are_named(tmp_path):
  with pytest.raises(BoxFileError, match="no such box file or folder"):
    BoxFiles(tmp_path / "nowhere")
  with pytest.raises(BoxFileError, match=r"no box file for image 'z' \(expected z.json, .csv or .npy\)"):
    BoxFiles(tmp_path).boxes("z", 30, 40)
  (tmp_path / "all.json").write_text("{}")
  with pytest.raises(BoxFileError, match=r"all.json: no boxes for image 'z'"):
    BoxFiles(tmp_path / "all.json").boxes("z", 30, 40)
  (tmp_path / "all.csv").write_text("0,0,1,1\n")
  with pytest.raises(BoxFileError, match="must be JSON"):
    BoxFiles(tmp_path / "all.csv")
  np.save(tmp_path / "w.npy", np.zeros((2, 3)))
  with pytest.raises(BoxFileError, match=r"w.npy: boxes must be rows of 4 numbers .* shape \(2, 3\)"):
    BoxFiles(tmp_path).boxes("w", 30, 40)


def test_segmenter_crops_around_the_given_boxes():
  """Given boxes replace the generator's: the top K, in order, each with its context square."""
  from deconvnet_jax.configs import model_config
  from deconvnet_jax.data.examples import context_square
  from deconvnet_jax.inference import InferenceConfig, Segmenter
  from deconvnet_jax.models import build_model

  segmenter = Segmenter(build_model(model_config("small")), InferenceConfig(top_k=2, input_size=64, crf=False))
  image = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
  boxes = np.asarray(WANT, np.float64)
  maps, squares = segmenter.proposal_maps(image, Segmenter.new_seconds(), boxes)
  assert maps.shape == (2, 64, 64, 21)
  np.testing.assert_allclose(squares, [context_square(b, 1.2) for b in boxes[:2]])
  result = segmenter.segment(image, boxes=boxes)
  assert result.label.shape == (30, 40) and result.prob.shape == (30, 40, 21)
