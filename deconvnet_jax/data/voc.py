"""PASCAL VOC 2012 and SBD layouts: split files and per-image records.

Reads an extracted `VOC2012` folder (or any folder in its layout, such as the
generated dataset): JPEGImages/ID.jpg, SegmentationClass/ID.png and
SegmentationObject/ID.png (palette PNGs whose pixel values are indices, 255 =
void) and ImageSets/Segmentation/SPLIT.txt. Reads SBD's
`benchmark_RELEASE/dataset` folder the same way: img/ID.jpg, cls/ID.mat (struct
GTcls, field Segmentation: class indices, no void), inst/ID.mat (GTinst:
Segmentation holds instance ids, Categories the class of each) and
{train,val}.txt. Both give the same `Example`; `train_aug_ids` joins them.
"""

import io
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from deconvnet_jax.images import IMAGE_ERRORS, open_image
from deconvnet_jax.labels import VOC_CLASSES, VOID, DataError, Example, Instances


def image_file(source: str, root, image_id: str) -> Path:
  """Where an image's JPEG lives in a VOC2012 folder (source "voc") or an SBD dataset folder ("sbd")."""
  return Path(root) / {"voc": "JPEGImages", "sbd": "img"}[source] / f"{image_id}.jpg"


def read_split(root, split: str) -> list[str]:
  """Image ids listed in ImageSets/Segmentation/SPLIT.txt."""
  path = Path(root) / "ImageSets" / "Segmentation" / f"{split}.txt"
  if not Path(root).is_dir():
    raise DataError(f"{root}: no such dataset folder")
  if not path.is_file():
    raise DataError(f"{path}: split file not found (splits here: "
                    f"{sorted(p.stem for p in path.parent.glob('*.txt')) or 'none'})")
  return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def read_index_png(path: Path, num_classes: int | None = None) -> np.ndarray:
  """A palette or grayscale PNG as its raw indices [H, W] uint8; RGB masks are refused."""
  if not path.is_file():
    raise DataError(f"{path}: mask file not found")
  try:
    with open_image(path) as im:
      mode, mask = im.mode, np.asarray(im) if im.mode in ("P", "L") else None
  except IMAGE_ERRORS as e:
    raise DataError(f"{path}: cannot decode mask: {e}") from e
  if mask is None:
    raise DataError(f"{path}: mask is {mode}, expected a palette (P) or grayscale (L) PNG "
                    "holding class indices; convert colours back to indices first")
  if num_classes is not None:
    check_classes(mask, num_classes, path)
  return mask


def check_classes(label: np.ndarray, num_classes: int, where) -> None:
  """Refuses class indices outside 0..num_classes-1 other than 255 (void)."""
  bad = np.unique(label[(label >= num_classes) & (label != VOID)])
  if bad.size:
    raise DataError(f"{where}: class indices {bad.tolist()} outside 0..{num_classes - 1} (and 255 void)")


def check_size(mask: np.ndarray, image: np.ndarray, where, other: str = "its image") -> None:
  """Refuses a mask whose size differs from its image's (or the other mask's)."""
  if mask.shape != image.shape[:2]:
    raise DataError(f"{where}: mask is {mask.shape[1]}x{mask.shape[0]} but {other} is "
                    f"{image.shape[1]}x{image.shape[0]}")


def image_size(path: Path) -> tuple[int, int]:
  """(height, width) of an image file from its header, without decoding the pixels."""
  try:
    with Image.open(path) as im:
      return im.height, im.width
  except FileNotFoundError as e:
    raise DataError(f"{path}: image file not found") from e
  except IMAGE_ERRORS as e:
    raise DataError(f"{path}: cannot read the image header: {e}") from e


def read_image(path: Path) -> np.ndarray:
  if not path.is_file():
    raise DataError(f"{path}: image file not found")
  try:
    with open_image(path) as im:
      return np.asarray(im.convert("RGB"))
  except IMAGE_ERRORS as e:
    raise DataError(f"{path}: cannot decode image: {e}") from e


