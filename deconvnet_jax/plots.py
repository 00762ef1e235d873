"""Small charts drawn with PIL (no plotting library needed): the proposals curves."""

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
