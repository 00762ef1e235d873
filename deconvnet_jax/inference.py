"""Image in, label map out: instance-wise DeconvNet inference (SPEC.md section 3).

proposals -> each proposal's context square cropped and resized to the network
input -> batched forward (fixed batch, padded: one compilation whatever the
image size or proposal count) -> scores pasted back and combined (max) ->
optional FCN-8s ensemble -> softmax -> optional dense CRF. A whole-image mode
(one forward, sizes bucketed) serves FCN-8s and quick looks. BatchNorm is
folded into the convolutions before the first forward.
"""

import dataclasses
import time

import jax
import numpy as np
from flax import nnx

from deconvnet_jax import aggregate, proposals
from deconvnet_jax.batchnorm import fold_model
from deconvnet_jax.crf import CRFParams, dense_crf
from deconvnet_jax.data.examples import context_square, square_crop
from deconvnet_jax.models import min_input_size, with_compute_dtype
from deconvnet_jax.normalization import normalize


# Proposal generators: the content-only ones of proposals.GENERATORS, "network" (the regions a
# whole-image forward segments) or "mix" (network boxes first, then windows).
PROPOSALS = (*proposals.GENERATORS, "network", "mix")
PROPOSALS_HELP = ("mix (default): network boxes first, then windows; network: boxes of the regions a "
                  "whole-image forward segments; windows: sliding windows ranked by objectness; edge_boxes: "
                  "EdgeBoxes on gradient edges (for real photos with --min-size 0; slower); selective_search: "
                  "OpenCV's (optional)")


@dataclasses.dataclass(frozen=True)
class InferenceConfig:
  """How an image is segmented; defaults are the paper's."""

  mode: str = "instance"  # "instance" (proposals) or "whole" (one forward over the image)
  proposals: str = "mix"  # one of PROPOSALS; mix measured best with a trained model (README, Data)
  top_k: int = 50  # proposals per image
  min_size: float | None = None  # proposals' small-box rule; None: 112 px scaled to the image
  input_size: int = 224  # side of each proposal crop fed to the network
  batch_size: int = 10  # proposals per forward; the last batch is padded (10 divides the 50: none computed twice)
  context: float = 1.2  # proposal box enlargement, as in training
  aggregation: str = "max"  # or "mean"
  min_foreground: float = 0.01  # proposals predicting less foreground than this are dropped
  crf: bool = True
  crf_params: CRFParams = CRFParams()
  # Test-time augmentation (off by default, as in the paper): scores averaged over the horizontal
  # flip and over these scales (whole mode: the image resized; instance mode: each crop fed at
  # input_size * scale); whole mode on images larger than `tile` (px): overlapping tiles at full size.
  flip: bool = False
  scales: tuple[float, ...] = (1.0,)
  tile: int | None = None


def add_test_time_arguments(p) -> None:
  """infer.py's and evaluate.py's --flip / --scales / --tile (InferenceConfig's test-time augmentation)."""
  p.add_argument("--flip", action="store_true", help="average the scores with those of the mirrored input")
  p.add_argument("--scales", type=float, nargs="+", default=[1.0], metavar="S",
                 help="average over these input scales, e.g. 0.75 1 1.25 (whole mode: the image; instance "
                      "mode: each proposal crop)")
  p.add_argument("--tile", type=int, metavar="PX",
                 help="whole mode: segment images larger than PX in overlapping PX x PX tiles at full "
                      "resolution (a third overlapping; scores averaged) instead of shrinking them")


def test_time_options(args) -> dict:
  """InferenceConfig fields from add_test_time_arguments' options; --tile needs --mode whole."""
  if args.tile is not None and getattr(args, "mode", "whole") != "whole":
    raise ValueError("--tile segments whole images: pass --mode whole")
  if any(s <= 0 for s in args.scales):
    raise ValueError(f"--scales must be positive, got {args.scales}")
  return {"flip": args.flip, "scales": tuple(args.scales), "tile": args.tile}


@dataclasses.dataclass
class Result:
  label: np.ndarray  # [H, W] uint8
  prob: np.ndarray  # [H, W, K] float32
  seconds: dict  # proposals / network / aggregation / crf


