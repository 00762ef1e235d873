"""Small charts drawn with PIL (no plotting library needed): the proposals curve."""

from PIL import Image, ImageDraw


def line_plot(xs, ys, title: str, xlabel: str, ylabel: str, size=(640, 420)) -> Image.Image:
  """A line chart with points, value labels and a log-spaced-by-rank x axis (one tick per x)."""
  w, h = size
  left, right, top, bottom = 70, 20, 40, 60
  im = Image.new("RGB", size, "white")
  draw = ImageDraw.Draw(im)
  lo, hi = min(ys), max(ys)
  pad = max((hi - lo) * 0.15, 1.0)
  lo, hi = lo - pad, hi + pad
  px = lambda i: left + (w - left - right) * (i + 0.5) / len(xs)  # x ticks evenly by rank
  py = lambda y: top + (h - top - bottom) * (hi - y) / (hi - lo)
  draw.rectangle([left, top, w - right, h - bottom], outline="black")
  for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
    y = lo + (hi - lo) * frac
    draw.line([left - 4, py(y), left, py(y)], fill="black")
    draw.text((8, py(y) - 6), f"{y:.1f}", fill="black")
  points = [(px(i), py(y)) for i, y in enumerate(ys)]
  draw.line(points, fill=(31, 119, 180), width=3)
  for i, ((x, y), value) in enumerate(zip(points, ys)):
    draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(31, 119, 180))
    draw.text((x - 12, y - 18), f"{value:.1f}", fill="black")
    draw.text((x - 6, h - bottom + 8), str(xs[i]), fill="black")
  draw.text((w // 2 - 60, h - 24), xlabel, fill="black")
  draw.text((8, top - 24), ylabel, fill="black")
  draw.text((w // 2 - 100, 10), title, fill="black")
  return im
