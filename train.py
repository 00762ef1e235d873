"""Train DeconvNet on a VOC-layout folder, or on the generated dataset when none is given.

  python train.py                                  # small config on generated data
  python train.py --data VOCdevkit/VOC2012 --config paper --batch-size 8 --steps 20000

This version trains on random crops of whole images; the paper's two stages
(instance-centred crops, then proposals) are being added (see README).
"""

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from deconvnet_jax import configs, metrics, training
from deconvnet_jax.data import generated, pipeline, voc
from deconvnet_jax.models import build_model


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data", type=Path, help="VOC-layout folder (VOC2012 or generated); default: generated data")
  p.add_argument("--train-split", default="train")
  p.add_argument("--val-split", default="val")
  p.add_argument("--config", default="small", choices=sorted(configs.MODELS))
  p.add_argument("--num-classes", type=int, default=21)
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--batch-size", type=int, default=8, help="global batch, split over all devices")
  p.add_argument("--crop", type=int, default=128)
  p.add_argument("--lr", type=float, default=0.01)
  p.add_argument("--eval-every", type=int, default=100)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--workdir", type=Path, default=Path("runs/default"))
  return p.parse_args(argv)


def load_split(root: Path, split: str, num_classes: int) -> list[voc.Example]:
  ids = voc.read_split(root, split)
  return [voc.read_example(root, i, num_classes) for i in tqdm(ids, desc=f"reading {split}", leave=False)]


def evaluate(forward, state, examples, batch_size, norm, num_classes) -> dict:
  conf = np.zeros((num_classes, num_classes), np.int64)
  for images, labels in pipeline.padded_eval_batches(examples, batch_size, norm):
    pred = np.asarray(forward(state.params, state.batch_stats, images)).argmax(-1)
    conf += metrics.confusion_matrix(labels, pred, num_classes)
  return {"val_miou": metrics.mean_iou(conf), "val_pixel_acc": metrics.pixel_accuracy(conf)}


def main(argv=None) -> int:
  args = parse_args(argv)
  data = args.data
  if data is None:
    data = Path("data/generated")
    if not (data / "ImageSets").exists():
      print(f"No --data given: writing the generated dataset to {data} ...")
      generated.generate(data)
    print(f"No --data given: training on the generated dataset in {data} "
          "(5 shape classes; pass --data VOCdevkit/VOC2012 for VOC).")
  config = configs.model_config(args.config, num_classes=args.num_classes)
  train_set = load_split(data, args.train_split, config.num_classes)
  val_set = load_split(data, args.val_split, config.num_classes)

  mesh = training.make_mesh()
  if args.batch_size % mesh.size:
    raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of the {mesh.size} devices")
  tx = training.make_optimizer(training.OptimConfig(learning_rate=args.lr))
  graphdef, state = training.init_train_state(build_model(config, args.seed), tx)
  state = training.replicate(state, mesh)
  step_fn = training.jit_train_step(graphdef, tx, mesh)
  forward = training.jit_eval_logits(graphdef, mesh)
  batches = pipeline.train_batches(train_set, args.batch_size, args.crop, config.input_norm, args.seed)

  args.workdir.mkdir(parents=True, exist_ok=True)
  log = open(args.workdir / "metrics.jsonl", "a", encoding="utf-8")
  print(f"{len(train_set)} train / {len(val_set)} val images; config {args.config}; "
        f"{mesh.size} {jax.devices()[0].platform} device(s); logging to {args.workdir}")
  bar = tqdm(range(1, args.steps + 1), desc="train", dynamic_ncols=True)
  start = time.perf_counter()
  for step in bar:
    state, m = step_fn(state, next(batches))
    if step % 10 == 0 or step == args.steps:
      loss = float(m["loss"])
      if not np.isfinite(loss):
        raise SystemExit(f"step {step}: loss is {loss}; stopping (lower --lr?)")
      rate = step * args.batch_size / (time.perf_counter() - start)
      bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{rate:.1f}")
      record = {"step": step, "loss": loss, "accuracy": float(m["accuracy"]), "img_per_s": rate}
      if step % args.eval_every == 0 or step == args.steps:
        record |= evaluate(forward, state, val_set, args.batch_size, config.input_norm, config.num_classes)
        bar.write(f"step {step}: loss {loss:.3f}, val mIoU {record['val_miou']:.3f}")
      log.write(json.dumps(record) + "\n")
      log.flush()
  (args.workdir / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
  print(f"done: {args.steps} steps; metrics in {args.workdir / 'metrics.jsonl'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
