"""The one data layer: every dataset the project reads, opened as a lazy, random-access split.

A split `ds` is a `Sequence[Example]` that decodes on demand and may be read
from several threads at once:
  ds[i]            the Example (image, class and instance masks, boxes, classes)
  ds.instances(i)  its instance ids, boxes and classes without decoding the image
  ds.size(i)       its (height, width), from a header
  ds.image_id(i)   its id, for caches and reports
  ds.name, ds.class_names, ds.fingerprint (what a cache of derived data is keyed by)
Kinds (configs.DataConfig.kind):
  voc   a folder in the VOC 2012 layout; its split "train_aug" joins SBD's folder
        (SBD train + val + VOC train, minus VOC val; VOC's annotation where both have one)
  tfds  a dataset prepared by `python -m deconvnet_jax.data.tfds_voc`, read as
        array_record through `tfds.data_source` (no TensorFlow)
  coco  COCO instance annotations (data/coco.py)
Nothing here holds more than one image's pixels at a time.
"""

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from deconvnet_jax.configs import DataConfig, json_digest
from deconvnet_jax.data import coco, generated, voc
from deconvnet_jax.labels import VOC_CLASSES, DataError, Example, Instances

TFDS_NAME = "voc_segmentation"  # the builder in data/tfds_voc.py
TFDS_CONFIGS = ("train_aug", "voc2012")
TRAIN_AUG = "train_aug"
DEFAULT_DATA = Path("data/generated")  # written on first use when no dataset is named


CLASS_NAMES_FILE = "class_names.txt"


def folder_class_names(root, num_classes: int) -> tuple[str, ...]:
  """ROOT/class_names.txt (a name per line, line i naming class i, as the generated dataset writes),
  else VOC's names."""
  path = Path(root) / CLASS_NAMES_FILE
  if not path.is_file():
    return VOC_CLASSES[:num_classes]
  try:
    names = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines())
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f"{path}: cannot read the class names ({e})") from e
  if not names or "" in names:
    raise DataError(f"{path}: expected one class name per line, line i naming class i, without blank lines")
  return names


class FolderSplit(Sequence):
  """Images of VOC-layout and SBD folders: items (source, image id), source "voc" or "sbd"."""

  def __init__(self, name: str, roots: dict[str, Path], items: list[tuple[str, str]],
               num_classes: int = len(VOC_CLASSES)):
    self.name, self.roots, self.items, self.num_classes = name, roots, items, num_classes
    self.class_names = folder_class_names(roots["voc"], num_classes)

  def __len__(self) -> int:
    return len(self.items)

  def __getitem__(self, i: int) -> Example:
    source, image_id = self.items[i]
    return voc.read_source_example(source, self.roots[source], image_id, self.num_classes)

  def instances(self, i: int) -> Instances:
    source, image_id = self.items[i]
    return voc.read_source_instances(source, self.roots[source], image_id, self.num_classes)

  def size(self, i: int) -> tuple[int, int]:
    source, image_id = self.items[i]
    return voc.image_size(voc.image_file(source, self.roots[source], image_id))

  def image_id(self, i: int) -> str:
    return self.items[i][1]

  @property
  def fingerprint(self) -> dict:
    return {"kind": "folders", "name": self.name, "images": len(self),
            "roots": {s: str(Path(r).absolute()) for s, r in sorted(self.roots.items())},
            "items": json_digest(self.items)}


class TfdsSplit(Sequence):
  """A split of the prepared `voc_segmentation` TFDS dataset, read from its array_record files."""

  def __init__(self, data_dir: Path, config: str, split: str, num_classes: int = len(VOC_CLASSES)):
    import tensorflow_datasets as tfds  # only for this kind; it needs no TensorFlow

    from deconvnet_jax.data.tfds_voc import example_from_record

    self.folder = prepared_tfds_folder(data_dir, config)
    self.name = f"{TFDS_NAME}/{config} {split}"
    self.class_names = VOC_CLASSES[:num_classes]
    info = json.loads((self.folder / "dataset_info.json").read_text())
    splits = [s["name"] for s in info.get("splits", [])]
    if split not in splits:
      raise DataError(f"{self.folder}: no split {split!r} (splits here: {', '.join(splits)})")
    self._info_digest = json_digest(info)
    name = f"{TFDS_NAME}/{config}:{self.folder.name}"
    read = lambda **kw: tfds.data_source(name, split=split, data_dir=str(Path(data_dir)),
                                         download=False, **kw)
    self._records = read()
    skip = tfds.decode.SkipDecoding()
    self._headers = read(decoders={"image": skip, "label": skip})  # instances decoded: a small PNG
    self._example = example_from_record

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, i: int) -> Example:
    return self._example(self._records[i])

  def instances(self, i: int) -> Instances:
    record = self._headers[i]
    return Instances(voc.present_ids(record["instances"][..., 0]), record["boxes"], record["classes"])

  def size(self, i: int) -> tuple[int, int]:
    return tuple(self._headers[i]["instances"].shape[:2])

  def image_id(self, i: int) -> str:
    return self._headers[i]["image/id"].decode()

  @property
  def fingerprint(self) -> dict:
    return {"kind": "tfds", "name": self.name, "images": len(self), "folder": str(self.folder.absolute()),
            "info": self._info_digest}


