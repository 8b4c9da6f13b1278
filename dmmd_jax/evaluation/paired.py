"""Paired comparisons across training seeds: is model A better than model B beyond the noise?

For each seed s both models are scored against the same held-out set with the same sampling
seed, giving d_s = metric(A, s) − metric(B, s). The verdict uses the mean of d over seeds and its
standard error SE = std(d, ddof=1) / √n (the paired SE, which cancels what the two rows of one
seed share). RESULTS.md calls a difference "held" only beyond 2 paired SEs with ≥ 3 seeds.
"""

import dataclasses
import math

import numpy as np

MIN_SEEDS = 3
HELD_SES = 2.0


@dataclasses.dataclass(frozen=True)
class Paired:
  """Mean and paired SE of A − B over n seeds, for a metric where lower is better or not."""

  metric: str
  a: str
  b: str
  mean_a: float
  mean_b: float
  diff: float
  se: float
  n: int
  lower_is_better: bool

  def verdict(self) -> str:
    """"A better" / "B better" beyond HELD_SES paired SEs with ≥ MIN_SEEDS seeds, else
    "unresolved"."""
    if self.n < MIN_SEEDS or not math.isfinite(self.se):
      return "unresolved"
    gain = -self.diff if self.lower_is_better else self.diff
    if gain > HELD_SES * self.se:
      return "A better"
    if gain < -HELD_SES * self.se:
      return "B better"
    return "unresolved"

  def at_least_as_good(self) -> bool:
    """A is no worse than B by more than one paired SE (the 'matches' criterion)."""
    gain = -self.diff if self.lower_is_better else self.diff
    return self.n >= MIN_SEEDS and gain >= -self.se

  def row(self) -> dict:
    return {**dataclasses.asdict(self), "verdict": self.verdict(),
            "at_least_as_good": self.at_least_as_good()}


def compare(metric: str, a: str, values_a, b: str, values_b, lower_is_better: bool) -> Paired:
  """values_a, values_b: `[seeds]` metric values of A and B, index i = the same seed."""
  values_a = np.asarray(values_a, np.float64)
  values_b = np.asarray(values_b, np.float64)
  if values_a.shape != values_b.shape or values_a.ndim != 1 or not len(values_a):
    raise ValueError(f"paired values must be two equal-length lists, got {values_a.shape} and "
                     f"{values_b.shape}.")
  d = values_a - values_b
  n = len(d)
  se = float(np.std(d, ddof=1) / np.sqrt(n)) if n > 1 else math.nan
  return Paired(metric, a, b, float(values_a.mean()), float(values_b.mean()), float(d.mean()),
                se, n, lower_is_better)


def compare_rows(rows, metric: str, a: tuple, b: tuple, lower_is_better: bool,
                 key: str = "model") -> Paired:
  """`compare` of two (name, steps) entries of flat result rows over their common seeds.

  rows: dicts with "seed", `key` (the model's name), "steps" and the metric column, a row per
  (seed, model, steps); a, b: (name, steps). Seeds are taken in sorted order.
  """
  def values(name, steps):
    return {r["seed"]: float(r[metric]) for r in rows
            if r[key] == name and int(r["steps"]) == steps}

  va, vb = values(*a), values(*b)
  seeds = sorted(va)
  if sorted(vb) != seeds:
    raise ValueError(f"{a} and {b} were scored for different seeds: {seeds} vs {sorted(vb)}.")
  return compare(metric, f"{a[0]}@{a[1]}", [va[s] for s in seeds], f"{b[0]}@{b[1]}",
                 [vb[s] for s in seeds], lower_is_better)