def present_ids(instances: np.ndarray) -> np.ndarray:
  """[N] int32 instance ids present in a mask, ascending (a thin instance may be all void)."""
  ids = np.unique(instances)
  return ids[(ids > 0) & (ids < VOID)].astype(np.int32)


def instance_boxes(label: np.ndarray | None, instances: np.ndarray, where="",
                   categories: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Tight box and class of each instance id present in `instances` (present_ids order).

  The class is categories[id - 1] when given (SBD's GTinst.Categories), else the
  instance's majority class in `label` (VOC).
  """
  ids = present_ids(instances).tolist()
  if categories is not None and ids and ids[-1] > len(categories):
    raise DataError(f"{where}: instance id {ids[-1]} in Segmentation but only "
                    f"{len(categories)} Categories")
  boxes, classes = [], []
  for i in ids:
    ys, xs = np.nonzero(instances == i)
    boxes.append((ys.min(), xs.min(), ys.max() + 1, xs.max() + 1))
    if categories is not None:
      classes.append(categories[i - 1])
      continue
    cls = label[ys, xs]
    cls = cls[(cls != 0) & (cls != VOID)]
    if cls.size == 0:
      raise DataError(f"{where}: instance {i} covers no object-class pixel in the class mask")
    classes.append(np.bincount(cls).argmax())
  return np.asarray(boxes, np.int32).reshape(-1, 4), np.asarray(classes, np.int32)


def _voc_masks(root: Path, image_id: str, num_classes: int):
  """(class mask, instance mask, instance-mask path); no SegmentationObject file: no instances."""
  label = read_index_png(root / "SegmentationClass" / f"{image_id}.png", num_classes)
  object_path = root / "SegmentationObject" / f"{image_id}.png"
  instances = read_index_png(object_path) if object_path.exists() else np.zeros_like(label)
  return label, instances, object_path


def read_example(root, image_id: str, num_classes: int = len(VOC_CLASSES)) -> Example:
  """The image, class mask, instance mask and per-instance boxes / classes of one id."""
  root = Path(root)
  image = read_image(image_file("voc", root, image_id))
  label, instances, object_path = _voc_masks(root, image_id, num_classes)
  check_size(label, image, root / "SegmentationClass" / f"{image_id}.png")
  check_size(instances, image, object_path)
  boxes, classes = instance_boxes(label, instances, object_path)
  return Example(image_id, image, label, instances, boxes, classes, present_ids(instances))


def read_instances(root, image_id: str, num_classes: int = len(VOC_CLASSES)) -> Instances:
  """One id's instance ids, boxes and classes from its masks alone (the JPEG is not decoded)."""
  label, instances, object_path = _voc_masks(Path(root), image_id, num_classes)
  check_size(instances, label, object_path, "its class mask")
  boxes, classes = instance_boxes(label, instances, object_path)
  return Instances(present_ids(instances), boxes, classes)


def sbd_folder(root) -> Path:
  """SBD's folder holding img/, cls/, inst/: root itself, or root/dataset when given benchmark_RELEASE."""
  root = Path(root)
  return root / "dataset" if not (root / "cls").is_dir() and (root / "dataset").is_dir() else root


def read_sbd_split(root, split: str) -> list[str]:
  """Image ids listed in SBD's SPLIT.txt (train or val)."""
  root = sbd_folder(root)
  if not root.is_dir():
    raise DataError(f"{root}: no such SBD folder (expected benchmark_RELEASE/dataset)")
  path = root / f"{split}.txt"
  if not path.is_file():
    raise DataError(f"{path}: SBD split file not found "
                    "(expected benchmark_RELEASE/dataset/{train,val}.txt)")
  return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


MAX_MAT_BYTES = 64 << 20  # bytes a .mat's compressed variables may inflate to; SBD's: a few hundred KB
MAX_MAT_DEPTH = 32  # arrays nested in cells / structs; SBD's: 3
MAX_MAT_ELEMENTS = 1 << 16  # elements (tags) a .mat may hold; SBD's: a few hundred
MAT_TYPES = {1, 2, 3, 4, 5, 6, 7, 9, 12, 13, 14, 16, 17, 18}  # miINT8 ... miUTF32 (scipy indexes a table)


class _Inflated:
  """A compressed .mat variable read like a file, inflated on demand against the file's budget."""

  def __init__(self, data: bytes, check):
    self.z, self.pending, self.buf, self.check = zlib.decompressobj(), data, b"", check

  def read(self, n: int) -> bytes:
    while len(self.buf) < n and self.pending and not self.z.eof:
      more = self.z.decompress(self.pending, max(n - len(self.buf), 1 << 16))
      self.pending, self.buf = self.z.unconsumed_tail, self.buf + more
      self.check.budget -= len(more)
      if self.check.budget < 0:
        raise ValueError(f"its variables inflate to more than {MAX_MAT_BYTES:,} bytes")
    out, self.buf = self.buf[:n], self.buf[n:]
    return out


class _MatCheck:
  """Walks a MATLAB v5 file's elements before scipy reads it. scipy allocates what a tag's byte
  count or a cell's dimensions claim before reading them, and recurses in C into nested arrays:
  a few hundred hostile bytes could ask for gigabytes or overflow the stack. Here every count is
  checked against the bytes actually there, and nesting and element counts against limits."""

  def __init__(self, data: bytes):
    if len(data) < 128 or 0 in data[:4]:
      raise ValueError("not a MATLAB 5 .mat file (too short, or version 4)")
    major = data[124 + (data[126] == ord("I"))]  # as scipy reads the version
    if major != 1:
      raise ValueError(f"a MATLAB {'7.3 (HDF5)' if major == 2 else 'unknown version'} file, not version 5")
    self.order, self.budget, self.elements = "<" if data[126:128] == b"IM" else ">", MAX_MAT_BYTES, 0
    f = io.BytesIO(data)
    f.seek(128)
    while f.tell() < len(data):
      mdtype, count = self.numbers(f, "II")
      if count > len(data) - f.tell():
        raise ValueError(f"a variable claims {count:,} bytes, the file has {len(data) - f.tell():,} left")
      if mdtype == 15:  # miCOMPRESSED: a zlib stream of one miMATRIX
        inflated = _Inflated(f.read(count), self)
        mdtype, count = self.numbers(inflated, "II")
        if mdtype != 14 or count > self.budget:
          raise ValueError(f"a compressed element of type {mdtype} and {count:,} bytes, expected a "
                           f"variable (14) of at most {self.budget:,}")
        self.matrix(inflated, count, 1)
        if inflated.read(1):
          raise ValueError("a compressed element holds more than its variable")
      elif mdtype == 14:  # miMATRIX
        self.matrix(f, count, 1)
      else:
        raise ValueError(f"a top-level element of type {mdtype}, expected a variable (14 or 15)")

  def take(self, f, n: int, keep: bool = True) -> bytes:
    """The next n bytes of f, read in pieces (and dropped unless `keep`); refuses fewer."""
    pieces, got = [], 0
    while got < n:
      piece = f.read(min(n - got, 1 << 20))
      if not piece:
        raise ValueError(f"an element of {n:,} bytes runs past the end of the data (truncated?)")
      got += len(piece)
      pieces += [piece] if keep else []
    return b"".join(pieces)

  def numbers(self, f, fmt: str) -> tuple:
    return struct.unpack(self.order + fmt, self.take(f, struct.calcsize(fmt)))

  def element(self, f, left: int, depth: int, keep: int = 0) -> tuple[int, bytes]:
    """(bytes taken, padding included; its data if at most `keep` bytes) of an array's next element."""
    if left < 8:
      raise ValueError(f"an element tag runs past the end of its array ({left} bytes left)")
    self.elements += 1
    if self.elements > MAX_MAT_ELEMENTS:
      raise ValueError(f"more than {MAX_MAT_ELEMENTS:,} elements")
    mdtype, count = self.numbers(f, "II")
    if mdtype & 0xFFFF not in MAT_TYPES:
      raise ValueError(f"an element of unknown type {mdtype & 0xFFFF}")
    if mdtype >> 16:  # small data element: up to 4 bytes inside the tag
      return 8, struct.pack(self.order + "I", count)[:mdtype >> 16]
    if count > left - 8:
      raise ValueError(f"an element claims {count:,} bytes, its array has {left - 8:,} left")
    if mdtype == 14:
      self.matrix(f, count, depth + 1)
      return 8 + count, b""
    size = min(count + -count % 8, left - 8)
    return 8 + size, self.take(f, size, keep=count <= keep)[:count]

  def matrix(self, f, count: int, depth: int) -> None:
    """An miMATRIX of `count` bytes: flags, dimensions, name, then the elements its class holds."""
    if depth > MAX_MAT_DEPTH:
      raise ValueError(f"arrays nested more than {MAX_MAT_DEPTH} deep")
    if count == 0:
      return
    _, flag_bytes, flags, _ = self.numbers(f, "IIII") if count >= 16 else (0, 0, 0, 0)
    if flag_bytes != 8:
      raise ValueError(f"an array of {count} bytes without its 8 bytes of flags")
    left, kind = count - 16, flags & 0xFF
    if kind != 17:  # all but opaque objects have dimensions and a name
      used, dims = self.element(f, left, depth, keep=4 * 32)
      left -= used
      dims = struct.unpack(f"{self.order}{len(dims) // 4}i", dims[:len(dims) // 4 * 4])
      left -= self.element(f, left, depth)[0]
      if kind in (1, 2, 3):  # cell, struct, object: prod(dims) arrays, allocated before reading
        if kind == 3:
          left -= self.element(f, left, depth)[0]  # its class name
        if min(dims, default=0) < 0 or math.prod(dims) > left + 64:
          raise ValueError(f"a cell or struct array of {dims} elements in {left:,} bytes")
    while left > 0:
      left -= self.element(f, left, depth)[0]


def read_mat_struct(path: Path, struct: str, fields: tuple[str, ...]) -> list:
  """The named fields of a scalar struct in a MATLAB v5 .mat file."""
  if not path.is_file():
    raise DataError(f"{path}: annotation file not found")
  try:
    _MatCheck(path.read_bytes())
    mat = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
  except Exception as e:  # loadmat raises anything from IndexError to OSError on a damaged file
    raise DataError(f"{path}: cannot read as a MATLAB .mat file: {type(e).__name__}: {e}") from e
  value = mat.get(struct)
  if not isinstance(value, scipy.io.matlab.mat_struct):
    held = sorted(k for k in mat if not k.startswith("__"))
    raise DataError(f"{path}: no struct {struct} in the file (variables here: {held or 'none'})")
  missing = [f for f in fields if f not in value._fieldnames]
  if missing:
    raise DataError(f"{path}: struct {struct} has no field {', '.join(missing)} "
                    f"(fields here: {', '.join(value._fieldnames)})")
  return [getattr(value, f) for f in fields]


def mat_mask(value, where) -> np.ndarray:
  """A .mat field as an [H, W] uint8 index mask; anything but integers 0..255 is refused."""
  mask = np.asarray(value)
  if (mask.ndim != 2 or mask.dtype.kind not in "uif"
      or mask.size and (mask.min() < 0 or mask.max() > 255 or np.any(mask != np.round(mask)))):
    raise DataError(f"{where}: expected a 2-D array of integers 0..255, got {mask.dtype} {mask.shape}")
  return mask.astype(np.uint8)


def read_sbd_example(root, image_id: str, num_classes: int = len(VOC_CLASSES)) -> Example:
  """An SBD image as an `Example`: GTcls.Segmentation, GTinst.Segmentation, boxes, GTinst.Categories."""
  root = sbd_folder(root)
  image = read_image(image_file("sbd", root, image_id))
  cls_path = root / "cls" / f"{image_id}.mat"
  (segmentation,) = read_mat_struct(cls_path, "GTcls", ("Segmentation",))
  label = mat_mask(segmentation, f"{cls_path}: GTcls.Segmentation")
  check_classes(label, num_classes, cls_path)
  instances, categories, inst_path = _sbd_instances(root, image_id, num_classes)
  for path, mask in ((cls_path, label), (inst_path, instances)):
    check_size(mask, image, path)
  boxes, classes = instance_boxes(label, instances, inst_path, categories)
  return Example(image_id, image, label, instances, boxes, classes, present_ids(instances))


def _sbd_instances(root: Path, image_id: str, num_classes: int):
  """(GTinst.Segmentation [H, W] uint8, GTinst.Categories [N] int32, the .mat path), checked."""
  inst_path = root / "inst" / f"{image_id}.mat"
  segmentation, categories = read_mat_struct(inst_path, "GTinst", ("Segmentation", "Categories"))
  instances = mat_mask(segmentation, f"{inst_path}: GTinst.Segmentation")
  categories = np.atleast_1d(np.asarray(categories))  # squeeze_me makes one category a scalar
  if categories.ndim != 1 or categories.dtype.kind not in "uif" or np.any(
      (categories < 1) | (categories >= num_classes) | (categories != np.round(categories))):
    raise DataError(f"{inst_path}: GTinst.Categories must list classes 1..{num_classes - 1}, "
                    f"got {categories.tolist()}")
  return instances, categories.astype(np.int32), inst_path


def read_sbd_instances(root, image_id: str, num_classes: int = len(VOC_CLASSES)) -> Instances:
  """An SBD id's instance ids, boxes and classes from inst/ID.mat alone."""
  instances, categories, inst_path = _sbd_instances(sbd_folder(root), image_id, num_classes)
  boxes, classes = instance_boxes(None, instances, inst_path, categories)
  return Instances(present_ids(instances), boxes, classes)


def read_source_example(source: str, root, image_id: str,
                        num_classes: int = len(VOC_CLASSES)) -> Example:
  """One example from a VOC2012 folder (source "voc") or an SBD folder ("sbd")."""
  return _reader(source, {"voc": read_example, "sbd": read_sbd_example})(root, image_id, num_classes)


def read_source_instances(source: str, root, image_id: str,
                          num_classes: int = len(VOC_CLASSES)) -> Instances:
  """One id's instance header from a VOC2012 folder (source "voc") or an SBD folder ("sbd")."""
  return _reader(source, {"voc": read_instances, "sbd": read_sbd_instances})(root, image_id, num_classes)


def _reader(source: str, readers: dict):
  if source not in readers:
    raise ValueError(f"unknown source {source!r}; expected one of {sorted(readers)}")
  return readers[source]


def train_aug_ids(voc_root, sbd_root) -> list[tuple[str, str]]:
  """The train_aug split as (source, image_id) sorted by id: SBD train + val + VOC train, minus VOC val.

  VOC's annotation is used where both have the image; 10,582 images on the real data.
  """
  voc_train, voc_val = set(read_split(voc_root, "train")), set(read_split(voc_root, "val"))
  sbd = set(read_sbd_split(sbd_root, "train")) | set(read_sbd_split(sbd_root, "val"))
  items = [("voc", i) for i in voc_train] + [("sbd", i) for i in sbd - voc_train - voc_val]
  return sorted(items, key=lambda item: item[1])
