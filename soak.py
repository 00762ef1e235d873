"""Soak test of infer.py: mixed good and bad images, CRF workers, a kill -9 midway, a rerun.

  python soak.py                                   # 300 images in a temp dir, ~3 min on a 2-core CPU
  python soak.py --images 60 --checkpoint runs/default --workdir /tmp/soak

Builds its inputs in WORKDIR: a small model trained briefly (unless --checkpoint)
and images of varied sizes (48..400 px) and formats, about a fifth of them
unreadable in different ways (WORKDIR/manifest.json says which). Runs infer.py
with CRF worker processes, SIGKILLs its process group once about half the good
images are done, checks that what is on disk is complete, runs the same command
again and checks that it finishes the rest without redoing any, that every good
image has its outputs and every bad one is reported, and that the resident memory
of infer.py and its workers stays flat. Prints a Markdown table of the figures;
the exit status is 1 if any check failed (the work dir is then kept).
"""

import argparse
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, features

from deconvnet_jax.data.generated import generate, make_example

ROOT = Path(__file__).resolve().parent
# (height, width) of the good images, closed under transposition (EXIF rotation). Each distinct
# size rounded up to 32 px costs infer.py one compilation of the whole-image forward (the default
# proposals run one), so the list is short, and the first good images take each size once: the
# 'start' RSS reading from --start-after (10) images on is then past the compilations.
SIZES = [(48, 48), (64, 96), (96, 64), (128, 128), (150, 200), (200, 150), (256, 256), (300, 400),
         (400, 300), (400, 400)]
GOOD_KINDS = ["png", "jpeg", "jpeg_upper_suffix", "gray_png", "gray_jpeg", "rgba_png", "palette_png",
              "png16", "cmyk_jpeg", "exif_rotated_jpeg", "gif", "bmp", "tiff"] + (
                  ["webp"] if features.check("webp") else [])
BAD_KINDS = ["truncated_jpeg", "truncated_png", "header_only_jpeg", "corrupt_png", "zero_bytes",
             "random_bytes", "text_as_jpg", "truncated_gif", "bomb_header"]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--images", type=int, default=300, help="how many input images, good and bad")
  p.add_argument("--bad-fraction", type=float, default=0.22, help="share of unreadable files")
  p.add_argument("--skip-kind", action="append", default=[], choices=BAD_KINDS, metavar="KIND",
                 help=f"leave out this kind of bad file (repeatable): {', '.join(BAD_KINDS)}")
  p.add_argument("--workdir", type=Path, help="empty or new folder for inputs and outputs "
                 "(default: a temp dir, removed if every check passes)")
  p.add_argument("--checkpoint", type=Path, help="use this checkpoint instead of training one")
  p.add_argument("--train-steps", type=int, default=150, help="steps of the model trained for the soak")
  p.add_argument("--top-k", type=int, default=4, help="infer.py --top-k (proposals per image)")
  p.add_argument("--batch-size", type=int, default=4, help="infer.py --batch-size")
  p.add_argument("--crf-processes", type=int, default=2, help="infer.py --crf-processes")
  p.add_argument("--kill-at", type=float, default=0.5, help="SIGKILL run 1 once this share of the "
                 "good images is done")
  p.add_argument("--start-after", type=int, default=10, help="the 'start' RSS is taken once a run "
                 "has written this many images (past the first compilations)")
  p.add_argument("--window", type=int, default=10, help="the start and end RSS are medians over the "
                 "samples taken while this many images were written")
  p.add_argument("--sample-every", type=float, default=0.5, help="seconds between RSS samples")
  p.add_argument("--rss-tolerance", type=float, default=0.15, help="flat: the end RSS is within this "
                 "share of the peak RSS of the run's first half ...")
  p.add_argument("--rss-slack-mb", type=float, default=50, help="... or within this many MB")
  p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per infer.py run")
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


# ---- inputs ----

