"""TensorBoard event files beside metrics.jsonl (`tensorboard --logdir runs`), written with tensorboardX.

Every metrics line: loss, accuracy, images/s, learning rate. Every evaluation: val mIoU, pixel
accuracy, per-class IoU, and a few validation images, prediction beside ground truth.
"""

import numpy as np
from tensorboardX import SummaryWriter

from deconvnet_jax.labels import VOID
from deconvnet_jax.viz import overlay


class RunWriter:
  """The run's TensorBoard writer; only one process of several should make one."""

  def __init__(self, logdir, class_names):
    self.writer = SummaryWriter(logdir=str(logdir), flush_secs=30)
    self.class_names = list(class_names)

  def record(self, record: dict, learning_rate: float) -> None:
    """One metrics.jsonl record (train_loop's keys) as scalars at its step."""
    step, add = record["step"], self.writer.add_scalar
    add("train/loss", record["loss"], step)
    add("train/accuracy", record["accuracy"], step)
    add("train/images_per_s", record["img_per_s"], step)
    add("train/learning_rate", learning_rate, step)
    if "val_miou" in record:
      add("val/miou", record["val_miou"], step)
      add("val/pixel_accuracy", record["val_pixel_acc"], step)
      for name, iou in zip(self.class_names, record["val_iou"]):
        if iou is not None:
          add(f"val_iou/{name}", iou, step)

  def predictions(self, step: int, images, truths, preds) -> None:
    """Validation images as "prediction | ground truth" overlays: lists of [H, W, 3] uint8 and [H, W] labels."""
    for i, (image, truth, pred) in enumerate(zip(images, truths, preds)):
      truth = np.where(truth == VOID, 0, truth)
      panel = np.concatenate([overlay(image, pred), np.full((image.shape[0], 4, 3), 255, np.uint8),
                              overlay(image, truth)], axis=1)
      self.writer.add_image(f"val_predictions/{i}", panel, step, dataformats="HWC")

  def flush(self) -> None:
    self.writer.flush()

  def close(self) -> None:
    self.writer.close()
