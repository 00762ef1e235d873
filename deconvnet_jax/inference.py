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
from deconvnet_jax.models import min_input_size
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
  batch_size: int = 8  # proposals per forward; the last batch is padded
  context: float = 1.2  # proposal box enlargement, as in training
  aggregation: str = "max"  # or "mean"
  min_foreground: float = 0.01  # proposals predicting less foreground than this are dropped
  crf: bool = True
  crf_params: CRFParams = CRFParams()


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
    model = fold_model(model) if fold else model
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
    crops = np.zeros((-(-len(squares) // cfg.batch_size) * cfg.batch_size, s, s, 3), np.float32)
    for i, square in enumerate(squares):
      crop, valid = square_crop(image, square, s)
      crops[i] = normalize(crop, norm) * valid[..., None]
    seconds["proposals"] += time.perf_counter() - start - (seconds["network"] - network_before)

    start = time.perf_counter()
    scores = np.zeros((0, s, s, self.net.config.num_classes), np.float32)  # no proposals: nothing to add
    if len(squares):
      scores = np.concatenate([self.net(crops[i:i + cfg.batch_size])
                               for i in range(0, len(crops), cfg.batch_size)])[:len(squares)]
    seconds["network"] += time.perf_counter() - start
    return scores, squares

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
      out = self.net.whole_image(image)
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
