"""Small charts drawn with PIL (no plotting library needed): the proposals curves, confusion matrices."""

import numpy as np
from PIL import Image, ImageDraw

# Matplotlib's first colours, one per series.
COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))


def line_plot(xs, series: dict[str, list], title: str, xlabel: str, ylabel: str,
              size=(640, 420)) -> Image.Image:
  """A line chart of one or more series over xs (one tick per x, evenly spaced by rank), with points;
  one series has value labels, several a legend instead (their labels would collide)."""
  w, h = size
  left, right, top, bottom = 70, 20, 40, 60
  im = Image.new("RGB", size, "white")
  draw = ImageDraw.Draw(im)
  values = [y for ys in series.values() for y in ys]
  lo, hi = min(values), max(values)
  pad = max((hi - lo) * 0.15, 1.0)
  lo, hi = lo - pad, hi + pad
  px = lambda i: left + (w - left - right) * (i + 0.5) / len(xs)  # x ticks evenly by rank
  py = lambda y: top + (h - top - bottom) * (hi - y) / (hi - lo)
  draw.rectangle([left, top, w - right, h - bottom], outline="black")
  for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
    y = lo + (hi - lo) * frac
    draw.line([left - 4, py(y), left, py(y)], fill="black")
    draw.text((8, py(y) - 6), f"{y:.1f}", fill="black")
  for i, x in enumerate(xs):
    draw.text((px(i) - 6, h - bottom + 8), str(x), fill="black")
  for s, (name, ys) in enumerate(series.items()):
    colour = COLOURS[s % len(COLOURS)]
    points = [(px(i), py(y)) for i, y in enumerate(ys)]
    draw.line(points, fill=colour, width=3)
    for (x, y), value in zip(points, ys):
      draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
      if len(series) == 1:
        draw.text((x - 12, y - 18), f"{value:.1f}", fill="black")
    if len(series) > 1:
      ly = top + 8 + 16 * s
      draw.line([left + 10, ly + 6, left + 34, ly + 6], fill=colour, width=3)
      draw.text((left + 40, ly), name, fill="black")
  draw.text((w // 2 - 60, h - 24), xlabel, fill="black")
  draw.text((8, top - 24), ylabel, fill="black")
  draw.text((left, 10), title, fill="black")
  return im


def confusion_plot(rows: np.ndarray, class_names, title: str, cell: int = 26) -> Image.Image:
  """A row-normalised confusion matrix (ground truth down, prediction across) as a heat map: white 0,
  dark blue 1, the percentage written in cells of 1% or more; grey rows for classes absent from the truth."""
  k = len(class_names)
  label_w, top = 8 + 7 * max(len(n) for n in class_names), 40 + 7 * max(len(n) for n in class_names)
  im = Image.new("RGB", (label_w + k * cell + 10, top + k * cell + 30), "white")
  draw = ImageDraw.Draw(im)
  draw.text((8, 8), title, fill="black")
  for i, name in enumerate(class_names):
    draw.text((4, top + i * cell + cell // 2 - 6), name, fill="black")
    column = Image.new("RGB", (top - 30, cell), "white")  # the column's name, written then turned upright
    ImageDraw.Draw(column).text((2, cell // 2 - 6), name, fill="black")
    im.paste(column.rotate(90, expand=True), (label_w + i * cell, 26))
    for j in range(k):
      x, y, v = label_w + j * cell, top + i * cell, rows[i, j]
      if np.isnan(v):
        colour = (225, 225, 225)
      else:
        colour = tuple(int(255 - (255 - c) * v) for c in (8, 48, 107))
      draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=colour, outline=(235, 235, 235))
      if not np.isnan(v) and v >= 0.01:
        draw.text((x + 2, y + cell // 2 - 6), f"{100 * v:.0f}", fill="white" if v > 0.5 else "black")
  draw.text((label_w, top + k * cell + 8), "rows: ground truth; columns: prediction; % of the row", fill="black")
  return im
