"""Paired comparisons across seeds (dmmd_jax/evaluation/paired.py) against a hand computation."""

import math

import numpy as np
import pytest

from dmmd_jax.evaluation import paired


def test_paired_se_is_that_of_the_per_seed_differences():
  a, b = [1.0, 2.0, 4.0], [0.5, 1.0, 3.5]
  p = paired.compare("m", "A", a, "B", b, lower_is_better=True)
  d = np.array([0.5, 1.0, 0.5])
  assert p.diff == pytest.approx(d.mean())
  assert p.se == pytest.approx(math.sqrt(np.sum((d - d.mean()) ** 2) / 2 / 3))
  # Unpaired SEs would be ~1.4 here; pairing removes the shared per-seed level.
  assert p.se < 0.2 and (p.mean_a, p.mean_b, p.n) == (pytest.approx(7 / 3), pytest.approx(5 / 3), 3)


@pytest.mark.parametrize("a, lower, verdict", [
    ([1.0, 1.1, 0.9], True, "B better"),     # A higher, lower is better: B wins by ≫ 2 SE
    ([1.0, 1.1, 0.9], False, "A better"),
    ([0.05, 0.0, -0.05], True, "unresolved"),  # within 2 SE
    ([-0.05, 0.0, -0.02], True, "unresolved"),  # A better by 1.6 paired SE: not enough
])
def test_verdict_needs_two_paired_ses(a, lower, verdict):
  assert paired.compare("m", "A", a, "B", [0.0, 0.0, 0.0], lower).verdict() == verdict


def test_fewer_than_three_seeds_is_never_held():
  p = paired.compare("m", "A", [0.0, 0.0], "B", [1.0, 1.1], lower_is_better=True)
  assert p.diff < -10 * p.se and p.verdict() == "unresolved" and not p.at_least_as_good()


def test_at_least_as_good_allows_one_se_of_shortfall():
  b = [0.0, 0.0, 0.0]
  worse_within_one_se = paired.compare("m", "A", [0.1, -0.1, 0.15], "B", b, lower_is_better=True)
  assert worse_within_one_se.diff <= worse_within_one_se.se
  assert worse_within_one_se.at_least_as_good()
  assert not paired.compare("m", "A", [1.0, 1.1, 0.9], "B", b, True).at_least_as_good()


def test_unequal_lengths_are_refused():
  with pytest.raises(ValueError, match="equal-length"):
    paired.compare("m", "A", [1.0, 2.0], "B", [1.0], True)


def test_compare_rows_pairs_by_seed_whatever_the_row_order():
  rows = [{"seed": s, "model": m, "steps": k, "x": v} for s, m, k, v in [
      (1, "student", 4, "2.0"), (0, "teacher", 16, 1.0), (0, "student", 4, 1.5),
      (1, "teacher", 16, 1.0), (2, "teacher", 16, 3.0), (2, "student", 4, 3.0),
      (0, "teacher", 4, 9.0)]]
  p = paired.compare_rows(rows, "x", ("student", 4), ("teacher", 16), lower_is_better=True)
  want = paired.compare("x", "student@4", [1.5, 2.0, 3.0], "teacher@16", [1.0, 1.0, 3.0], True)
  assert p == want
  with pytest.raises(ValueError, match="different seeds"):
    paired.compare_rows(rows, "x", ("student", 4), ("teacher", 4), lower_is_better=True)
