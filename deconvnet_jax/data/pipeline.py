"""Host-side batches: random crops with flips for training, padded full images for evaluation."""

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Sequence

import grain
import numpy as np

from deconvnet_jax.data.examples import CropSpec, crop_item
from deconvnet_jax.data.items import Item
from deconvnet_jax.labels import VOID, Example
from deconvnet_jax.normalization import normalize


_ENDLESS = 2**62


def random_crop(ex: Example, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """A size x size crop (image padded with zeros after normalisation, labels with 255) + flip."""
  h, w = ex.label.shape
  ph, pw = max(size - h, 0), max(size - w, 0)
  top = rng.integers(-ph, max(h - size, 0) + 1)  # negative: the crop reaches past the border
  left = rng.integers(-pw, max(w - size, 0) + 1)
  image = np.zeros((size, size, 3), np.uint8)
  label = np.full((size, size), VOID, np.uint8)
  ys, xs = slice(max(top, 0), min(top + size, h)), slice(max(left, 0), min(left + size, w))
  dst = (slice(ys.start - top, ys.stop - top), slice(xs.start - left, xs.stop - left))
  image[dst], label[dst] = ex.image[ys, xs], ex.label[ys, xs]
  valid = np.zeros((size, size), bool)
  valid[dst] = True
  if rng.random() < 0.5:
    image, label, valid = image[:, ::-1], label[:, ::-1], valid[:, ::-1]
  return image, label, valid


def training_dataset(num_items: int, make_example: Callable, batch_size: int, seed: int,
                     process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """This host's batches: dataset[step] is batch number `step`, a pure function of (seed, step).

  Items are reshuffled every epoch from the seed; global batch number s holds
  items s*B .. (s+1)*B - 1 of that endless order (B = batch_size * process_count),
  and host p builds rows p*batch_size .. (p+1)*batch_size - 1 of it, so a
  restart at step s continues the epoch exactly, on any number of hosts.
  make_example(item, rng) -> {"image": [H, W, 3] float32, "label": [H, W] int32}.
  """
  order = grain.MapDataset.range(num_items).shuffle(seed=seed).repeat()
  global_batch = batch_size * process_count

  def global_position(j):  # j-th element of this host's stream
    return (j // batch_size) * global_batch + process_index * batch_size + j % batch_size

  stream = grain.MapDataset.range(0, _ENDLESS).map(lambda j: (global_position(j), order[global_position(j)]))
  # The crop's randomness follows the element's global position, not the host layout.
  examples = stream.map(lambda pair: make_example(pair[1], np.random.default_rng([seed, pair[0]])))
  return examples.batch(batch_size)


def batches_from(dataset: grain.MapDataset, start_step: int, threads: int = 8) -> Iterator[dict]:
  """Batches start_step, start_step + 1, ... decoded and cropped by `threads` host threads."""
  options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
  return iter(dataset[start_step:].to_iter_dataset(options))


def crop_example(ex: Example, item: Item, spec: CropSpec, norm: str, rng) -> dict:
  """A stage-1/2 item as a network example (padding zeroed after normalisation)."""
  image, label, valid = crop_item(ex, item, spec, rng)
  return {"image": normalize(image, norm) * valid[..., None], "label": label.astype(np.int32)}


def whole_image_example(ex: Example, crop: int, norm: str, rng) -> dict:
  """A random crop of a whole image at its own scale."""
  image, label, valid = random_crop(ex, crop, rng)
  return {"image": normalize(image, norm) * valid[..., None], "label": label.astype(np.int32)}


def padded_eval_batches(examples: Sequence[Example], batch_size: int, norm: str, multiple: int = 32,
                        threads: int = 8):
  """Full images, grouped by size rounded up to `multiple` and padded (bottom / right) to it.

  Few distinct shapes, so evaluation compiles a few times at most, and little
  padding that training never saw. Yields (images [B, H, W, 3] float32, labels
  [B, H, W] int32 with 255 on padding); short batches are filled with void images.
  A lazy split (data/sources.py) is decoded one batch at a time, by `threads` threads.
  """
  size = getattr(examples, "size", lambda i: examples[i].label.shape)
  groups: dict[tuple[int, ...], list[int]] = {}
  for i in range(len(examples)):
    groups.setdefault(tuple(-(-n // multiple) * multiple for n in size(i)), []).append(i)
  with ThreadPoolExecutor(threads) as pool:
    for (side_h, side_w), group in sorted(groups.items()):
      for start in range(0, len(group), batch_size):
        images = np.zeros((batch_size, side_h, side_w, 3), np.float32)
        labels = np.full((batch_size, side_h, side_w), VOID, np.int32)
        for i, ex in enumerate(pool.map(examples.__getitem__, group[start:start + batch_size])):
          h, w = ex.label.shape
          images[i, :h, :w] = normalize(ex.image, norm)
          labels[i, :h, :w] = ex.label
        yield images, labels
