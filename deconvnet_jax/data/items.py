"""The training stages' item lists: which box of which image each crop is cut around.

Stage 1 has one item per ground-truth instance, from the split's instance
headers (no image decoded); stage 2 one per proposal whose IoU with some
instance is >= 0.5 (each image decoded once, for its proposals). Both are
computed by parallel host threads with a progress bar, stored as arrays (2.7 M
stage-2 items, the paper's count, take 65 MB) and cached on disk, keyed by the
data and the settings, so a resumed run or a second stage reads them back.
"""

import dataclasses
import json
import os
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from deconvnet_jax.configs import json_digest
from deconvnet_jax.images import atomic_path
from deconvnet_jax.boxes import box_iou

THREADS = max(4, os.cpu_count() or 1)  # PNG / JPEG decoding and NumPy release the GIL


@dataclasses.dataclass(frozen=True)
class Item:
  index: int  # into the split
  box: tuple[float, float, float, float]  # (y0, x0, y1, x1), exclusive end
  instance: int = 0  # stage 1: the instance id that keeps its class; 0: keep every class


@dataclasses.dataclass(frozen=True, eq=False)
class Items(Sequence):
  """M items as arrays; items[i] is an `Item`."""

  image_index: np.ndarray  # [M] int32, into the split
  boxes: np.ndarray  # [M, 4] float32 (y0, x0, y1, x1)
  instance: np.ndarray  # [M] int32

  def __len__(self) -> int:
    return len(self.image_index)

  def __getitem__(self, i: int) -> Item:
    if not -len(self) <= i < len(self):
      raise IndexError(i)
    return Item(int(self.image_index[i]), tuple(float(v) for v in self.boxes[i]), int(self.instance[i]))

  def __eq__(self, other) -> bool:
    return isinstance(other, Items) and all(
        np.array_equal(getattr(self, f), getattr(other, f)) for f in ("image_index", "boxes", "instance"))

  def num_images(self) -> int:
    """How many distinct images the items come from."""
    return len(np.unique(self.image_index))

  @staticmethod
  def concat(parts: list[tuple[int, np.ndarray, np.ndarray]]) -> "Items":
    """Items from per-image (image index, boxes [n, 4], instance ids [n]) in order."""
    counts = [len(boxes) for _, boxes, _ in parts]
    index = np.repeat(np.asarray([i for i, _, _ in parts], np.int32), counts)
    boxes = np.concatenate([np.asarray(b, np.float32).reshape(-1, 4) for _, b, _ in parts] or
                           [np.zeros((0, 4), np.float32)])
    instance = np.concatenate([np.asarray(n, np.int32).reshape(-1) for _, _, n in parts] or
                              [np.zeros(0, np.int32)])
    return Items(index.astype(np.int32), boxes, instance)


def parallel_map(fn: Callable[[int], object], n: int, desc: str, threads: int = THREADS) -> list:
  """[fn(0), ..., fn(n - 1)] computed by `threads` threads, in order, with a progress bar."""
  with ThreadPoolExecutor(threads) as pool:
    return list(tqdm(pool.map(fn, range(n)), total=n, desc=desc, leave=False, dynamic_ncols=True))


def _header(split, i: int):
  """Image i's instance ids and boxes: from the split's header reader, or from its Example."""
  return split.instances(i) if hasattr(split, "instances") else split[i]


def stage1_items(split: Sequence, threads: int = THREADS) -> Items:
  """One item per ground-truth instance, around its tight box, in image then instance order."""
  def image_items(i):
    header = _header(split, i)
    return i, header.boxes, header.ids

  return Items.concat(parallel_map(image_items, len(split), "stage-1 instances", threads))


def stage2_items(split: Sequence, propose: Callable, iou_threshold: float = 0.5,
                 per_image: int | None = None, threads: int = THREADS) -> Items:
  """Proposals whose IoU with some ground-truth instance is >= iou_threshold, best-ranked first.

  propose: image index -> its proposals [K, 4] (y0, x0, y1, x1), best first (the generator
  inference uses, or the user's box files). per_image: keep at most this many per image (None: all).
  """
  def image_items(i):
    gt = _header(split, i).boxes
    if len(gt) == 0:
      return i, np.zeros((0, 4)), np.zeros(0)
    boxes = propose(i)
    keep = np.nonzero(box_iou(np.asarray(boxes, np.float64), gt).max(1) >= iou_threshold)[0][:per_image]
    return i, np.asarray(boxes)[keep], np.zeros(len(keep))

  return Items.concat(parallel_map(image_items, len(split), "stage-2 proposals", threads))


def cache_key(split, **settings) -> dict:
  """What an item list depends on: the split's fingerprint and the stage's settings."""
  return {"data": split.fingerprint, **settings}


def cached(directory: Path | None, key: dict, compute: Callable[[], Items]) -> tuple[Items, Path | None, bool]:
  """(items, cache file, whether it was read) from DIRECTORY/items-HASH.npz when its key matches,
  else computed and saved there. directory None: computed, not cached.
  """
  if directory is None:
    return compute(), None, False
  text = json.dumps(key, sort_keys=True, default=str)
  path = Path(directory) / f"items-{json_digest(key)}.npz"
  if path.is_file():
    try:
      with np.load(path) as f:
        if str(f["key"]) == text:
          return Items(f["image_index"], f["boxes"], f["instance"]), path, True
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # a damaged cache is recomputed
      pass
  items = compute()
  path.parent.mkdir(parents=True, exist_ok=True)
  with atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      np.savez(f, key=np.asarray(text), image_index=items.image_index, boxes=items.boxes, instance=items.instance)
  return items, path, False
