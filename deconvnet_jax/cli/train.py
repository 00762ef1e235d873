"""Train DeconvNet on VOC (+ SBD: train_aug), a prepared TFDS dataset, COCO, or generated data.

  python train.py                                   # stage 1, small model, generated data
  python train.py --recipe paper-stage1 --data VOCdevkit/VOC2012 --sbd benchmark_RELEASE/dataset \
      --workdir runs/voc_s1                         # the paper's stage 1 on train_aug (10,582 images)
  python train.py --recipe paper-stage2 --data VOCdevkit/VOC2012 --sbd benchmark_RELEASE/dataset \
      --init-from runs/voc_s1 --workdir runs/voc_s2
  python train.py --recipe paper-stage1 --tfds ~/tensorflow_datasets --workdir runs/voc_s1
  python train.py --coco COCO --class-map voc --workdir runs/coco_voc   # COCO, VOC's 20 classes

A recipe (the reference solvers: batch 8 x 8 accumulated, lr 0.01 stepped down
at 9k of 20k / 10k of 40k steps, 250 -> 224 crops) sets the defaults; flags given
with it still win. Images are decoded on demand; the stage-1/2 item lists are
computed once and cached in WORKDIR/items.

Running again with the same --workdir resumes from its latest checkpoint.
Ctrl-C or SIGTERM (a preempted VM) saves the current step and exits with 130 or
143; an unreadable latest checkpoint is set aside and the one before it resumed.
"""

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import jax

from deconvnet_jax import checkpoints, configs, proposals, recipes, train_loop, training
from deconvnet_jax.box_files import HELP as BOX_FILES_HELP, BoxFileError
from deconvnet_jax.configs import DataConfig, TrainConfig
from deconvnet_jax.data import sources
from deconvnet_jax.labels import DataError
from deconvnet_jax.locks import LockError