class Subset(Sequence):
  """The first `n` images of a split (e.g. evaluating on part of COCO val), same interface."""

  def __init__(self, base, n: int):
    self.base, self.n = base, min(n, len(base))
    self.name, self.class_names = f"{base.name} (first {self.n})", base.class_names

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, i: int) -> Example:
    if not 0 <= i < self.n:
      raise IndexError(i)
    return self.base[i]

  def instances(self, i: int) -> Instances:
    return self.base.instances(i)

  def size(self, i: int) -> tuple[int, int]:
    return self.base.size(i)

  def image_id(self, i: int) -> str:
    return self.base.image_id(i)

  @property
  def fingerprint(self) -> dict:
    return {**self.base.fingerprint, "first": self.n}


def prepared_tfds_folder(data_dir, config: str) -> Path:
  """DATA_DIR/voc_segmentation/CONFIG/VERSION of a finished prepare; a named error otherwise."""
  if config not in TFDS_CONFIGS:
    raise DataError(f"unknown TFDS config {config!r}; the builder has {', '.join(TFDS_CONFIGS)}")
  data_dir = Path(data_dir)
  prepare = (f"prepare it with: python -m deconvnet_jax.data.tfds_voc --manual-dir DIR_WITH_VOC_AND_SBD "
             f"--data-dir {data_dir} --config {config}")
  if not data_dir.is_dir():
    raise DataError(f"{data_dir}: no such TFDS data dir; {prepare}")
  versions = sorted((p for p in (data_dir / TFDS_NAME / config).glob("[0-9]*")
                     if (p / "dataset_info.json").is_file()), key=lambda p: p.name)
  if not versions:
    raise DataError(f"{data_dir}: holds no prepared {TFDS_NAME}/{config} (no "
                    f"{TFDS_NAME}/{config}/VERSION/dataset_info.json); {prepare}")
  return versions[-1]


def resolve_data(data: DataConfig | None) -> DataConfig:
  """`data`, or the generated dataset (written on first use) when no dataset was named."""
  if data is not None and data.root is not None:
    return data
  if not (DEFAULT_DATA / "ImageSets").exists():
    print(f"No --data given: writing the generated dataset to {DEFAULT_DATA} ...")
    generated.generate(DEFAULT_DATA)
  print(f"No --data given: using the generated dataset in {DEFAULT_DATA} (5 shape classes; pass "
        "--data VOCdevkit/VOC2012 --sbd benchmark_RELEASE/dataset for VOC train_aug).")
  return dataclasses.replace(data or DataConfig(), kind="voc", root=DEFAULT_DATA)


def open_split(data: DataConfig, split: str, num_classes: int = len(VOC_CLASSES),
               training: bool = True):
  """The named split of `data` as a lazy split (see the module docstring).

  COCO training splits drop images without objects of the class map (counted);
  evaluation splits keep them.
  """
  if data.root is None:
    raise ValueError("DataConfig.root is None: resolve the generated dataset first")
  if data.kind == "coco":
    ds = coco.CocoDataset(data.root, split, data.coco_class_map, skip_empty=training,
                          skip_bad=data.skip_bad)
    print(ds.summary())
    return ds
  if data.kind == "tfds":
    return TfdsSplit(data.root, data.tfds_config, split, num_classes)
  if split == TRAIN_AUG:
    if data.sbd is None:
      raise DataError(f"{data.root}: the train_aug split needs SBD as well: pass --sbd "
                      "benchmark_RELEASE/dataset (or --train-split train for VOC train alone)")
    sbd = voc.sbd_folder(data.sbd)
    items = voc.train_aug_ids(data.root, sbd)
    return FolderSplit("train_aug (VOC + SBD)", {"voc": Path(data.root), "sbd": sbd}, items, num_classes)
  items = [("voc", i) for i in voc.read_split(data.root, split)]
  return FolderSplit(f"{Path(data.root).name} {split}", {"voc": Path(data.root)}, items, num_classes)