class Network:
  """A model in eval mode as a jitted function; records each input shape it compiles for.

  fold: BatchNorm folded into the convolutions (the same function, fewer ops).
  """

  def __init__(self, model: nnx.Module, multiple: int = 32, fold: bool = True):
    model = with_compute_dtype(fold_model(model) if fold else model)
    model.eval()
    self.config = model.config
    graphdef, self.state = nnx.split(model)
    self._forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    self.multiple = multiple
    self.compiled: list[tuple[int, ...]] = []

  def __call__(self, x: np.ndarray) -> np.ndarray:
    """Normalised images [B, H, W, 3] -> logits [B, H, W, K]."""
    if x.shape not in self.compiled:
      self.compiled.append(x.shape)
    return np.asarray(self._forward(self.state, x))

  def whole_image(self, image: np.ndarray) -> np.ndarray:
    """RGB uint8 [H, W, 3] -> logits [H, W, K], the input padded up to a size bucket."""
    h, w = image.shape[:2]
    least = min_input_size(self.config) if self.config.arch == "deconvnet" else 1
    up = lambda n: -(-max(n, least) // self.multiple) * self.multiple
    x = np.zeros((1, up(h), up(w), 3), np.float32)
    x[0, :h, :w] = normalize(image, self.config.input_norm)
    return self(x)[0, :h, :w]


class Segmenter:
  """DeconvNet (and optionally FCN-8s for the ensemble) plus an InferenceConfig."""

  def __init__(self, model: nnx.Module, config: InferenceConfig = InferenceConfig(),
               fcn: nnx.Module | None = None, fold: bool = True):
    self.net = Network(model, fold=fold)
    self.fcn = Network(fcn, fold=fold) if fcn is not None else None
    self.config = config

  def proposal_maps(self, image: np.ndarray, seconds: dict, boxes: np.ndarray | None = None,
                    logits: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Network scores of the top-K proposals, best first: ([K, S, S, C], squares [K, 3]).

    boxes: [N, 4] (y0, x0, y1, x1), best first, from elsewhere (box_files.py); the
    top K are used as given. None: the proposal generator's.
    logits: the image's whole-image logits [H, W, K] if the caller has them (see propose).
    """
    cfg, norm = self.config, self.net.config.input_norm
    start, network_before = time.perf_counter(), seconds["network"]
    if boxes is None:
      boxes = self.propose(image, seconds, logits)
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)[:cfg.top_k]
    squares = np.array([context_square(b, cfg.context) for b in boxes], np.float64).reshape(-1, 3)
    s = cfg.input_size
    crops = np.zeros((len(squares), s, s, 3), np.float32)
    for i, square in enumerate(squares):
      crop, valid = square_crop(image, square, s)
      crops[i] = normalize(crop, norm) * valid[..., None]
    seconds["proposals"] += time.perf_counter() - start - (seconds["network"] - network_before)

    start = time.perf_counter()
    scores = np.zeros((0, s, s, self.net.config.num_classes), np.float32)  # no proposals: nothing to add
    if len(squares):
      scores = average_views(self._batched, crops, cfg.flip, cfg.scales)
    seconds["network"] += time.perf_counter() - start
    return scores, squares

  def _batched(self, crops: np.ndarray) -> np.ndarray:
    """Network scores of [N, S, S, 3] crops in padded batches of batch_size, or of top_k where fewer: [N, S, S, K]."""
    b, n = min(self.config.batch_size, self.config.top_k), len(crops)
    padded = np.zeros((-(-n // b) * b, *crops.shape[1:]), np.float32)
    padded[:n] = crops
    return np.concatenate([self.net(padded[i:i + b]) for i in range(0, len(padded), b)])[:n]

  def whole_scores(self, image: np.ndarray) -> np.ndarray:
    """The whole-image scores [H, W, K], with the configured flip / scales / tiles."""
    cfg = self.config
    forward = self.net.whole_image if cfg.tile is None else (
        lambda im: tiled(self.net.whole_image, im, cfg.tile))
    return average_views(lambda x: forward(x[0])[None], image[None], cfg.flip, cfg.scales)[0]

  def propose(self, image: np.ndarray, seconds: dict, logits: np.ndarray | None = None) -> np.ndarray:
    """The configured generator's top-K boxes [K, 4] (y0, x0, y1, x1), best first.

    logits: the whole-image forward "network" and "mix" need, if already computed.
    """
    cfg = self.config
    if cfg.proposals in proposals.GENERATORS:
      return proposals.propose(image, cfg.top_k, cfg.min_size, generator=cfg.proposals)[0]
    if cfg.proposals not in PROPOSALS:
      raise ValueError(f"unknown proposals {cfg.proposals!r}: one of {', '.join(PROPOSALS)}")
    if logits is None:
      start = time.perf_counter()
      logits = self.net.whole_image(image)  # [H, W, K]
      seconds["network"] += time.perf_counter() - start
    network = proposals.network_boxes(aggregate.softmax(logits))
    if cfg.proposals == "network":
      return network[0][:cfg.top_k]
    return proposals.mix(network, proposals.propose(image, cfg.top_k, cfg.min_size), cfg.top_k)[0]

  def combine(self, scores: np.ndarray, squares: np.ndarray, image_hw, seconds: dict) -> np.ndarray:
    """Reliable proposals' scores pasted into one [H, W, C] map."""
    start = time.perf_counter()
    keep = aggregate.reliable(scores, min_foreground=self.config.min_foreground)
    out = aggregate.paste(scores[keep], squares[keep], image_hw, self.config.aggregation)
    seconds["aggregation"] += time.perf_counter() - start
    return out

  @staticmethod
  def new_seconds() -> dict:
    return dict.fromkeys(("proposals", "network", "aggregation", "crf"), 0.0)

  def scores(self, image: np.ndarray, boxes: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Class scores [H, W, K] before softmax (ensembled with FCN-8s when one is given).

    boxes: the proposals to use instead of the generator's (see proposal_maps).
    """
    seconds = self.new_seconds()
    if self.config.mode == "whole":
      start = time.perf_counter()
      out = self.whole_scores(image)
      seconds["network"] += time.perf_counter() - start
    elif self.config.mode == "instance":
      out = self.combine(*self.proposal_maps(image, seconds, boxes), image.shape[:2], seconds)
    else:
      raise ValueError(f"unknown inference mode {self.config.mode!r}")
    if self.fcn is not None:
      start = time.perf_counter()
      fcn_scores = self.fcn.whole_image(image)
      seconds["network"] += time.perf_counter() - start
      out = aggregate.ensemble(out, fcn_scores)
    return out, seconds

  def segment(self, image: np.ndarray, crf: bool | None = None, boxes: np.ndarray | None = None) -> Result:
    """RGB uint8 [H, W, 3] -> Result(label [H, W], prob [H, W, K], seconds per part).

    crf=False leaves the CRF to the caller (infer.py runs it in parallel processes);
    boxes: proposals from elsewhere, [N, 4] (y0, x0, y1, x1) best first.
    """
    out, seconds = self.scores(image, boxes)
    prob = aggregate.softmax(out)
    if self.config.crf if crf is None else crf:
      start = time.perf_counter()
      prob = dense_crf(image, prob, self.config.crf_params)
      seconds["crf"] += time.perf_counter() - start
    return Result(prob.argmax(-1).astype(np.uint8), prob, seconds)


def resize(x: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  """[N, h, w, C] -> [N, H, W, C], bilinear (half-pixel centres, as PIL and jax.image do)."""
  if x.shape[1:3] == tuple(hw):
    return x
  x = np.asarray(x, np.float32)
  return np.asarray(jax.image.resize(x, (x.shape[0], *hw, x.shape[3]), "linear", antialias=False))


def average_views(forward, x: np.ndarray, flip: bool, scales) -> np.ndarray:
  """The mean of forward's [N, H, W, K] scores over the inputs [N, H, W, 3] resized by each scale
  (scores resized back) and, with flip, mirrored left-right (scores mirrored back)."""
  h, w = x.shape[1:3]
  total, views = None, 0
  for scale in scales:
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    xs = resize(x, size)
    for mirrored in (False, True) if flip else (False,):
      out = forward(xs[:, :, ::-1] if mirrored else xs)
      out = resize(out[:, :, ::-1] if mirrored else out, (h, w))
      # One view (the default) is returned as it is: 50 proposals' scores are 210 MB, 0.7 s to copy twice.
      total = out if total is None else total + out
      views += 1
  return total if views == 1 else total / views


def tile_starts(n: int, tile: int, overlap: float = 1 / 3) -> list[int]:
  """Starts of tiles of `tile` px covering 0..n with at least `overlap` of a tile shared; the last
  tile ends at n."""
  if n <= tile:
    return [0]
  step = max(1, int(tile * (1 - overlap)))
  count = -(-(n - tile) // step) + 1
  return [round(i * (n - tile) / (count - 1)) for i in range(count)]


def tiled(forward, image: np.ndarray, tile: int) -> np.ndarray:
  """forward ([h, w, 3] -> [h, w, K]) over overlapping tile x tile windows of a large image, at its
  full resolution; each pixel's scores are the mean over the tiles that hold it."""
  h, w = image.shape[:2]
  total, count = None, np.zeros((h, w, 1), np.float32)
  for y in tile_starts(h, tile):
    for x in tile_starts(w, tile):
      out = forward(image[y:y + tile, x:x + tile])
      if total is None:
        total = np.zeros((h, w, out.shape[-1]), np.float32)
      total[y:y + tile, x:x + tile] += out
      count[y:y + tile, x:x + tile] += 1
  return total / count