def parse_args(argv=None) -> TrainConfig:
  d = TrainConfig()
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sources.add_arguments(p)
  p.add_argument("--train-split", help="default: train (train_aug with --sbd; TFDS: train; COCO: train2017)")
  p.add_argument("--val-split", help="default: val (COCO: val2017)")
  p.add_argument("--val-limit", type=int, metavar="N",
                 help="evaluate during training on the first N val images only")
  p.add_argument("--stage", type=int, default=d.stage, choices=[0, 1, 2],
                 help="1: crops around each instance; 2: crops around proposals (IoU >= 0.5 with an "
                      "instance); 0: random crops of whole images")
  p.add_argument("--proposals-per-image", type=int, help="stage 2: at most this many examples per image")
  p.add_argument("--stage2-iou", type=float, default=d.stage2_iou)
  p.add_argument("--proposals", choices=proposals.GENERATORS, default=d.proposals,
                 help="stage 2: the proposal generator, content only (windows, the default: the fastest; see infer.py --help)")
  p.add_argument("--proposals-from", type=Path, metavar="DIR|FILE",
                 help="stage 2: proposals from elsewhere (e.g. EdgeBoxes' own): " + BOX_FILES_HELP)
  p.add_argument("--model", default=d.model_name, choices=sorted(configs.MODELS),
                 help="named model configuration")
  p.add_argument("--num-classes", type=int, help="default: 21 (VOC), 81 with --coco --class-map coco")
  p.add_argument("--set", dest="overrides", metavar="FIELD=VALUE", nargs="*", default=[],
                 help="override model config fields, e.g. --set width=0.25 fc_dim=128")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                 help="compute dtype (parameters and BatchNorm statistics stay float32)")
  p.add_argument("--steps", type=int, default=d.steps)
  p.add_argument("--epochs", type=float, help="train this many epochs over the stage's examples "
                                              "(instead of --steps)")
  p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch, split over all devices")
  p.add_argument("--crop", type=int, default=d.crop, help="network input side during training")
  p.add_argument("--resize", type=int, help="stages 1-2: square resized to this before the random "
                                            "crop (default crop * 250/224, the paper's 250 for 224)")
  p.add_argument("--lr", type=float, default=d.optim.learning_rate)
  p.add_argument("--lr-decay-steps", type=int, nargs="*", default=[], help="steps where lr is divided by 10")
  p.add_argument("--eval-every", type=int, default=d.eval_every)
  p.add_argument("--save-every", type=int, default=d.save_every)
  p.add_argument("--keep", type=int, default=d.keep, help="how many latest checkpoints to keep")
  p.add_argument("--seed", type=int, default=d.seed)
  p.add_argument("--workdir", type=Path, default=d.workdir)
  p.add_argument("--init-from", type=Path, help="start from this checkpoint's weights, fresh optimizer")
  p.add_argument("--compilation-cache", type=Path, default=training.default_compilation_cache(),
                 metavar="DIR", help="keep compiled XLA programs here, so a restart skips compiling "
                                     "(default: %(default)s); --no-compilation-cache to turn it off")
  p.add_argument("--no-compilation-cache", dest="compilation_cache", action="store_const", const=None)
  p.add_argument("--multihost", action="store_true",
                 help="call jax.distributed.initialize() first (TPU pod slices, multi-node GPU; "
                      "it reads the coordinator and process ids from the environment, or from "
                      "--coordinator/--num-processes/--process-id); implied when JAX_COORDINATOR_ADDRESS "
                      "or --coordinator is set")
  p.add_argument("--coordinator", metavar="HOST:PORT",
                 help="--multihost where no cluster manager tells JAX (plain GPU nodes): process 0's "
                      "address, with --num-processes and --process-id")
  p.add_argument("--num-processes", type=int, help="--multihost: how many processes in all")
  p.add_argument("--process-id", type=int, help="--multihost: this process's index, 0 .. N-1")
  p.add_argument("--accumulate", type=int, default=d.accumulate, metavar="K",
                 help="gradient accumulation: K micro-batches of --batch-size per update")
  p.add_argument("--recipe", choices=sorted(recipes.RECIPES),
                 help="the paper's solver for a stage (" + "; ".join(
                     f"{n}: {r.steps} steps, lr /10 at {r.lr_decay_steps[0]}, batch {r.batch_size} x "
                     f"{r.accumulate}" for n, r in recipes.RECIPES.items()) + ")")
  p.add_argument("--class-balance", action="store_true",
                 help="weight the loss by median-frequency class weights of the training split")
  p.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
  recipe = p.parse_known_args(argv)[0].recipe
  if recipe:
    p.set_defaults(**recipes.RECIPES[recipe].defaults())
  a = p.parse_args(argv)
  if a.multihost or a.coordinator or "JAX_COORDINATOR_ADDRESS" in os.environ:
    jax.distributed.initialize(a.coordinator, a.num_processes, a.process_id)
  if a.compilation_cache is not None:
    training.enable_compilation_cache(a.compilation_cache)
  data = sources.from_arguments(a, DataConfig())
  data = dataclasses.replace(data, **{f"{name}_split": getattr(a, f"{name}_split")
                                      for name in ("train", "val") if getattr(a, f"{name}_split")})
  if data.sbd is not None and data.train_split != sources.TRAIN_AUG:
    raise DataError(f"--sbd {a.sbd} is read only for the train_aug split, not --train-split {data.train_split}")
  coco_classes = data.kind == "coco" and data.coco_class_map == "coco"
  overrides = dict(num_classes=a.num_classes or (81 if coco_classes else 21), dtype=a.dtype)
  for item in a.overrides:
    name, _, value = item.partition("=")
    overrides[name] = configs.parse_field(name, value)
  model = configs.model_config(a.model, **overrides)
  optim = dataclasses.replace(d.optim, learning_rate=a.lr, decay_steps=tuple(a.lr_decay_steps))
  return TrainConfig(
      model=model, model_name=a.model, data=data, stage=a.stage, resize=a.resize,
      proposals_per_image=a.proposals_per_image, stage2_iou=a.stage2_iou, val_limit=a.val_limit,
      proposals=a.proposals, proposals_from=a.proposals_from,
      steps=a.steps, epochs=a.epochs, batch_size=a.batch_size, accumulate=a.accumulate, crop=a.crop,
      optim=optim, eval_every=a.eval_every, recipe=recipe, class_balance=a.class_balance,
      label_smoothing=a.label_smoothing,
      save_every=a.save_every, keep=a.keep, seed=a.seed, workdir=a.workdir, init_from=a.init_from)


def main(argv=None) -> int:
  """0: trained to the end; 2: an error, nothing lost (the message says why);
  128 + the signal (130 Ctrl-C, 143 SIGTERM): stopped by it after saving the current step."""
  try:
    cfg = parse_args(argv)
    result = train_loop.run(cfg)
  except (checkpoints.CheckpointError, DataError, BoxFileError, train_loop.TrainError, LockError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except OSError as e:  # a full disk or a read-only folder outside the checkpoints (caches, config)
    print(f"error: {e.filename}: {e.strerror}; the checkpoints already saved are intact" if e.filename
          else f"error: {e}", file=sys.stderr)
    return 2
  if result.signal is not None:
    return 128 + result.signal
  print(f"done: step {result.step}; metrics in {cfg.workdir / 'metrics.jsonl'}, checkpoints in {cfg.workdir}")
  return 0


if __name__ == "__main__":  # python -m deconvnet_jax.cli.train
  from deconvnet_jax.cli import run_as_main
  run_as_main(main)
