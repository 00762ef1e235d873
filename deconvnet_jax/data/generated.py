"""A generated dataset in the VOC 2012 layout (optionally with an SBD folder beside it), deterministic from a seed.

Five object classes, each a shape with its own saturated colour family and
texture, at varied sizes and positions, overlapping, on low-saturation textured
backgrounds, with VOC's void band around every object boundary. It lets training and inference run with
no dataset at hand, and is what the tests learn on.
"""

import argparse
from pathlib import Path

import numpy as np
import scipy.io
import scipy.sparse
from PIL import Image
from tqdm import tqdm

from deconvnet_jax.labels import VOC_CLASSES, VOID
from deconvnet_jax.images import save_atomic
from deconvnet_jax.viz import palette_image

# class index -> (shape, base RGB colour); VOC's 21 indices, so VOC-sized models train on it unchanged
SHAPES = {
    1: ("triangle", (200, 60, 50)),
    6: ("rectangle", (60, 170, 70)),
    8: ("ellipse", (60, 90, 210)),
    15: ("cross", (220, 190, 50)),
    20: ("ring", (170, 70, 190)),
}
CLASSES = tuple(sorted(SHAPES))
# What logs, reports and warnings call them (written to ROOT/class_names.txt): not VOC's names.
CLASS_NAMES = tuple("background" if c == 0 else SHAPES[c][0] if c in SHAPES else f"unused{c}"
                    for c in range(len(VOC_CLASSES)))


def _shape_mask(kind: str, h: int, w: int, rng) -> np.ndarray:
  """A [h, w] bool mask of the shape filling its box."""
  y, x = np.mgrid[0:h, 0:w]
  u, v = (x + 0.5) / w * 2 - 1, (y + 0.5) / h * 2 - 1  # [-1, 1]
  if kind == "triangle":
    return v >= 2 * np.abs(u) - 1
  if kind == "rectangle":
    return np.ones((h, w), bool)
  if kind == "ellipse":
    return u**2 + v**2 <= 1
  if kind == "cross":
    t = rng.uniform(0.3, 0.45)
    return (np.abs(u) <= t) | (np.abs(v) <= t)
  if kind == "ring":
    r = np.sqrt(u**2 + v**2)
    return (r <= 1) & (r >= rng.uniform(0.45, 0.6))
  raise ValueError(kind)


def _texture(h: int, w: int, colour, rng) -> np.ndarray:
  """Colour with jitter, stripes or speckle: [h, w, 3] float."""
  base = np.asarray(colour, np.float32) + rng.normal(0, 18, 3)
  y, x = np.mgrid[0:h, 0:w]
  kind = rng.integers(3)
  if kind == 0:
    shade = 1 + 0.15 * np.sin((x * np.cos(a := rng.uniform(0, np.pi)) + y * np.sin(a)) / rng.uniform(2, 5))
  elif kind == 1:
    shade = 1 + 0.12 * rng.normal(size=(h, w))
  else:
    shade = 1 + 0.2 * (y / max(h - 1, 1) - 0.5)
  return base * shade[..., None]


def _background(h: int, w: int, rng) -> np.ndarray:
  """Low-saturation gradients and noise: the object classes' saturated colours stand out."""
  y, x = np.mgrid[0:h, 0:w]
  grey = rng.uniform(50, 200) + rng.uniform(-12, 12, 3)
  ramp = (x / w * np.cos(t := rng.uniform(0, 2 * np.pi)) + y / h * np.sin(t))[..., None]
  return grey + rng.uniform(-50, 50) * ramp + rng.normal(0, 10, (h, w, 3))


def _void_band(instances: np.ndarray) -> np.ndarray:
  """Pixels whose 3x3 neighbourhood holds another instance id (or background): VOC's boundary."""
  padded = np.pad(instances, 1, mode="edge")
  h, w = instances.shape
  band = np.zeros((h, w), bool)
  for dy in (0, 1, 2):
    for dx in (0, 1, 2):
      band |= padded[dy:dy + h, dx:dx + w] != instances
  return band


