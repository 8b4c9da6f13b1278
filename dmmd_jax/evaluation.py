"""Compare teachers and students at several sampling step counts: sample, score, table, plot.

Metrics (each a function of the model and its samples `[n, length]`):
- `mmd2`: unbiased kernel MMD² (exponentiated Hamming kernel) between samples and held-out data —
  lower is better, 0 for a perfect sampler up to noise (reported with its standard error);
- `teacher_nelbo`: the negative ELBO (bits/token) of the samples under the reference teacher —
  how likely the teacher finds them; lower is more teacher-like (can be gamed by low diversity,
  so read it together with mmd2 and entropy);
- `entropy`: per-sequence unigram entropy of the samples (nats), the mode-collapse detector.
"""

import csv
import dataclasses
import json
import os

import numpy as np

from dmmd_jax import metrics as metrics_lib
from dmmd_jax import runs

METRICS = ("mmd2", "teacher_nelbo", "entropy")


@dataclasses.dataclass
class Row:
  model: str
  kind: str
  steps: int
  metrics: dict

  def flat(self) -> dict:
    return {"model": self.model, "kind": self.kind, "steps": self.steps, **self.metrics}


def check_comparable(models) -> None:
  """All models must share vocabulary and length (else their numbers are not comparable)."""
  ref = models[0].setup.info
  for m in models[1:]:
    info = m.setup.info
    if (info.vocab_size, info.seq_len, info.tokenizer) != (ref.vocab_size, ref.seq_len,
                                                           ref.tokenizer):
      raise ValueError(f"{m.workdir} (vocab {info.vocab_size}, length {info.seq_len}) cannot be "
                       f"compared with {models[0].workdir} (vocab {ref.vocab_size}, length "
                       f"{ref.seq_len}): different tokenizer or length.")


def score(samples: np.ndarray, held_out: np.ndarray, reference: runs.Model, vocab_size: int,
          names=METRICS) -> dict:
  out = {}
  if "mmd2" in names:
    value, stderr = metrics_lib.mmd2_with_stderr(samples, held_out)
    out.update(mmd2=float(value), mmd2_se=float(stderr))
  if "teacher_nelbo" in names:
    out["teacher_nelbo"] = reference.negative_elbo_bits(samples)
  if "entropy" in names:
    out["entropy"] = float(metrics_lib.unigram_entropy(samples, vocab_size))
  return out


def evaluate(models, steps_for, num_samples: int, reference: runs.Model, names=METRICS,
             seed: int = 0, batch_size: int = 256, progress=print):
  """Rows for every (model, steps) pair. steps_for(model) → list of step counts."""
  check_comparable(models + [reference])
  held_out = reference.setup.eval_tokens[:num_samples]
  rows = []
  data_row = Row("data (held-out)", "data", 0,
                 score(reference.setup.eval_tokens[-num_samples:], held_out, reference,
                       reference.setup.info.vocab_size, names))
  rows.append(data_row)
  for model in models:
    for steps in steps_for(model):
      samples = model.sample(num_samples, steps, seed, batch_size=batch_size)
      row = Row(os.path.basename(os.path.normpath(model.workdir)), model.kind, steps,
                score(samples, held_out, reference, model.setup.info.vocab_size, names))
      progress(f"{row.model:>24s} steps={steps:<5d} " + " ".join(
          f"{k}={v:.4g}" for k, v in row.metrics.items()))
      rows.append(row)
  return rows


def format_table(rows) -> str:
  keys = [k for k in rows[0].metrics]
  header = f"{'model':>24s} {'kind':>8s} {'steps':>6s} " + " ".join(f"{k:>14s}" for k in keys)
  lines = [header, "-" * len(header)]
  for r in rows:
    lines.append(f"{r.model:>24s} {r.kind:>8s} {r.steps:>6d} " + " ".join(
        f"{r.metrics.get(k, float('nan')):>14.5g}" for k in keys))
  return "\n".join(lines)


def write_results(rows, output_dir: str) -> None:
  os.makedirs(output_dir, exist_ok=True)
  flat = [r.flat() for r in rows]
  with open(os.path.join(output_dir, "results.json"), "w") as f:
    json.dump(flat, f, indent=2)
  with open(os.path.join(output_dir, "results.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(flat[0]))
    writer.writeheader()
    writer.writerows(flat)


def plot(rows, path: str, names=("mmd2", "teacher_nelbo", "entropy")) -> None:
  """One panel per metric: metric vs sampling steps (log x), a line per model, data dashed."""
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  names = [n for n in names if n in rows[0].metrics]
  fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
  for ax, name in zip(axes[0], names, strict=True):
    for model in dict.fromkeys(r.model for r in rows if r.kind != "data"):
      pts = sorted((r.steps, r.metrics[name]) for r in rows if r.model == model)
      style = "o-" if len(pts) > 1 else "s"
      ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=model, markersize=7)
    for r in rows:
      if r.kind == "data":
        ax.axhline(r.metrics[name], color="gray", linestyle="--", label="held-out data")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sampling steps")
    ax.set_title(name)
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