def make_checkpoint(workdir: Path, steps: int, seed: int) -> Path:
  """A small model trained `steps` steps on generated 64-96 px images (64 px crops): about a minute."""
  data = generate(workdir / "train_data", num_train=16, num_val=4, seed=seed, image_size=(64, 96))
  model = workdir / "model"
  cmd = [sys.executable, str(ROOT / "train.py"), "--data", str(data), "--workdir", str(model),
         "--steps", str(steps), "--crop", "64", "--batch-size", "4", "--lr", "0.03",
         "--eval-every", str(steps), "--save-every", str(steps), "--seed", str(seed)]
  done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  if done.returncode != 0:
    sys.exit(f"error: training the soak's model failed ({' '.join(cmd)}):\n{done.stdout[-3000:]}")
  return model


def _encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, fmt, **kwargs)
  return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
  return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def good_file(kind: str, rgb: np.ndarray, rng) -> tuple[str, bytes, tuple[int, int]]:
  """(suffix, file bytes, (width, height) infer.py should see) of an image of this kind."""
  im = Image.fromarray(rgb)
  size = im.size
  if kind == "png":
    return ".png", _encoded(im, "PNG"), size
  if kind == "jpeg":
    return ".jpg", _encoded(im, "JPEG", quality=int(rng.integers(60, 96))), size
  if kind == "jpeg_upper_suffix":
    return ".JPEG", _encoded(im, "JPEG", quality=90), size
  if kind == "gray_png":
    return ".png", _encoded(im.convert("L"), "PNG"), size
  if kind == "gray_jpeg":
    return ".jpg", _encoded(im.convert("L"), "JPEG", quality=90), size
  if kind == "rgba_png":
    alpha = np.linspace(0, 255, rgb.shape[1], dtype=np.uint8)[None].repeat(rgb.shape[0], 0)
    return ".png", _encoded(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "PNG"), size
  if kind == "palette_png":
    return ".png", _encoded(im.quantize(64), "PNG"), size
  if kind == "png16":
    return ".png", _encoded(Image.fromarray(rgb[..., 1].astype(np.uint16) * 257), "PNG"), size
  if kind == "cmyk_jpeg":
    return ".jpg", _encoded(im.convert("CMYK"), "JPEG", quality=90), size
  if kind == "exif_rotated_jpeg":
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown: infer.py sees it upright
    return ".jpg", _encoded(im, "JPEG", quality=90, exif=exif), size[::-1]
  if kind == "gif":
    return ".gif", _encoded(im, "GIF"), size
  if kind == "bmp":
    return ".bmp", _encoded(im, "BMP"), size
  if kind == "tiff":
    return ".tif", _encoded(im, "TIFF"), size
  if kind == "webp":
    return ".webp", _encoded(im, "WEBP", quality=80), size
  raise ValueError(kind)


