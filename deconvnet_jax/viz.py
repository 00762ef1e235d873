"""Pictures: VOC-palette label PNGs, colour overlays and the HTML gallery."""

import html
import urllib.parse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from deconvnet_jax.labels import voc_colormap
from deconvnet_jax.images import save_text_atomic


def palette_image(mask: np.ndarray) -> Image.Image:
  """[H, W] uint8 indices as a VOC-palette PNG image (values kept, colours for viewers)."""
  im = Image.fromarray(mask)  # mode L; putpalette turns it into P without touching values
  im.putpalette(voc_colormap().reshape(-1).tolist())
  return im


def overlay(image: np.ndarray, label: np.ndarray, alpha: float = 0.5) -> np.ndarray:
  """Class colours blended over the image where the label is not background: [H, W, 3] uint8."""
  colours = voc_colormap()[label].astype(np.float32)
  blend = np.where((label > 0)[..., None], (1 - alpha) * image + alpha * colours, image)
  return blend.astype(np.uint8)


def error_map(image: np.ndarray, pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
  """Where the prediction is wrong (red) or right (green) over a dimmed image; void left grey."""
  out = (0.4 * image.astype(np.float32) + 0.3 * 128).astype(np.uint8)
  known = truth != 255
  out[known & (pred == truth)] = (0.5 * out[known & (pred == truth)] + (0, 110, 0)).astype(np.uint8)
  out[known & (pred != truth)] = (230, 30, 30)
  return out


def legend_html(class_ids, class_names) -> str:
  cmap = voc_colormap()
  return " ".join(
      f'<span class="class"><span class="swatch" style="background:rgb{tuple(int(c) for c in cmap[i])}">'
      f"</span>{html.escape(class_names[i])}</span>" for i in class_ids if i < len(class_names))


def gallery_html(out_dir, names, class_names, failures=(), errors: bool = False) -> Path:
  """OUT/index.html: per image its overlay, label map, error map (with `errors`: ground truth was given),
  the classes found and links to its files; then the files that failed, with their reasons.

  Images scale with the window (a fixed-layout table at 100% width): no horizontal scrolling.
  """
  out_dir = Path(out_dir)
  rows = []
  for name in names:
    label_path = out_dir / f"{name}.png"
    if not label_path.exists():
      continue
    with Image.open(label_path) as im:
      present = [int(i) for i in np.unique(np.asarray(im)) if i != 255]
    href = lambda suffix: urllib.parse.quote(f"{Path(name).as_posix()}{suffix}")
    image = lambda suffix: f'<td><a href="{href(suffix)}"><img src="{href(suffix)}" alt=""></a></td>'
    files = [s for s in (".png", "_overlay.jpg", "_error.png", "_prob.npy") if (out_dir / f"{name}{s}").exists()]
    links = " ".join(f'<a href="{href(s)}">{html.escape(s.lstrip("_").lstrip("."))}</a>' for s in files)
    error = (image("_error.png") if (out_dir / f"{name}_error.png").exists() else "<td></td>") if errors else ""
    rows.append(f'<tr><td>{html.escape(str(name))}<br><small>{links}</small></td>{image("_overlay.jpg")}'
                f'{image(".png")}{error}<td>{legend_html(present, class_names)}</td></tr>')
  failed = "".join(f"<li>{html.escape(str(message))}</li>" for message in failures)
  columns = ['<col style="width:14%">', "<col>", "<col>", *(["<col>"] if errors else []),
             '<col style="width:16%">']
  page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>deconvnet_jax: {len(rows)} images</title>
<style>body{{font-family:sans-serif;margin:1em}} table{{width:100%;table-layout:fixed;border-collapse:collapse}}
img{{width:100%;height:auto;max-height:480px;object-fit:contain}} td{{padding:4px;vertical-align:top;
overflow-wrap:anywhere}} .swatch{{display:inline-block;width:12px;height:12px;margin:0 4px 0 10px;
border:1px solid #555}} .class{{white-space:nowrap}} .failed{{color:#a00}}</style></head><body>
<h1>{len(rows)} segmented images{f", {len(failures)} failed" if failures else ""}</h1>
<p>Legend: {legend_html(range(len(class_names)), class_names)}</p>
{"<p>Errors: red wrong, green right, grey void.</p>" if errors else ""}
{f'<h2 class="failed">{len(failures)} failed</h2><ul class="failed">{failed}</ul>' if failures else ""}
<table>{"".join(columns)}<tr><th>image</th><th>overlay</th><th>classes (VOC palette)</th>{"<th>errors</th>" if errors else ""}<th>found</th></tr>
{chr(10).join(rows)}
</table></body></html>
"""
  path = out_dir / "index.html"
  save_text_atomic(page, path)
  return path


def activation_grid(activations: dict[str, np.ndarray], channels: int = 6, panel: int = 96,
                    label_width: int = 110) -> np.ndarray:
  """The paper's decoder figure for the first image: [H, W, 3] uint8, one row per layer (dict order).

  Each row: the layer name and its fraction of nonzero entries, then its `channels` most
  active channels (largest mean), each min-max scaled to 0-255 and resized (nearest).
  """
  gap = 2
  width = label_width + channels * (panel + gap)
  grid = Image.new("RGB", (width, len(activations) * (panel + gap)), (32, 32, 32))
  draw = ImageDraw.Draw(grid)
  for row, (name, a) in enumerate(activations.items()):
    a = np.asarray(a[0], np.float32)  # [h, w, C]
    top = row * (panel + gap)
    draw.text((4, top + 4), name, fill=(255, 255, 255))
    draw.text((4, top + 20), f"nonzero: {np.count_nonzero(a) / a.size:.3f}", fill=(200, 200, 200))
    for col, c in enumerate(np.argsort(-a.mean(axis=(0, 1)), kind="stable")[:channels]):
      m = a[..., c]
      lo, hi = m.min(), m.max()
      m = (m - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(m)
      im = Image.fromarray(m.astype(np.uint8)).resize((panel, panel), Image.Resampling.NEAREST)
      grid.paste(im.convert("RGB"), (label_width + col * (panel + gap), top))
  return np.asarray(grid)
