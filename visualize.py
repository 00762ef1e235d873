"""The paper's decoder analysis figure: activations after each unpooling and deconvolution stage.

  python visualize.py --checkpoint runs/default --image photo.jpg --output grid.png

One row per layer (unpool5, deconv5, ..., unpool1, deconv1), showing the most active
channels of the image: unpooled maps are sparse, deconvolved ones dense.
"""

import argparse
from pathlib import Path

import numpy as np
from flax import nnx
from PIL import Image

from deconvnet_jax import checkpoints, configs
from deconvnet_jax.models import DECODER_ACTIVATIONS
from deconvnet_jax.images import load_rgb, save_atomic
from deconvnet_jax.normalization import normalize
from deconvnet_jax.viz import activation_grid


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", type=Path, required=True, help="train.py work dir (or a step folder in it)")
  p.add_argument("--image", type=Path, required=True)
  p.add_argument("--output", type=Path, required=True, help="PNG file for the grid")
  p.add_argument("--channels", type=int, default=6, help="channels shown per layer")
  p.add_argument("--input-size", type=int, help="square input side (default: the training crop)")
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  model, meta = checkpoints.load_model(args.checkpoint)
  size = args.input_size or configs.train_config(meta).crop
  image = load_rgb(args.image)
  image = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))
  x = normalize(image[None], meta["input_norm"])  # [1, size, size, 3]
  activations = nnx.jit(lambda m, x: m.decoder_activations(x))(model, x)
  activations = {name: np.asarray(activations[name], np.float32) for name in DECODER_ACTIVATIONS}
  save_atomic(Image.fromarray(activation_grid(activations, args.channels)), args.output)
  for name, a in activations.items():
    print(f"{name:8s} {str(a.shape[1:]):16s} nonzero {np.count_nonzero(a[0]) / a[0].size:.3f}")
  print(f"wrote {args.output}")


if __name__ == "__main__":
  main()
