"""COCO instance annotations as per-image `Example`s, read lazily (COCO 2017 train has 118k images).

Layout: ROOT/annotations/instances_SPLIT.json and ROOT/SPLIT/<file_name>
(SPLIT = train2017, val2017). The JSON is parsed and checked once; `ds[i]`
decodes one image and rasterises its polygons / RLEs with pycocotools.

Masks follow `voc.Example`: classes from a class map ("voc": the 20 COCO
categories named like VOC's, every other category background; "coco": all
categories by id, background 0). Only mapped categories are painted, so under
"voc" a non-VOC object neither counts nor hides anything. Crowd regions are 255
in both masks. Overlaps: regions are painted in decreasing pixel area (ties:
higher annotation id first), so the smaller region wins, and at equal area the
lower annotation id.
"""

import collections
import dataclasses
import json
import math
import operator
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils

from deconvnet_jax.data.voc import read_image
from deconvnet_jax.labels import VOC_CLASSES, VOID, DataError, Example, Instances

COCO_TO_VOC = {
    "airplane": "aeroplane", "bicycle": "bicycle", "bird": "bird", "boat": "boat", "bottle": "bottle",
    "bus": "bus", "car": "car", "cat": "cat", "chair": "chair", "cow": "cow",
    "dining table": "diningtable", "dog": "dog", "horse": "horse", "motorcycle": "motorbike",
    "person": "person", "potted plant": "pottedplant", "sheep": "sheep", "couch": "sofa",
    "train": "train", "tv": "tvmonitor"}
CLASS_MAPS = ("voc", "coco")
BORDER_TOLERANCE = 1.0  # pixels a polygon may reach past the image (COCO's sometimes do); clipped
MAX_INSTANCES = VOID - 1  # instance ids 1..254 fit the uint8 mask beside 0 and 255
MAX_SIDE = 1 << 31  # image sides must be below this (pycocotools counts pixels in 32 bits)
# Pixels of outline an annotation's polygons may have: pycocotools rasterises with ~100 bytes per
# pixel of outline (COCO's have at most a few thousand); a few KB of points zigzagging across the
# image could ask for gigabytes.
MAX_OUTLINE = 1 << 19


