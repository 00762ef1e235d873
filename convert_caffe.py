"""Convert a Caffe .caffemodel (VGG16, FCN-8s, DeconvNet) into a checkpoint that infer.py and train.py read.

Runs deconvnet_jax/cli/convert_caffe.py, as the installed `deconvnet-convert-caffe` command does; `--help` says more.
"""

import sys

if __name__ == "__main__":
  # Imported here, not above: worker processes (the CRF's) re-import this file, and need none of it.
  from deconvnet_jax.cli import start_convert_caffe
  sys.exit(start_convert_caffe())
