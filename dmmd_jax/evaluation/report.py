"""The comparison's outputs: table, results.{json,csv}, plots, sample files and overviews."""


import csv
import json
import math
import os

import numpy as np

from dmmd_jax.data import render
from dmmd_jax.data import types as data_types


def metric_columns(rows) -> list:
  """Metric columns in first-seen order over all rows."""
  return list(dict.fromkeys(k for r in rows for k in r.metrics))


def format_table(rows) -> str:
  keys = metric_columns(rows)
  width = max([24] + [len(r.model) for r in rows])
  header = f"{'model':>{width}s} {'kind':>8s} {'steps':>6s} " + " ".join(f"{k:>14s}" for k in keys)
  lines = [header, "-" * len(header)]
  for r in rows:
    lines.append(f"{r.model:>{width}s} {r.kind:>8s} {r.steps:>6d} " + " ".join(
        f"{r.metrics.get(k, float('nan')):>14.5g}" for k in keys))
  return "\n".join(lines)


def write_results(rows, output_dir: str) -> None:
  os.makedirs(output_dir, exist_ok=True)
  flat = [r.flat() for r in rows]
  with open(os.path.join(output_dir, "results.json"), "w") as f:  # NaN → null (strict JSON)
    json.dump([{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()}
               for r in flat], f, indent=2)
  write_csv(os.path.join(output_dir, "results.csv"), flat)


def write_csv(path: str, rows, append: bool = False) -> None:
  """Flat dict rows as CSV, columns in first-seen order (missing cells empty); with append, add
  to an existing file without a second header."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  header = not (append and os.path.exists(path))
  with open(path, "a" if append else "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)),
                            restval="")
    if header:
      writer.writeheader()
    writer.writerows(rows)


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def _plot_panel(ax, rows, name: str) -> None:
  """One metric vs steps: a line per model (error bars from `{name}_se`), reference rows flat.
  Non-finite values (e.g. exact_nll when no sample is valid) are left out; a panel with none
  says so instead of drawing an empty log axis."""
  drawn = False
  for model in dict.fromkeys(r.model for r in rows if r.kind not in ("data", "samples")):
    pts = sorted((r.steps, r.metrics.get(name, np.nan), r.metrics.get(f"{name}_se", 0.0))
                 for r in rows if r.model == model and np.isfinite(r.metrics.get(name, np.nan)))
    if not pts:
      continue
    drawn = True
    xs, ys, errs = zip(*pts, strict=True)
    ax.errorbar(xs, ys, yerr=errs if any(errs) else None, fmt="o-" if len(pts) > 1 else "s",
                label=model, markersize=6, capsize=3)
  for r in rows:
    if r.kind in ("data", "samples") and np.isfinite(r.metrics.get(name, np.nan)):
      ax.axhline(r.metrics[name], color="gray", linestyle="--" if r.kind == "data" else ":",
                 label=r.model)
  if drawn:
    ax.set_xscale("log", base=2)
  else:
    ax.text(0.5, 0.5, "no finite values", ha="center", va="center", transform=ax.transAxes)
  ax.set_xlabel("sampling steps")
  ax.set_title(name)
  ax.grid(alpha=0.3)


def plot(rows, path: str, names=None) -> None:
  """Metric vs sampling steps (log x), a line per model, real data dashed; one panel per metric.

  names: the metric columns to draw (default: every column except the `*_se` errors, which
  become error bars).
  """
  plt = _pyplot()
  columns = metric_columns(rows)
  names = [n for n in (names or columns) if n in columns and not n.endswith("_se")]
  cols = min(3, len(names))
  grid = (math.ceil(len(names) / cols), cols)
  fig, axes = plt.subplots(*grid, figsize=(5 * cols, 4 * grid[0]), squeeze=False)
  for ax, name in zip(axes.flat, names, strict=False):
    _plot_panel(ax, rows, name)
  for ax in list(axes.flat)[len(names):]:
    ax.axis("off")
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_diagnostics(metrics_rows, path: str) -> bool:
  """A student's matching diagnostics vs update step: `moment_mismatch/b*` and
  `student_entropy/b*` (a line per bucket of s, `distill/diagnostics.py`) from its metrics.jsonl
  rows. Returns False (and writes nothing) when the rows hold no diagnostics."""
  panels = ("moment_mismatch", "student_entropy")
  series = {p: {} for p in panels}
  for row in metrics_rows:
    for key, value in row.items():
      panel, _, bucket = key.partition("/b")
      if panel in series and bucket.isdigit():
        series[panel].setdefault(int(bucket), []).append((row["step"], value))
  if not any(series.values()):
    return False
  plt = _pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for ax, panel in zip(axes, panels, strict=True):
    buckets = series[panel]
    for b in sorted(buckets):
      steps, values = zip(*buckets[b], strict=True)
      ax.plot(steps, values, "o-", markersize=3,
              label=f"s ∈ [{b}/{len(buckets)}, {b + 1}/{len(buckets)})")
    ax.set_xlabel("D-MMD update")
    ax.set_title(panel + (" (TV of first moments)" if panel == "moment_mismatch" else " (nats)"))
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def save_samples(output_dir: str, info: data_types.DataInfo, label: str, tokens) -> str:
  """samples/<label>.npy plus a PNG grid (images) or decoded text; returns the preview path."""
  folder = os.path.join(output_dir, "samples")
  os.makedirs(folder, exist_ok=True)
  stem = os.path.join(folder, label.replace("/", "_").replace(" ", "_"))
  np.save(stem + ".npy", np.asarray(tokens, np.int32))
  return render.dump_samples(info, tokens, stem)


def sample_overview(path_stem: str, info: data_types.DataInfo, entries, per_row: int = 8) -> str:
  """A grid with one row of `per_row` images per (label, tokens) entry (images, PNG), or the
  first few decoded samples of each entry (text, .txt). Returns the path."""
  if info.kind != "image":
    blocks = [f"### {label}\n" + "\n---\n".join(render.decode_text(info, tokens[:3]))
              for label, tokens in entries]
    with open(path_stem + ".txt", "w") as f:
      f.write("\n\n".join(blocks) + "\n")
    return path_stem + ".txt"
  plt = _pyplot()
  h, w, _ = info.image_shape
  fig, axes = plt.subplots(len(entries), 1, figsize=(per_row * 0.9 + 2, 1.0 * len(entries) + 0.3),
                           squeeze=False)
  for ax, (label, tokens) in zip(axes[:, 0], entries, strict=True):
    strip = np.asarray(tokens[:per_row]).reshape(-1, h, w, info.image_shape[2])[..., 0]
    ax.imshow(np.concatenate(list(strip), axis=1), cmap="gray", vmin=0,
              vmax=info.vocab_size - 1)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
  fig.tight_layout()
  fig.savefig(path_stem + ".png", dpi=110)
  plt.close(fig)
  return path_stem + ".png"