class _Skip(DataError):
  """A problem confined to one image (or one stray annotation), skipped when skip_bad is set."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


@dataclasses.dataclass(slots=True)
class _Region:
  """One painted annotation: its polygons or compressed RLE, class, box and instance id."""

  ann_id: int
  cls: int
  crowd: bool
  polygons: tuple[np.ndarray, ...] | None  # each [2K] float64, x y pairs
  rle: dict | None  # {"size": [H, W], "counts": bytes}
  box: tuple[int, int, int, int]  # (y0, x0, y1, x1), exclusive end
  instance: int = 0  # 1..N for non-crowd regions once the image is kept


@dataclasses.dataclass(slots=True)
class _Image:
  coco_id: int
  file_name: str
  height: int
  width: int
  regions: list[_Region] = dataclasses.field(default_factory=list)


class CocoDataset(Sequence):
  """COCO images with annotations as a lazy Sequence[Example]: no caching, safe from several threads.

  skip_empty: drop images with no (non-crowd) instance of the mapped classes.
  skip_bad: drop (and count) images with a bad annotation, a missing image file or
  more than 254 instances, and stray annotations of unknown images, instead of
  raising DataError. `skipped` counts them by reason, `problems` keeps the messages.
  Boxes come from the annotation (a polygon's extent on pycocotools' pixel grid, an
  RLE's tight box), not from the painted mask, so an occluded instance keeps its
  whole box, and one that owns no pixel (hidden under smaller ones, or a sliver
  thinner than the grid) keeps its id, box and class: `instances(i)` (no decoding)
  always equals the ids / boxes / classes of `ds[i]`.
  """

  def __init__(self, root, split: str, class_map: str = "voc", skip_empty: bool = True,
               skip_bad: bool = False):
    if class_map not in CLASS_MAPS:
      raise ValueError(f"unknown class map {class_map!r}; expected one of {list(CLASS_MAPS)}")
    self.split, self.class_map, self.skip_bad = split, class_map, skip_bad
    self.annotation_file = Path(root) / "annotations" / f"instances_{split}.json"
    self.image_dir = Path(root) / split
    self.skipped: collections.Counter[str] = collections.Counter()
    self.problems: list[str] = []
    data = _read_json(self.annotation_file)
    self.class_names, category_class = _class_map(data["categories"], class_map, self.annotation_file)
    self.num_classes = len(self.class_names)
    images = self._read_images(data["images"])
    self._read_annotations(data["annotations"], images, category_class)
    self._images = self._keep(images, skip_empty)
    self.image_ids = tuple(im.coco_id for im in self._images)

  def __len__(self) -> int:
    return len(self._images)

  def __getitem__(self, index: int) -> Example:
    """Decodes image `index` and paints its masks (smaller regions over larger ones)."""
    im = self._images[operator.index(index)]
    path = self.image_dir / im.file_name
    image = read_image(path)
    if image.shape[:2] != (im.height, im.width):
      raise DataError(f"{path}: image is {image.shape[1]}x{image.shape[0]} but "
                      f"{self.annotation_file} says {im.width}x{im.height} (image {im.coco_id})")
    label = np.zeros((im.height, im.width), np.uint8)  # [H, W]
    instances = np.zeros((im.height, im.width), np.uint8)  # [H, W]
    rles = [_rle(r, im.height, im.width) for r in im.regions]
    areas = mask_utils.area(rles) if rles else []
    order = sorted(range(len(rles)), key=lambda k: (-int(areas[k]), -im.regions[k].ann_id))
    for k in order:
      region, mask = im.regions[k], mask_utils.decode(rles[k]).astype(bool)
      label[mask] = VOID if region.crowd else region.cls
      instances[mask] = VOID if region.crowd else region.instance
    ids, boxes, classes = self.instances(index)
    return Example(str(im.coco_id), image, label, instances, boxes, classes, ids)

  def instances(self, index: int) -> Instances:
    """Ids, annotation boxes and classes of image `index`'s instances, without decoding it."""
    regions = [r for r in self._images[operator.index(index)].regions if not r.crowd]
    return Instances(np.asarray([r.instance for r in regions], np.int32),
                     np.asarray([r.box for r in regions], np.int32).reshape(-1, 4),
                     np.asarray([r.cls for r in regions], np.int32))

  def size(self, index: int) -> tuple[int, int]:
    """(height, width) of image `index` as the JSON gives it."""
    im = self._images[operator.index(index)]
    return im.height, im.width

  def image_id(self, index: int) -> str:
    return str(self._images[operator.index(index)].coco_id)

  @property
  def name(self) -> str:
    return f"COCO {self.split}"

  @property
  def fingerprint(self) -> dict:
    """What caches of data derived from this split are keyed by."""
    stat = self.annotation_file.stat()
    return {"kind": "coco", "annotations": str(self.annotation_file.absolute()), "bytes": stat.st_size,
            "mtime_ns": stat.st_mtime_ns, "class_map": self.class_map, "skip_bad": self.skip_bad,
            "images": len(self)}

  def image_file(self, index: int) -> Path:
    return self.image_dir / self._images[operator.index(index)].file_name

  def summary(self) -> str:
    """One line: images kept and skipped, by reason."""
    line = f"COCO {self.split} ({self.class_map} class map, {self.num_classes} classes): {len(self)} images"
    if self.skipped:
      line += "; skipped " + ", ".join(f"{reason}: {n}" for reason, n in sorted(self.skipped.items()))
    return line

  def _skip_or_raise(self, e: _Skip) -> None:
    if not self.skip_bad:
      raise DataError(f"{e} (pass skip_bad=True to skip these)") from None
    self.skipped[e.reason] += 1
    self.problems.append(str(e))

  def _read_images(self, entries: list) -> dict[int, _Image]:
    images = {}
    for k, entry in enumerate(entries):
      where = f"{self.annotation_file}: images[{k}]"
      coco_id = _int_field(entry, "id", where)
      where = f"{self.annotation_file}: image {coco_id}"
      file_name = entry.get("file_name")
      if not isinstance(file_name, str) or not file_name:
        raise DataError(f"{where}: 'file_name' must be a non-empty string, got {file_name!r}")
      if "\0" in file_name or Path(file_name).is_absolute() or ".." in Path(file_name).parts:
        raise DataError(f"{where}: 'file_name' must be a path inside {self.image_dir}, got "
                        f"{file_name[:100]!r}")
      height, width = _int_field(entry, "height", where), _int_field(entry, "width", where)
      if height < 1 or width < 1:
        raise DataError(f"{where}: size {width}x{height} is empty")
      if height >= MAX_SIDE or width >= MAX_SIDE:
        raise DataError(f"{where}: size {width}x{height} is beyond any image's (sides below 2^31)")
      if coco_id in images:
        raise DataError(f"{where}: image id listed twice")
      images[coco_id] = _Image(coco_id, file_name, height, width)
    return images

  def _read_annotations(self, entries: list, images: dict[int, _Image], category_class: dict) -> None:
    """Checks every annotation and files the painted ones (mapped classes) under their image."""
    seen, bad = set(), set()
    for k, entry in enumerate(entries):
      ann_id = _int_field(entry, "id", f"{self.annotation_file}: annotations[{k}]")
      where = f"{self.annotation_file}: annotation {ann_id}"
      image_id, category_id = _int_field(entry, "image_id", where), _int_field(entry, "category_id", where)
      if ann_id in seen:
        raise DataError(f"{where}: annotation id listed twice")
      seen.add(ann_id)
      im = images.get(image_id)
      try:
        if im is None:
          raise _Skip("annotations of unknown images", f"{where}: image_id {image_id} is not in 'images'")
        if image_id in bad:
          continue
        if category_id not in category_class:
          raise _Skip("unknown category", f"{where} (image {image_id}): category_id {category_id} "
                      "is not in 'categories'")
        if category_class[category_id]:
          im.regions.append(_region(entry, ann_id, category_class[category_id], im,
                                    f"{where} (image {image_id})"))
      except _Skip as e:
        self._skip_or_raise(e)
        if im is not None:
          bad.add(image_id)
    for image_id in bad:
      images.pop(image_id)

  def _keep(self, images: dict[int, _Image], skip_empty: bool) -> list[_Image]:
    """The usable images by id, instance ids assigned; empty, crowded and file-less ones skipped."""
    kept, missing = [], []
    listings: dict[Path, set[str]] = {}
    if not self.image_dir.is_dir():
      raise DataError(f"{self.image_dir}: no such image folder (the images of "
                      f"{self.annotation_file} belong there)")
    for im in sorted(images.values(), key=lambda im: im.coco_id):
      im.regions.sort(key=lambda r: r.ann_id)
      objects = [r for r in im.regions if not r.crowd]
      if skip_empty and not objects:
        self.skipped["no objects of the chosen classes"] += 1
        continue
      if len(objects) > MAX_INSTANCES:
        self._skip_or_raise(_Skip("too many instances", f"{self.annotation_file}: image {im.coco_id} "
                                  f"has {len(objects)} instances of the chosen classes; the uint8 "
                                  f"instance mask holds at most {MAX_INSTANCES}"))
        continue
      path = self.image_dir / im.file_name
      if path.parent not in listings:  # one directory listing instead of a stat per image
        try:
          listings[path.parent] = set(os.listdir(path.parent))
        except OSError:  # no such folder, or a name the system refuses
          listings[path.parent] = set()
      if path.name not in listings[path.parent]:
        missing.append(path)
        continue
      for n, region in enumerate(objects, 1):
        region.instance = n
      kept.append(im)
    if missing and not self.skip_bad:
      raise DataError(f"{missing[0]}: image file not found ({len(missing)} of the "
                      f"{len(kept) + len(missing)} images to read are missing; pass skip_bad=True "
                      "to skip them)")
    if missing:
      self.skipped["missing image file"] += len(missing)
      self.problems += [f"{path}: image file not found" for path in missing]
    return kept


def _read_json(path: Path) -> dict:
  """The parsed instances file, with its three lists present."""
  if not path.is_file():
    found = sorted(p.name for p in path.parent.glob("instances_*.json")) if path.parent.is_dir() else []
    raise DataError(f"{path}: annotation file not found (expected ROOT/annotations/instances_SPLIT.json; "
                    f"found here: {found or 'none'})")
  try:
    with open(path, "rb") as f:
      data = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise DataError(f"{path}: not valid JSON: {e}") from e
  except RecursionError as e:
    raise DataError(f"{path}: not a COCO instances file: JSON nested too deeply to read") from e
  if not isinstance(data, dict):
    raise DataError(f"{path}: not a COCO instances file (top level is a {type(data).__name__}, "
                    "expected an object with images, annotations and categories)")
  missing = [key for key in ("images", "annotations", "categories") if key not in data]
  if missing:
    raise DataError(f"{path}: not a COCO instances file: no {', '.join(missing)} "
                    "(captions and keypoints files are not instance annotations)")
  for key in ("images", "annotations", "categories"):
    if not isinstance(data[key], list):
      raise DataError(f"{path}: '{key}' is a {type(data[key]).__name__}, expected a list")
  return data


def _int_field(entry, key: str, where: str) -> int:
  if not isinstance(entry, dict):
    raise DataError(f"{where}: expected an object, got {type(entry).__name__}")
  value = entry.get(key)
  if isinstance(value, bool) or not isinstance(value, int):
    raise DataError(f"{where}: '{key}' must be an integer, got {value!r}")
  return value


def _class_map(categories: list, class_map: str, path: Path) -> tuple[tuple[str, ...], dict[int, int]]:
  """(class names, category id -> class index, 0 = background) for the named map."""
  names = {}
  for k, entry in enumerate(categories):
    cat_id = _int_field(entry, "id", f"{path}: categories[{k}]")
    name = entry.get("name")
    if not isinstance(name, str):
      raise DataError(f"{path}: category {cat_id}: 'name' must be a string, got {name!r}")
    if cat_id in names or name in names.values():
      raise DataError(f"{path}: category {cat_id} ({name!r}) listed twice")
    names[cat_id] = name
  if class_map == "voc":
    mapping = {i: VOC_CLASSES.index(COCO_TO_VOC[n]) if n in COCO_TO_VOC else 0 for i, n in names.items()}
    if not any(mapping.values()):
      raise DataError(f"{path}: no category has a VOC class's COCO name ({', '.join(COCO_TO_VOC)})")
    return VOC_CLASSES, mapping
  if len(names) > MAX_INSTANCES:
    raise DataError(f"{path}: {len(names)} categories; a uint8 class mask holds at most {MAX_INSTANCES}")
  ordered = sorted(names)
  return ("background", *(names[i] for i in ordered)), {i: n for n, i in enumerate(ordered, 1)}


def _region(entry: dict, ann_id: int, cls: int, im: _Image, where: str) -> _Region:
  """A checked annotation: every polygon / RLE problem is a _Skip naming the annotation."""
  crowd = entry.get("iscrowd", 0)
  if crowd not in (0, 1):  # True / False compare equal to 1 / 0
    raise _Skip("bad annotation", f"{where}: 'iscrowd' must be 0 or 1, got {crowd!r}")
  seg = entry.get("segmentation")
  if isinstance(seg, list):
    polygons, box = _polygons(seg, im.height, im.width, where)
    return _Region(ann_id, cls, bool(crowd), polygons, None, box)
  if isinstance(seg, dict) and "counts" in seg and "size" in seg:
    rle, box = _checked_rle(seg, im.height, im.width, where)
    return _Region(ann_id, cls, bool(crowd), None, rle, box)
  raise _Skip("bad annotation", f"{where}: 'segmentation' must be a list of polygons or an RLE "
              f"object with counts and size, got {type(seg).__name__}")


def _polygons(seg: list, h: int, w: int, where: str) -> tuple[tuple[np.ndarray, ...], tuple]:
  """Polygons as [2K] float64 (x, y pairs) and the box of the pixels they rasterise to."""
  if not seg:
    raise _Skip("bad annotation", f"{where}: empty polygon list")
  polygons, area, outline = [], 0.0, 0.0
  lo, hi = np.full(2, np.inf), np.full(2, -np.inf)  # (x, y) extents
  for k, p in enumerate(seg):
    try:
      xy = np.asarray(p, np.float64)
    except (TypeError, ValueError):
      xy = None
    # pycocotools reads a 4-number "polygon" as a box [x, y, w, h]: refused here, not misread.
    # (A sum is finite iff every term is, short of overflow, which the border check refuses too.)
    if xy is None or xy.ndim != 1 or len(xy) < 6 or len(xy) % 2 or not math.isfinite(xy.sum()):
      raise _Skip("bad annotation", f"{where}: polygon {k} must be a flat list of at least 3 "
                  f"x, y pairs (an even count >= 6 of finite numbers), got {str(p)[:80]}")
    points = xy.reshape(-1, 2)  # [K, 2] (x, y)
    p_lo, p_hi = points.min(0), points.max(0)
    t = BORDER_TOLERANCE
    if p_lo.min() < -t or p_hi[0] > w + t or p_hi[1] > h + t:
      raise _Skip("bad annotation", f"{where}: polygon {k} reaches (x {p_lo[0]:g}..{p_hi[0]:g}, "
                  f"y {p_lo[1]:g}..{p_hi[1]:g}), outside the {w}x{h} image by more than {t:g} px")
    x, y = points[:, 0], points[:, 1]
    area += abs(x[:-1] @ y[1:] - y[:-1] @ x[1:] + x[-1] * y[0] - y[-1] * x[0]) / 2  # shoelace
    outline += np.abs(points - np.roll(points, 1, axis=0)).max(1).sum()
    if outline > MAX_OUTLINE:
      raise _Skip("bad annotation", f"{where}: polygons of more than {MAX_OUTLINE:,} pixels of outline "
                  f"(polygon {k} has {len(points):,} points)")
    lo, hi = np.minimum(lo, p_lo), np.maximum(hi, p_hi)
    polygons.append(xy)
  if area < 1e-6:
    raise _Skip("bad annotation", f"{where}: zero-area segmentation (its polygons enclose no area)")
  # pycocotools fills pixel column j of an axis-aligned polygon iff round(x0) <= j < round(x1).
  ends = [math.floor(v + 0.5) for v in (lo[1], lo[0], hi[1], hi[0])]
  return tuple(polygons), _clip_box(*ends, h, w)


def _clip_box(y0: int, x0: int, y1: int, x1: int, h: int, w: int) -> tuple[int, int, int, int]:
  """The box clipped to the image, at least one pixel each way (crops need a non-empty box)."""
  y0, x0 = min(max(y0, 0), h - 1), min(max(x0, 0), w - 1)
  return y0, x0, min(max(y1, y0 + 1), h), min(max(x1, x0 + 1), w)


def _checked_rle(seg: dict, h: int, w: int, where: str) -> tuple[dict, tuple]:
  """A compressed RLE dict of a checked RLE and its pixels' box.

  pycocotools decodes an RLE without checking that its runs fill the image
  (too short leaves garbage in the mask), so the runs are summed here first.
  """
  size = seg["size"]
  if not isinstance(size, list) or size != [h, w]:
    raise _Skip("bad annotation", f"{where}: RLE size {size!r} is not the image's [height, width] "
                f"[{h}, {w}]")
  counts = seg["counts"]
  if isinstance(counts, str):
    runs = _string_runs(counts)
  elif isinstance(counts, list) and all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
    runs = counts
  else:
    raise _Skip("bad annotation", f"{where}: RLE counts must be a string or a list of integers")
  if runs is None or any(r < 0 for r in runs) or sum(runs) != h * w:
    raise _Skip("bad annotation", f"{where}: RLE counts do not describe {h}x{w} = {h * w} pixels "
                f"({'malformed string' if runs is None else f'runs sum to {sum(runs)}'})")
  if max(runs) >= 1 << 32:
    raise _Skip("bad annotation", f"{where}: an RLE run of {max(runs):,} pixels; pycocotools counts "
                "runs in 32 bits")
  if not sum(runs[1::2]):
    raise _Skip("bad annotation", f"{where}: zero-area segmentation (the RLE has no foreground)")
  rle = ({"size": [h, w], "counts": counts.encode()} if isinstance(counts, str)
         else mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w))
  x, y, bw, bh = (int(v) for v in mask_utils.toBbox(rle))
  return rle, (y, x, y + bh, x + bw)


def _string_runs(s: str) -> list[int] | None:
  """The run lengths in a compressed COCO RLE string (pycocotools' rleFrString), None if malformed."""
  runs, p = [], 0
  while p < len(s):
    x = k = 0
    more = True
    while more:
      if p == len(s):
        return None  # the last number is cut short
      c = ord(s[p]) - 48
      if not 0 <= c < 64:
        return None
      x |= (c & 0x1F) << (5 * k)
      more = bool(c & 0x20)
      p, k = p + 1, k + 1
    if c & 0x10:
      x |= -1 << (5 * k)
    if len(runs) > 2:
      x += runs[-2]  # runs after the second are stored as differences
    runs.append(x)
  return runs


def _rle(region: _Region, h: int, w: int) -> dict:
  if region.rle is not None:
    return region.rle
  return mask_utils.merge(mask_utils.frPyObjects(list(region.polygons), h, w))