def add_arguments(parser: argparse.ArgumentParser, default_help: str = "the generated dataset"):
  """The data options every script shares: --data [--sbd] | --tfds [--tfds-config] | --coco."""
  g = parser.add_argument_group("data (one of --data, --tfds, --coco; default: " + default_help + ")")
  g.add_argument("--data", type=Path, metavar="VOC2012",
                 help="a folder in the VOC 2012 layout (VOCdevkit/VOC2012, or generated data)")
  g.add_argument("--sbd", type=Path, metavar="SBD",
                 help="with --data: SBD's benchmark_RELEASE/dataset; training then uses train_aug "
                      "(SBD train + val + VOC train, minus VOC val: 10,582 images on the real data)")
  g.add_argument("--tfds", type=Path, metavar="DATA_DIR",
                 help="a TFDS data dir prepared by python -m deconvnet_jax.data.tfds_voc")
  g.add_argument("--tfds-config", choices=TFDS_CONFIGS, default=None,
                 help="with --tfds: the builder's config (default train_aug)")
  g.add_argument("--coco", type=Path, metavar="ROOT",
                 help="COCO: ROOT holds annotations/instances_SPLIT.json and SPLIT/ image folders")
  g.add_argument("--class-map", choices=coco.CLASS_MAPS, default=None,
                 help="with --coco: the 20 VOC categories (21 classes) or all 80 (81 classes)")
  g.add_argument("--skip-bad", action="store_true",
                 help="with --coco: skip and count images with bad annotations instead of stopping")


def from_arguments(args, fallback: DataConfig | None = None) -> DataConfig | None:
  """The DataConfig the shared options name (`fallback` when none is given); errors name the paths.

  Split fields keep the kind's defaults: train / val, train_aug with SBD, train2017 / val2017 for COCO.
  """
  given = [flag for flag in ("data", "tfds", "coco") if getattr(args, flag) is not None]
  if len(given) > 1:
    raise DataError(f"--{given[0]} and --{given[1]} name two datasets; give one")
  if args.sbd is not None and not given:
    raise DataError(f"--sbd {args.sbd}: SBD adds to a VOC 2012 folder; give --data VOCdevkit/VOC2012 too")
  if args.sbd is not None and given != ["data"]:
    raise DataError(f"--sbd {args.sbd}: SBD joins a VOC folder (--data), not --{given[0]}")
  if args.tfds_config is not None and given != ["tfds"]:
    raise DataError("--tfds-config needs --tfds DATA_DIR")
  if (args.class_map is not None or args.skip_bad) and given != ["coco"]:
    raise DataError("--class-map and --skip-bad are for COCO: give --coco ROOT")
  if not given:
    return fallback
  if args.sbd is not None:
    sbd = voc.sbd_folder(args.sbd)
    if not sbd.is_dir() or not (sbd / "inst").is_dir():
      raise DataError(f"--sbd {args.sbd}: not an SBD folder (expected benchmark_RELEASE/dataset holding "
                      "img/, cls/, inst/ and train.txt / val.txt)")
    return DataConfig(kind="voc", root=args.data, sbd=args.sbd, train_split=TRAIN_AUG)
  if args.tfds is not None:
    config = args.tfds_config or "train_aug"
    prepared_tfds_folder(args.tfds, config)
    return DataConfig(kind="tfds", root=args.tfds, tfds_config=config)
  if args.coco is not None:
    return DataConfig(kind="coco", root=args.coco, coco_class_map=args.class_map or "voc",
                      skip_bad=args.skip_bad, train_split="train2017", val_split="val2017")
  return DataConfig(kind="voc", root=args.data)


def describe(data: DataConfig) -> str:
  """One line naming the data, for logs."""
  if data.kind == "tfds":
    return f"TFDS {TFDS_NAME}/{data.tfds_config} in {data.root}"
  if data.kind == "coco":
    return f"COCO in {data.root} ({data.coco_class_map} class map)"
  return f"{data.root}" + (f" + SBD {data.sbd}" if data.sbd else "")
