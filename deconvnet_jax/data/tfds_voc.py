"""A TFDS builder for PASCAL VOC 2012 segmentation (and train_aug with SBD), prepared offline.

The manual directory holds the official archives (VOCtrainval_11-May-2012.tar;
for train_aug also SBD's benchmark.tgz) or the folders they extract to
(VOCdevkit/VOC2012, benchmark_RELEASE). Archives are read with `tarfile`: their
segmentation files are written once under DATA_DIR/downloads/extracted. Every
example is parsed by the readers in `voc.py`, so VOC, SBD and this builder share
one code path and one set of checks. The files are array_record; read them with
`builder.as_data_source()` or `tfds.data_source`, which need no TensorFlow.

  python -m deconvnet_jax.data.tfds_voc --manual-dir ~/voc --data-dir ~/tfds --config train_aug
"""

import argparse
import gzip
import io
import re
import shutil
import sys
import tarfile
import time
import zlib
from pathlib import Path, PurePosixPath

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from deconvnet_jax.data import voc

VOC_ARCHIVE, VOC_FOLDER = "VOCtrainval_11-May-2012.tar", "VOCdevkit/VOC2012"
SBD_ARCHIVE, SBD_FOLDER = "benchmark.tgz", "benchmark_RELEASE/dataset"
# The archive members segmentation needs; ids are word characters (2007_000032).
VOC_MEMBERS = re.compile(r"VOCdevkit/VOC2012/(ImageSets/Segmentation/\w+\.txt|"
                         r"Segmentation(Class|Object)/[\w-]+\.png|JPEGImages/[\w-]+\.jpg)")
SBD_MEMBERS = re.compile(r"benchmark_RELEASE/dataset/((train|val)\.txt|img/[\w-]+\.jpg|"
                         r"(cls|inst)/[\w-]+\.mat)")


class VocSegmentation(tfds.core.GeneratorBasedBuilder):
  """VOC 2012 segmentation: image, class and instance masks, instance boxes and classes."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "VOC 2012 segmentation and train_aug (VOC + SBD)."}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name="voc2012", description="VOC 2012 train (1464) and val (1449)."),
      tfds.core.BuilderConfig(
          name="train_aug", description="train_aug: SBD train + val + VOC train minus VOC val (10,582), "
          "VOC's annotation where both have one; val is VOC val (1449). Needs SBD."),
  ]
  # tfds 4.9.10 finds a packaged builder's source file with `importlib_resources`, which it
  # requires only on Python < 3.9; the path only locates download checksums, and we download nothing.
  code_path = None
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Put in the manual directory, as downloaded (archives) or extracted (folders):
  {VOC_ARCHIVE} or {VOC_FOLDER}/  (PASCAL VOC 2012 trainval)
  {SBD_ARCHIVE} or {SBD_FOLDER}/  (SBD, Hariharan et al.; only for train_aug)
"""

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="PASCAL VOC 2012 semantic segmentation with instance masks. label: class index "
        f"0..20 ({', '.join(voc.VOC_CLASSES)}), 255 = void; instances: instance id 1..N, 0 = none, "
        "255 = void; boxes: (y0, x0, y1, x1) in pixels, end exclusive, one per instance id present, "
        "ascending; classes: class of each. SBD annotations have no void.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(encoding_format="jpeg"),  # [H, W, 3] uint8
            "image/id": tfds.features.Text(),
            "label": index_mask_feature(),  # [H, W, 1] uint8
            "instances": index_mask_feature(),  # [H, W, 1] uint8
            "boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.int32),  # [N, 4]
            "classes": tfds.features.Tensor(shape=(None,), dtype=np.int32),  # [N]
        }),
        homepage="http://host.robots.ox.ac.uk/pascal/VOC/voc2012/",
    )

  def _split_generators(self, dl_manager):
    manual_dir = Path(dl_manager.manual_dir)
    extract_dir = Path(dl_manager.download_dir) / "extracted"
    roots = {"voc": source_folder(manual_dir, VOC_FOLDER, VOC_ARCHIVE, voc_members, extract_dir)}
    val = [("voc", i) for i in voc.read_split(roots["voc"], "val")]
    if self.builder_config.name == "train_aug":
      roots["sbd"] = source_folder(manual_dir, SBD_FOLDER, SBD_ARCHIVE, sbd_members, extract_dir)
      train = voc.train_aug_ids(roots["voc"], roots["sbd"])
    else:
      train = [("voc", i) for i in voc.read_split(roots["voc"], "train")]
    return {"train": self._generate_examples(roots, train), "val": self._generate_examples(roots, val)}

  def _generate_examples(self, roots, items):
    for source, image_id in items:
      ex = voc.read_source_example(source, roots[source], image_id)
      yield image_id, {
          "image": image_bytes(voc.image_file(source, roots[source], image_id), ex.image),
          "image/id": image_id,
          "label": png_bytes(ex.label),
          "instances": png_bytes(ex.instances),
          "boxes": ex.boxes,
          "classes": ex.classes,
      }