def make_example(rng, min_size: int = 96, max_size: int = 176, max_objects: int = 4):
  """(image [H, W, 3] uint8, class mask [H, W] uint8, instance mask [H, W] uint8)."""
  h, w = rng.integers(min_size, max_size + 1, 2)
  image = _background(h, w, rng)
  instances = np.zeros((h, w), np.uint8)
  classes = []
  for _ in range(rng.integers(1, max_objects + 1)):
    cls = CLASSES[rng.integers(len(CLASSES))]
    kind, colour = SHAPES[cls]
    oh = int(rng.integers(min(h, w) // 5, int(min(h, w) * 0.7)))
    ow = int(np.clip(oh * rng.uniform(0.7, 1.4), 12, w - 2))
    top, left = rng.integers(0, h - oh + 1), rng.integers(0, w - ow + 1)
    mask = np.zeros((h, w), bool)
    mask[top:top + oh, left:left + ow] = _shape_mask(kind, oh, ow, rng)
    image[mask] = _texture(oh, ow, colour, rng)[mask[top:top + oh, left:left + ow]]
    classes.append(cls)
    instances[mask] = len(classes)  # later objects occlude earlier ones
  # Keep instance ids 1..N contiguous over the objects still visible.
  visible = [i for i in range(1, len(classes) + 1) if np.any(instances == i)]
  lut = np.zeros(256, np.uint8)
  lut[visible] = np.arange(1, len(visible) + 1)
  instances = lut[instances]
  label = np.zeros((h, w), np.uint8)
  for new_id, old_id in enumerate(visible, start=1):
    label[instances == new_id] = classes[old_id - 1]
  band = _void_band(instances)
  label[band], instances[band] = VOID, VOID
  image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
  return image, label, instances


def generate(root, num_train: int = 200, num_val: int = 50, seed: int = 0,
             image_size: tuple[int, int] = (96, 176)) -> Path:
  """Writes the dataset under root (VOC layout) and returns root. Existing files are rewritten.

  image_size: (min, max) side in pixels.
  """
  root = Path(root)
  dirs = {d: root / d for d in ("JPEGImages", "SegmentationClass", "SegmentationObject")}
  splits_dir = root / "ImageSets" / "Segmentation"
  for d in (*dirs.values(), splits_dir):
    d.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  ids = [f"gen_{i:05d}" for i in range(num_train + num_val)]
  for image_id in ids:
    image, label, instances = make_example(rng, *image_size)
    save_atomic(Image.fromarray(image), dirs["JPEGImages"] / f"{image_id}.jpg", quality=95)
    save_atomic(palette_image(label), dirs["SegmentationClass"] / f"{image_id}.png")
    save_atomic(palette_image(instances), dirs["SegmentationObject"] / f"{image_id}.png")
  splits = {"train": ids[:num_train], "val": ids[num_train:], "trainval": ids}
  for name, members in splits.items():
    (splits_dir / f"{name}.txt").write_text("".join(f"{i}\n" for i in members))
  (root / "class_names.txt").write_text("".join(f"{n}\n" for n in CLASS_NAMES))
  (root / "README.txt").write_text(
      f"Generated by deconvnet_jax.data.generated (seed {seed}): classes "
      + ", ".join(f"{c} {CLASS_NAMES[c]}" for c in CLASSES) + " (class_names.txt names all 21)\n")
  return root


def _boundaries(mask: np.ndarray, num: int) -> np.ndarray:
  """A cell array of sparse edge maps, as SBD stores beside each Segmentation."""
  cells = np.empty((num, 1), object)
  for k in range(num):
    cells[k, 0] = scipy.sparse.csc_matrix(mask == k + 1, dtype=np.float64)
  return cells


def save_sbd_example(dataset, image_id: str, image: np.ndarray, label: np.ndarray,
                     instances: np.ndarray, categories: np.ndarray, quality: int = 90):
  """img/ID.jpg, cls/ID.mat (GTcls) and inst/ID.mat (GTinst) with SBD's struct and field names.

  categories: [N] class of instance ids 1..N. SBD has no void: pass masks without 255.
  """
  dataset = Path(dataset)
  for sub in ("img", "cls", "inst"):
    (dataset / sub).mkdir(parents=True, exist_ok=True)
  save_atomic(Image.fromarray(image), dataset / "img" / f"{image_id}.jpg", quality=quality)
  present = np.unique(label[label > 0]).astype(np.uint8)
  scipy.io.savemat(dataset / "cls" / f"{image_id}.mat", {"GTcls": {
      "Boundaries": _boundaries(label, 20), "Segmentation": label,
      "CategoriesPresent": present.reshape(-1, 1)}}, do_compression=True)
  scipy.io.savemat(dataset / "inst" / f"{image_id}.mat", {"GTinst": {
      "Segmentation": instances, "Boundaries": _boundaries(instances, len(categories)),
      "Categories": np.asarray(categories, np.uint8).reshape(-1, 1)}}, do_compression=True)


def generate_voc_and_sbd(root, num_train: int, num_val: int, num_sbd_only: int, seed: int = 0,
                         image_size: tuple[int, int] = (375, 500)) -> tuple[Path, Path]:
  """root/VOCdevkit/VOC2012 and root/benchmark_RELEASE/dataset laid out as the real archives extract.

  SBD holds every VOC train image again (annotated without void, as SBD is) and
  `num_sbd_only` images of its own, split 3:1 into its train and val, so train_aug
  has num_train + num_sbd_only images. For measuring the data layer at scale.
  """
  root = Path(root)
  voc_root = generate(root / "VOCdevkit" / "VOC2012", num_train, num_val, seed, image_size)
  dataset = root / "benchmark_RELEASE" / "dataset"
  rng = np.random.default_rng([seed, 1])
  voc_train = (voc_root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
  ids = voc_train + [f"sbd_{i:06d}" for i in range(num_sbd_only)]
  for image_id in tqdm(ids, desc="writing SBD", leave=False):
    image, label, instances = make_example(rng, *image_size)
    void = label == VOID
    label[void], instances[void] = 0, 0
    categories = [np.bincount(label[instances == k]).argmax() if np.any(instances == k) else CLASSES[0]
                  for k in range(1, int(instances.max()) + 1)]
    save_sbd_example(dataset, image_id, image, label, instances, np.asarray(categories))
  cut = len(ids) * 3 // 4
  for name, members in (("train", ids[:cut]), ("val", ids[cut:])):
    (dataset / f"{name}.txt").write_text("".join(f"{i}\n" for i in members))
  return voc_root, dataset


def main():
  parser = argparse.ArgumentParser(description="Write the generated VOC-layout dataset "
                                   "(with --sbd-only N, VOCdevkit/VOC2012 and benchmark_RELEASE/dataset).")
  parser.add_argument("root")
  parser.add_argument("--train", type=int, default=200)
  parser.add_argument("--val", type=int, default=50)
  parser.add_argument("--sbd-only", type=int, metavar="N",
                      help="also write an SBD folder: VOC train again plus N images of its own")
  parser.add_argument("--sides", type=int, nargs=2, default=(96, 176), metavar=("MIN", "MAX"),
                      help="image sides in pixels (VOC's are about 375 and 500)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  if args.sbd_only is None:
    print(f"wrote {generate(args.root, args.train, args.val, args.seed, tuple(args.sides))}")
    return
  voc_root, sbd = generate_voc_and_sbd(args.root, args.train, args.val, args.sbd_only, args.seed,
                                       tuple(args.sides))
  print(f"wrote {voc_root} and {sbd}")


if __name__ == "__main__":
  main()
