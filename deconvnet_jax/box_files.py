"""Proposals computed elsewhere (EdgeBoxes' own release, any detector), read from per-image box files.

Boxes are pixel coordinates (x0, y0, x1, y1): x to the right, y down, from the
image's top-left corner, end exclusive (a box covering the whole W x H image is
(0, 0, W, H)), each optionally with a score (higher is better; boxes are used
best first, in file order without scores). Formats:
  ID.json  {"boxes": [[x0, y0, x1, y1], ...], "scores": [s, ...]}  ("scores" optional),
           or a list [[x0, y0, x1, y1(, score)], ...]
  ID.csv   one box a line: x0,y0,x1,y1[,score]; a first line of names is skipped
  ID.npy   a float array [K, 4] or [K, 5] (the score last)
`--proposals-from DIR` reads DIR/ID.{json,csv,npy} for the image named ID;
`--proposals-from FILE.json` reads one object {ID: boxes as above, ...} for all images.
Boxes may reach up to 1 px past the image (rounding in other tools) and are clipped;
anything else wrong is a `BoxFileError` naming the file and the box.
"""

import csv
import json
from pathlib import Path

import numpy as np

SUFFIXES = (".json", ".csv", ".npy")
TOLERANCE = 1.0  # pixels a box may reach past the image before it is an error
# The scripts' --proposals-from help; ID is the image's id (infer.py: its file name without suffix).
HELP = ("DIR/ID.json|csv|npy per image or one JSON {ID: boxes}; pixel (x0, y0, x1, y1), scores optional "
        "(see deconvnet_jax/box_files.py)")


class BoxFileError(ValueError):
  """A box file is missing, unreadable, or holds a bad box; the message names it."""


def _rows_from_json(value, where: str) -> np.ndarray:
  """[K, 4] or [K, 5] float64 rows from one image's JSON value."""
  if isinstance(value, dict):
    if "boxes" not in value:
      raise BoxFileError(f"{where}: expected {{\"boxes\": [[x0, y0, x1, y1], ...], \"scores\": [...]}}, "
                         f"got keys {sorted(value)}")
    boxes = _array(value["boxes"], where)
    if "scores" not in value:
      return boxes
    scores = _array(value["scores"], where, ndim=1)
    if len(scores) != len(boxes):
      raise BoxFileError(f"{where}: {len(boxes)} boxes but {len(scores)} scores")
    return np.concatenate([boxes, scores[:, None]], 1)
  return _array(value, where)


def _array(value, where: str, ndim: int = 2) -> np.ndarray:
  try:
    array = np.asarray(value, np.float64)
  except (TypeError, ValueError) as e:
    raise BoxFileError(f"{where}: not a list of numbers ({e})") from e
  if ndim == 1:
    if array.ndim != 1:
      raise BoxFileError(f"{where}: scores must be a flat list, got shape {array.shape}")
    return array
  if array.size == 0:
    return np.zeros((0, 4))
  if array.ndim != 2 or array.shape[1] not in (4, 5):
    raise BoxFileError(f"{where}: boxes must be rows of 4 numbers (x0, y0, x1, y1) or 5 (and a "
                       f"score), got shape {array.shape}")
  return array


def _read_rows(path: Path) -> np.ndarray:
  """A box file's rows [K, 4 or 5] in file coordinates; errors name the file."""
  try:
    if path.suffix == ".npy":
      return _array(np.load(path, allow_pickle=False), str(path))
    text = path.read_text()
  except FileNotFoundError as e:
    raise BoxFileError(f"{path}: box file not found") from e
  except (OSError, ValueError, UnicodeDecodeError) as e:
    raise BoxFileError(f"{path}: cannot read ({type(e).__name__}: {e})") from e
  if path.suffix == ".json":
    try:
      return _rows_from_json(json.loads(text), str(path))
    except json.JSONDecodeError as e:
      raise BoxFileError(f"{path}: not valid JSON ({e})") from e
  lines = [row for row in csv.reader(text.splitlines()) if row and any(c.strip() for c in row)]
  if lines and not _numeric(lines[0][0]):
    lines = lines[1:]  # a header line
  for n, row in enumerate(lines, start=1):
    if len(row) not in (4, 5) or not all(_numeric(c) for c in row):
      raise BoxFileError(f"{path}: box line {n} is {','.join(row)!r}; expected x0,y0,x1,y1[,score]")
  return _array([[float(c) for c in row] for row in lines], str(path))