def index_mask_feature() -> tfds.features.Image:
  """A mask of uint8 indices stored as PNG; decodes to [H, W, 1] uint8."""
  return tfds.features.Image(shape=(None, None, 1), dtype=np.uint8, encoding_format="png")


def png_bytes(array: np.ndarray) -> bytes:
  """[H, W] uint8 as a grayscale PNG, or [H, W, 3] as RGB.

  Grayscale, not palette: OpenCV (which TFDS prefers when installed) expands palettes to colours.
  """
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


def image_bytes(path: Path, image: np.ndarray) -> bytes:
  """The JPEG as stored, or for a rare grayscale / CMYK one its RGB pixels `image` as PNG."""
  data = path.read_bytes()
  with Image.open(io.BytesIO(data)) as im:
    return data if im.mode == "RGB" else png_bytes(image)


def voc_members(names: list[str]) -> set[str]:
  """VOC's split files and masks, and the JPEGs that have a class mask (not the detection-only ones)."""
  wanted = {n for n in names if VOC_MEMBERS.fullmatch(n)}
  masked = {PurePosixPath(n).stem for n in wanted if "/SegmentationClass/" in n}
  return {n for n in wanted if "/JPEGImages/" not in n or PurePosixPath(n).stem in masked}


def sbd_members(names: list[str]) -> set[str]:
  """SBD's split files, images and .mat annotations."""
  return {n for n in names if SBD_MEMBERS.fullmatch(n)}


def extract(archive: Path, dest: Path, select) -> None:
  """Writes the regular files that `select(names)` picks from a tar archive under dest, once."""
  done = dest / ".extracted"
  if done.is_file() and done.read_text() == f"{archive.name} {archive.stat().st_size}":
    return
  start = time.perf_counter()
  print(f"extracting {archive} to {dest}", flush=True)
  try:
    with tarfile.open(archive) as tar:
      members = [m for m in tar.getmembers() if m.isfile()]
      wanted = select([m.name for m in members])
      for m in members:  # archive order: a compressed archive is decompressed once more, not per member
        if m.name in wanted:
          path = dest / m.name
          path.parent.mkdir(parents=True, exist_ok=True)
          with tar.extractfile(m) as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)
  except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
    raise voc.DataError(f"{archive}: cannot read the archive ({type(e).__name__}: {e}); "
                        "download it again or extract it into the manual dir yourself") from e
  if not wanted:
    raise voc.DataError(f"{archive}: none of the expected files inside (is this the official archive?)")
  done.write_text(f"{archive.name} {archive.stat().st_size}")
  print(f"extracted {len(wanted)} files in {time.perf_counter() - start:.1f} s", flush=True)


def source_folder(manual_dir: Path, folder: str, archive: str, select, extract_dir: Path) -> Path:
  """manual_dir/folder if it is there, else that folder from manual_dir/archive, extracted once."""
  if (manual_dir / folder).is_dir():
    return manual_dir / folder
  if not (manual_dir / archive).is_file():
    raise voc.DataError(f"{manual_dir}: holds neither {archive} nor {folder}/; put the official "
                        "archive (or the folder it extracts to) there")
  dest = extract_dir / archive.split(".")[0]
  extract(manual_dir / archive, dest, select)
  return dest / folder


def prepare(manual_dir, data_dir, config: str = "voc2012") -> VocSegmentation:
  """Writes the array_record files of one config (voc2012 or train_aug) from the manual dir, once."""
  if not Path(manual_dir).is_dir():
    raise voc.DataError(f"{manual_dir}: no such manual directory\n"
                        + VocSegmentation.MANUAL_DOWNLOAD_INSTRUCTIONS)
  builder = VocSegmentation(config=config, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


def example_from_record(record: dict) -> voc.Example:
  """A data-source record as the `voc.Example` the folder readers give."""
  instances = record["instances"][..., 0]
  return voc.Example(record["image/id"].decode(), record["image"], record["label"][..., 0],
                     instances, record["boxes"], record["classes"], voc.present_ids(instances))


def main():
  parser = argparse.ArgumentParser(
      description="Prepare VOC 2012 segmentation as a TFDS dataset (array_record), offline.",
      epilog=VocSegmentation.MANUAL_DOWNLOAD_INSTRUCTIONS,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--manual-dir", type=Path, required=True, help="folder holding the archives or folders")
  parser.add_argument("--data-dir", type=Path, required=True, help="TFDS data dir to write to")
  parser.add_argument("--config", default="voc2012",
                      choices=[c.name for c in VocSegmentation.BUILDER_CONFIGS])
  args = parser.parse_args()
  start = time.perf_counter()
  print(f"preparing voc_segmentation/{args.config} from {args.manual_dir} into {args.data_dir}", flush=True)
  try:
    builder = prepare(args.manual_dir, args.data_dir, args.config)
  except voc.DataError as e:
    sys.exit(f"error: {e}")
  splits = ", ".join(f"{name} {split.num_examples}" for name, split in builder.info.splits.items())
  print(f"prepared {builder.data_dir} ({splits} examples) in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
  main()