def bad_file(kind: str, rgb: np.ndarray, rng) -> tuple[str, bytes]:
  """(suffix, file bytes) of an unreadable file of this kind, made from the image `rgb`."""
  im = Image.fromarray(rgb)
  if kind == "truncated_jpeg":
    data = _encoded(im, "JPEG", quality=90)
    return ".jpg", data[:len(data) // 2]
  if kind == "truncated_png":
    data = _encoded(im, "PNG")
    return ".png", data[:len(data) // 2]
  if kind == "header_only_jpeg":
    return ".jpg", _encoded(im, "JPEG", quality=90)[:300]
  if kind == "corrupt_png":  # a stretch of the compressed data overwritten; chunk lengths intact
    data = bytearray(_encoded(im, "PNG"))
    middle = len(data) // 2
    data[middle:middle + 64] = rng.bytes(64)
    return ".png", bytes(data)
  if kind == "zero_bytes":
    return [".png", ".jpg"][int(rng.integers(2))], b""
  if kind == "random_bytes":
    return [".png", ".jpg", ".webp"][int(rng.integers(3))], rng.bytes(int(rng.integers(100, 20000)))
  if kind == "text_as_jpg":
    return ".jpg", b"This is not an image, only text in a file named .jpg.\n" * 20
  if kind == "truncated_gif":
    data = _encoded(im, "GIF")
    return ".gif", data[:len(data) // 2]
  if kind == "bomb_header":  # a valid PNG header claiming 30000 x 30000 RGB (2.7 GB decoded)
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    return ".png", (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
                    + _png_chunk(b"IDAT", zlib.compress(b"\0" * 30001 * 4)) + _png_chunk(b"IEND", b""))
  raise ValueError(kind)


def make_images(folder: Path, count: int, bad_fraction: float, skip: list[str], seed: int) -> list[dict]:
  """Writes the images in a shuffled order of kinds; returns the manifest (one dict per file)."""
  rng = np.random.default_rng(seed)
  bad_kinds = [k for k in BAD_KINDS if k not in skip]
  n_bad = round(count * bad_fraction) if bad_kinds else 0
  kinds = [(False, bad_kinds[i % len(bad_kinds)]) for i in range(n_bad)]
  kinds += [(True, GOOD_KINDS[i % len(GOOD_KINDS)]) for i in range(count - n_bad)]
  order = rng.permutation(count)
  first_sizes = [SIZES[i] for i in rng.permutation(len(SIZES))]  # the first good images: each size once
  folder.mkdir(parents=True)
  manifest = []
  for index, i in enumerate(order):
    good, kind = kinds[i]
    h, w = first_sizes.pop() if good and first_sizes else SIZES[int(rng.integers(len(SIZES)))]
    if kind == "exif_rotated_jpeg":
      h, w = w, h  # stored sideways: infer.py sees (h, w) after the rotation
    source, _, _ = make_example(rng, 96, 176)
    rgb = np.asarray(Image.fromarray(source).resize((w, h), Image.Resampling.BILINEAR))
    name = f"img_{index:04d}_{kind}"
    entry = {"name": name, "good": good, "kind": kind}
    if good:
      suffix, data, size = good_file(kind, rgb, rng)
      entry["size"] = list(size)
    else:
      suffix, data = bad_file(kind, rgb, rng)
    entry["file"] = name + suffix
    (folder / entry["file"]).write_bytes(data)
    manifest.append(entry)
  return manifest


# ---- the process tree and its memory ----

def _stat(pid: int) -> tuple[str, int, int] | None:
  """(state, ppid, pgid) of a process, None if it is gone."""
  try:
    text = Path(f"/proc/{pid}/stat").read_text()
  except OSError:
    return None
  fields = text[text.rindex(")") + 2:].split()
  return fields[0], int(fields[1]), int(fields[2])


def _all_stats() -> dict[int, tuple[str, int, int]]:
  stats = {}
  for entry in os.listdir("/proc"):
    if entry.isdigit() and (stat := _stat(int(entry))) is not None:
      stats[int(entry)] = stat
  return stats


def tree(root: int) -> list[int]:
  """root and all its descendants, alive (zombies left out)."""
  stats = _all_stats()
  children = {}
  for pid, (_, ppid, _) in stats.items():
    children.setdefault(ppid, []).append(pid)
  found, todo = [], [root]
  while todo:
    pid = todo.pop()
    if pid in stats and stats[pid][0] != "Z":
      found.append(pid)
    todo += children.get(pid, [])
  return found


def rss_mb(pid: int) -> float | None:
  """VmRSS of a process in MB; None if it is gone (or a zombie)."""
  try:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  except OSError:
    pass
  return None


def group_members(pgid: int) -> list[int]:
  """Live (non-zombie) processes of a process group."""
  return [pid for pid, (state, _, group) in _all_stats().items() if group == pgid and state != "Z"]


# ---- runs ----

def done_count(out: Path, pngs: set[str]) -> int:
  try:
    return len(pngs.intersection(os.listdir(out)))
  except FileNotFoundError:
    return 0


def run_infer(cmd: list[str], log: Path, out: Path, pngs: set[str], args, kill_at: int | None) -> dict:
  """Runs infer.py in its own session, sampling its tree's RSS; SIGKILLs the group at `kill_at` done.

  Returns rc, seconds, killed, samples [(seconds, done, tree MB, main MB, processes, [children's MB])],
  stdout, stderr; writes the samples to LOG.rss.tsv.
  """
  before = done_count(out, pngs)
  started = time.perf_counter()
  with open(f"{log}.out", "w") as stdout, open(f"{log}.err", "w") as stderr:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=stdout, stderr=stderr, start_new_session=True)
  samples, killed, timed_out, survivors = [], False, False, []
  while proc.poll() is None:
    t = time.perf_counter() - started
    done = done_count(out, pngs) - before
    pids = tree(proc.pid)
    sizes = {pid: rss_mb(pid) for pid in pids}
    if sizes.get(proc.pid) is not None:
      others = sorted((s for pid, s in sizes.items() if pid != proc.pid and s), reverse=True)
      samples.append((t, done, sizes[proc.pid] + sum(others), sizes[proc.pid], len(pids), others))
    if (kill_at is not None and done >= kill_at) or t > args.timeout:
      killed, timed_out = kill_at is not None and done >= kill_at, t > args.timeout
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
      deadline = time.time() + 10
      while (survivors := group_members(proc.pid)) and time.time() < deadline:
        time.sleep(0.2)
      break
    time.sleep(args.sample_every)
  proc.wait()
  with open(f"{log}.rss.tsv", "w") as f:  # the memory curve, for a closer look
    f.write("seconds\tdone\ttree_mb\tmain_mb\tprocesses\tchildren_mb\n")
    for t, done, total, main_mb, n, others in samples:
      f.write(f"{t:.1f}\t{done}\t{total:.0f}\t{main_mb:.0f}\t{n}\t{'+'.join(f'{x:.0f}' for x in others)}\n")
  return {"rc": proc.returncode, "seconds": time.perf_counter() - started, "killed": killed,
          "timed_out": timed_out, "survivors": survivors, "samples": samples,
          "stdout": Path(f"{log}.out").read_text(), "stderr": Path(f"{log}.err").read_text()}


def rss_figures(run: dict, start_after: int, window: int) -> dict:
  """The tree's RSS at the start (median over the samples while images start_after .. start_after +
  window were written), at the end (median over the last `window` images, up to the sample that saw
  the last one: later ones are the pool shutting down) and the max; the same for infer.py alone and
  for its children; steady seconds per image between the two. Medians, because a CRF worker's RSS
  swings by 100 MB and more with the size of the image it holds."""
  samples = run["samples"]
  if not samples:
    return {}
  whole = {"max": max(s[2] for s in samples), "processes": max(s[4] for s in samples)}
  last_done = samples[-1][1]
  if last_done < start_after + 2 * window:  # too few images to tell
    return whole
  last = next(i for i, s in enumerate(samples) if s[1] == last_done)
  first = [s for s in samples if start_after <= s[1] < start_after + window]
  final = [s for s in samples[:last + 1] if s[1] > last_done - window]
  median = lambda rows, f: float(np.median([f(s) for s in rows]))
  figures = {**whole, "first": f"{start_after}-{start_after + window}",
             "final": f"{last_done - window}-{last_done}",
             "per_image": (samples[last][0] - first[0][0]) / (last_done - first[0][1])}
  figures["mid_peak"] = max(s[2] for s in samples if s[1] <= last_done // 2)
  for key, rows in (("start", first), ("end", final)):
    figures[key] = median(rows, lambda s: s[2])
    figures[f"main_{key}"] = median(rows, lambda s: s[3])
    figures[f"children_{key}"] = median(rows, lambda s: sum(s[5]))
  return figures


def is_flat(fig: dict, args) -> bool:
  """No growth past the first half's peak: a CRF worker keeps the memory of the largest image it has
  held (the allocator's high-water mark), so RSS rises while larger images first arrive; a leak goes
  on rising with every image."""
  return "start" in fig and fig["end"] - fig["mid_peak"] <= max(args.rss_tolerance * fig["mid_peak"],
                                                                 args.rss_slack_mb)


def or_dash(value) -> str:
  return "-" if value is None else str(value)


def compilations(stderr: str) -> int:
  return stderr.count("debug: compiled the network")


# ---- checks ----

class Checks:
  """Records each check; prints it as it is made."""

  def __init__(self):
    self.failed = []

  def __call__(self, ok: bool, what: str, detail: str = "") -> bool:
    print(f"  {'ok  ' if ok else 'FAIL'} {what}" + (f": {detail}" if detail and not ok else ""), flush=True)
    if not ok:
      self.failed.append(what)
    return ok


def label_problem(out: Path, entry: dict, num_classes: int) -> str | None:
  """Why NAME.png / NAME_overlay.jpg of a good image are not right, or None."""
  size = tuple(entry["size"])
  try:
    with Image.open(out / f"{entry['name']}.png") as im:
      if im.format != "PNG" or im.mode != "P" or im.size != size:
        return f"{entry['name']}.png is {im.format} {im.mode} {im.size}, expected PNG P {size}"
      if np.asarray(im).max() >= num_classes:
        return f"{entry['name']}.png has class {np.asarray(im).max()} >= {num_classes}"
    with Image.open(out / f"{entry['name']}_overlay.jpg") as im:
      im.load()
      if im.size != size:
        return f"{entry['name']}_overlay.jpg is {im.size}, expected {size}"
  except (OSError, SyntaxError, ValueError) as e:
    return f"{entry['name']}: {e}"
  return None


def signature(out: Path, name: str) -> tuple:
  """(inode, mtime) of NAME.png and NAME_overlay.jpg: a rewrite (atomic rename) changes both."""
  stats = [(out / f"{name}{s}").stat() for s in (".png", "_overlay.jpg")]
  return tuple((s.st_ino, s.st_mtime_ns) for s in stats)


def failed_files(stderr: str) -> set[str]:
  """File names (no folder) named in infer.py's `failed: PATH: ...` lines."""
  names = set()
  for line in stderr.splitlines():
    if line.startswith("failed: "):
      names.add(Path(line[len("failed: "):].split(": ", 1)[0]).name)
  return names


def summary(stdout: str) -> dict | None:
  m = re.search(r"(\d+) segmented, (\d+) skipped .*?(\d+) failed; seconds per image: (.*?) \(crf", stdout)
  if not m:
    return None
  return {"segmented": int(m[1]), "skipped": int(m[2]), "failed": int(m[3]), "split": m[4]}


def traceback_tail(stderr: str) -> str:
  lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
  if "Traceback (most recent call last)" not in stderr:
    return ""
  return lines[-1]


# ---- main ----

def main(argv=None) -> int:
  args = parse_args(argv)
  began = time.perf_counter()
  if args.workdir is not None:
    if args.workdir.exists() and any(args.workdir.iterdir()):
      print(f"error: {args.workdir} is not empty; give a new or empty --workdir", file=sys.stderr)
      return 2
    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
  else:
    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
  print(f"work dir: {workdir}", flush=True)

  if args.checkpoint is None:
    t = time.perf_counter()
    args.checkpoint = make_checkpoint(workdir, args.train_steps, args.seed)
    print(f"trained the small model for {args.train_steps} steps in {time.perf_counter() - t:.0f} s: "
          f"{args.checkpoint}", flush=True)
  images, out = workdir / "images", workdir / "out"
  manifest = make_images(images, args.images, args.bad_fraction, args.skip_kind, args.seed)
  (workdir / "manifest.json").write_text(json.dumps(manifest, indent=1))
  good = [e for e in manifest if e["good"]]
  bad = [e for e in manifest if not e["good"]]
  pngs = {e["name"] + ".png" for e in good}
  print(f"{len(manifest)} images in {images}: {len(good)} good "
        f"({', '.join(sorted({e['kind'] for e in good}))}), {len(bad)} bad "
        f"({', '.join(sorted({e['kind'] for e in bad}))}); manifest: {workdir / 'manifest.json'}", flush=True)

  cmd = [sys.executable, str(ROOT / "infer.py"), "--checkpoint", str(args.checkpoint), "--input", str(images),
         "--output", str(out), "--crf-processes", str(args.crf_processes), "--top-k", str(args.top_k),
         "--batch-size", str(args.batch_size), "--debug"]
  print("command:", " ".join(cmd), flush=True)
  check = Checks()
  num_classes = 21
  kill_at = max(1, round(len(good) * args.kill_at))

  print(f"run 1: SIGKILL of the process group once {kill_at} images are done", flush=True)
  run1 = run_infer(cmd, workdir / "run1", out, pngs, args, kill_at)
  done1 = [e for e in good if (out / f"{e['name']}.png").exists()]
  print(f"run 1: {len(done1)} images done when killed after {run1['seconds']:.0f} s (exit status "
        f"{run1['rc']})", flush=True)
  check(run1["killed"], "run 1 was killed midway", (f"still short of {kill_at} after --timeout"
        if run1["timed_out"] else f"it ended by itself, exit status {run1['rc']}")
        + (f"; {traceback_tail(run1['stderr'])}" if traceback_tail(run1["stderr"]) else ""))
  check(not run1["survivors"], "no process of run 1's group survives the kill", str(run1["survivors"]))
  tmps1 = sorted(p.name for p in out.glob(".tmp-*")) if out.exists() else []
  check(len(tmps1) <= 1, "at most one .tmp-* file left by the killed writer", ", ".join(tmps1))
  if tmps1:
    print(f"  note: left by the kill: {', '.join(tmps1)}")
  problems = [p for e in done1 if (p := label_problem(out, e, num_classes))]
  check(not problems, "every NAME.png after the kill is a complete label PNG of the image's size, with "
        "its overlay", "; ".join(problems[:5]))
  outputs_of_bad = [e["name"] for e in bad if list(out.glob(f"{e['name']}[._]*"))]
  check(not outputs_of_bad, "no outputs for bad files", ", ".join(outputs_of_bad[:5]))
  signatures = {e["name"]: signature(out, e["name"]) for e in done1 if not label_problem(out, e, num_classes)}

  print("run 2: the same command", flush=True)
  run2 = run_infer(cmd, workdir / "run2", out, pngs, args, None)
  s2 = summary(run2["stdout"])
  print(f"run 2: exit status {run2['rc']} after {run2['seconds']:.0f} s; "
        + (run2["stdout"].strip().splitlines()[-1] if run2["stdout"].strip() else "no summary"), flush=True)
  check(not traceback_tail(run2["stderr"]), "run 2 ends without a traceback", traceback_tail(run2["stderr"]))
  check(run2["rc"] == (1 if bad else 0), f"run 2 exits {1 if bad else 0}" + (" (some files failed)" if bad else ""),
        f"exit status {run2['rc']}"
        + (f" (killed after --timeout {args.timeout:.0f} s)" if run2["timed_out"] else ""))
  check(s2 is not None, "run 2 prints its summary line", run2["stdout"][-300:])
  s2 = s2 or {"segmented": None, "skipped": None, "failed": None, "split": ""}
  check(s2["skipped"] == len(done1), "run 2 skips exactly the images run 1 finished",
        f"{s2['skipped']} skipped, {len(done1)} done")
  check(s2["segmented"] == len(good) - len(done1), "run 2 segments exactly the rest",
        f"{s2['segmented']} segmented, {len(good) - len(done1)} left")
  changed = [n for n, sig in signatures.items() if not (out / f"{n}.png").exists() or signature(out, n) != sig]
  check(not changed, "run 1's outputs are untouched by run 2 (inode and mtime)", ", ".join(changed[:5]))
  problems = [p for e in good if (p := label_problem(out, e, num_classes))]
  check(not problems, f"all {len(good)} good images have NAME.png (PNG, image size) and NAME_overlay.jpg",
        f"{len(problems)}: " + "; ".join(problems[:5]))
  named = failed_files(run2["stderr"])
  missing = sorted(e["file"] for e in bad if e["file"] not in named)
  check(s2["failed"] == len(bad) and not missing, f"all {len(bad)} bad files are named in `failed:` lines",
        f"{or_dash(s2['failed'])} failed; not named: {', '.join(missing[:8])}")
  wrongly = sorted(named & {e["file"] for e in good})
  check(not wrongly, "no good image is reported failed", ", ".join(wrongly[:5]))
  outputs_of_bad = [e["name"] for e in bad if list(out.glob(f"{e['name']}[._]*"))]
  check(not outputs_of_bad, "no outputs for bad files after run 2", ", ".join(outputs_of_bad[:5]))
  tmps2 = sorted(p.name for p in out.glob(".tmp-*"))
  check(set(tmps2) <= set(tmps1), "run 2 leaves no .tmp-* file of its own", ", ".join(sorted(set(tmps2) - set(tmps1))))
  gallery = (out / "index.html").read_text() if (out / "index.html").exists() else ""
  rows = set(re.findall(r"<tr><td>([^<]+)<", gallery))  # one table row per segmented image
  good_names = {e["name"] for e in good}
  check(rows == good_names and f"<h1>{len(good)} segmented images" in gallery,
        "index.html has a row for every good image and none for a bad one",
        f"{len(rows & good_names)} of {len(good)} good, {len(rows - good_names)} others")

  fig1, fig2 = (rss_figures(run, args.start_after, args.window) for run in (run1, run2))
  for label, fig in (("run 1", fig1), ("run 2", fig2)):
    if "start" in fig:
      grow = fig["end"] - fig["start"]
      check(is_flat(fig, args), f"{label}: RSS of infer.py and its workers is flat "
            f"(start {fig['start']:.0f} MB over images {fig['first']}, end {fig['end']:.0f} MB "
            f"over images {fig['final']}, {grow:+.0f} MB, {grow / fig['start']:+.1%}; the first half's "
            f"peak {fig['mid_peak']:.0f} MB)",
            f"allowed: the first half's peak +{max(args.rss_tolerance * fig['mid_peak'], args.rss_slack_mb):.0f} MB")
    else:
      check(False, f"{label}: RSS sampled over {args.start_after + 2 * args.window} images or more",
            "too few images done")

  def cell(fig, key, fmt="{:.0f}"):
    return fmt.format(fig[key]) if fig and key in fig else "-"

  total = time.perf_counter() - began
  rows = [
      ("images in", f"{len(manifest)} ({len(good)} good, {len(bad)} bad)", "the same"),
      ("segmented", f"{len(done1)} before the {'kill' if run1['killed'] else 'end'}", or_dash(s2["segmented"])),
      ("skipped (done by run 1)", "-", or_dash(s2["skipped"])),
      ("failed, named in `failed:` lines", "-", f"{or_dash(s2['failed'])} ({len(bad) - len(missing)} named)"),
      ("exit status", f"{run1['rc']} (SIGKILL)" if run1["killed"] else str(run1["rc"]), str(run2["rc"])),
      ("wall time, s", f"{run1['seconds']:.0f}", f"{run2['seconds']:.0f}"),
      (f"s per image, steady (image {args.start_after} to the last)", cell(fig1, "per_image", "{:.2f}"),
       cell(fig2, "per_image", "{:.2f}")),
      ("network compilations (`--debug`)", str(compilations(run1["stderr"])), str(compilations(run2["stderr"]))),
      ("processes in the tree, max", cell(fig1, "processes"), cell(fig2, "processes")),
      (f"RSS tree, start (median, images {args.start_after}-{args.start_after + args.window}), MB",
       cell(fig1, "start"), cell(fig2, "start")),
      (f"RSS tree, end (median, last {args.window} images), MB", cell(fig1, "end"), cell(fig2, "end")),
      ("RSS tree, peak in the first half of the run, MB", cell(fig1, "mid_peak"), cell(fig2, "mid_peak")),
      ("RSS tree, max, MB", cell(fig1, "max"), cell(fig2, "max")),
      ("RSS infer.py alone, start / end, MB", f"{cell(fig1, 'main_start')} / {cell(fig1, 'main_end')}",
       f"{cell(fig2, 'main_start')} / {cell(fig2, 'main_end')}"),
      (f"RSS its children ({args.crf_processes} CRF workers, resource tracker), start / end, MB",
       f"{cell(fig1, 'children_start')} / {cell(fig1, 'children_end')}",
       f"{cell(fig2, 'children_start')} / {cell(fig2, 'children_end')}"),
      ("RSS flat", *("-" if "start" not in fig else "yes" if is_flat(fig, args) else "no" for fig in (fig1, fig2))),
  ]
  print(f"\n| soak, {time.strftime('%Y-%m-%d')}: infer.py --top-k {args.top_k} --batch-size {args.batch_size} "
        f"--crf-processes {args.crf_processes} | run 1 (killed) | run 2 |")
  print("|---|---:|---:|")
  for row in rows:
    print("| " + " | ".join(row) + " |")
  print(f"\ninfer.py's split, run 2 (s/image): {s2['split'] or '-'}")
  print(f"whole soak: {total:.0f} s")
  if check.failed:
    print(f"\nFAILED {len(check.failed)} check(s): " + "; ".join(check.failed))
    print(f"work dir kept: {workdir}")
    return 1
  print("\nall checks passed")
  if args.workdir is None:
    shutil.rmtree(workdir, ignore_errors=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