def _numeric(text: str) -> bool:
  try:
    float(text)
    return True
  except ValueError:
    return False


def checked_boxes(rows: np.ndarray, height: int, width: int, where: str) -> tuple[np.ndarray, np.ndarray]:
  """(boxes [K, 4] float64 (y0, x0, y1, x1) clipped to the image, scores [K]), best first.

  Rows are (x0, y0, x1, y1[, score]); a box that is empty, not finite, or more
  than TOLERANCE px outside the H x W image raises BoxFileError naming it.
  """
  for k, row in enumerate(rows):
    x0, y0, x1, y1 = row[:4]
    if not np.all(np.isfinite(row)):
      raise BoxFileError(f"{where}: box {k} {row.tolist()} is not finite")
    if x1 <= x0 or y1 <= y0:
      raise BoxFileError(f"{where}: box {k} {row[:4].tolist()} is empty (need x0 < x1 and y0 < y1; "
                         "coordinates are x0, y0, x1, y1)")
    if x0 < -TOLERANCE or y0 < -TOLERANCE or x1 > width + TOLERANCE or y1 > height + TOLERANCE:
      raise BoxFileError(f"{where}: box {k} {row[:4].tolist()} lies outside the {width}x{height} image "
                         "(coordinates are x0, y0, x1, y1 in pixels)")
  boxes = np.stack([np.clip(rows[:, 1], 0, height), np.clip(rows[:, 0], 0, width),
                    np.clip(rows[:, 3], 0, height), np.clip(rows[:, 2], 0, width)], 1) if len(rows) \
      else np.zeros((0, 4))
  scores = rows[:, 4] if rows.shape[1] == 5 else -np.arange(len(rows), dtype=np.float64)
  order = np.argsort(-scores, kind="stable")
  return boxes[order], scores[order]


class BoxFiles:
  """Per-image proposals from a folder of box files or one JSON file; `boxes(image_id, h, w)`."""

  def __init__(self, path):
    self.path = Path(path)
    if self.path.is_dir():
      self._table = None
    elif self.path.is_file():
      if self.path.suffix != ".json":
        raise BoxFileError(f"{self.path}: a single box file for every image must be JSON "
                           "({image id: boxes}); per-image .csv / .npy files go in a folder")
      try:
        table = json.loads(self.path.read_text())
      except (OSError, ValueError) as e:
        raise BoxFileError(f"{self.path}: cannot read as JSON ({e})") from e
      if not isinstance(table, dict):
        raise BoxFileError(f"{self.path}: expected an object {{image id: boxes, ...}}, got a "
                           f"{type(table).__name__}")
      self._table = table
    else:
      raise BoxFileError(f"{self.path}: no such box file or folder")

  def boxes(self, image_id: str, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(boxes [K, 4] (y0, x0, y1, x1), scores [K]) of one image, best first."""
    if self._table is not None:
      if image_id not in self._table:
        raise BoxFileError(f"{self.path}: no boxes for image {image_id!r}")
      where = f"{self.path} [{image_id!r}]"
      return checked_boxes(_rows_from_json(self._table[image_id], where), height, width, where)
    found = [self.path / f"{image_id}{s}" for s in SUFFIXES if (self.path / f"{image_id}{s}").is_file()]
    if not found:
      raise BoxFileError(f"{self.path}: no box file for image {image_id!r} "
                         f"(expected {image_id}.json, .csv or .npy)")
    return checked_boxes(_read_rows(found[0]), height, width, str(found[0]))
