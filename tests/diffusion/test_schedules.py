"""Tests for `dmmd_jax.schedules`: α_t, α'_t, the ELBO weight and sampling time grids."""

import jax.numpy as jnp
import numpy as np
import pytest

from dmmd_jax.diffusion import schedules

SCHEDULES = ("linear", "cosine")


def _alpha_ref(t, schedule):
  """float64 reference α_t."""
  t = np.asarray(t, np.float64)
  if schedule == "linear":
    return 1.0 - t
  return np.cos(0.5 * np.pi * t)


def _np(x):
  return np.asarray(x, np.float64)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_alpha_endpoints_are_exact(schedule):
  assert float(schedules.alpha(jnp.float32(0.0), schedule)) == 1.0
  assert float(schedules.alpha(jnp.float32(1.0), schedule)) == 0.0
  # Outside [0, 1] the schedule is clamped to its endpoint values.
  assert float(schedules.alpha(jnp.float32(-0.25), schedule)) == 1.0
  assert float(schedules.alpha(jnp.float32(1.25), schedule)) == 0.0


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_alpha_matches_formula_and_is_strictly_decreasing(schedule):
  t = np.linspace(0.0, 1.0, 1001, dtype=np.float32)
  a = _np(schedules.alpha(jnp.asarray(t), schedule))
  assert a.shape == t.shape
  np.testing.assert_allclose(a, _alpha_ref(t, schedule), atol=1e-6)
  assert np.all(np.diff(a) < 0)
  assert np.all((a >= 0.0) & (a <= 1.0))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_alpha_keeps_shape(schedule):
  t = jnp.full((2, 3, 1), 0.25)
  assert schedules.alpha(t, schedule).shape == (2, 3, 1)
  assert schedules.alpha_derivative(t, schedule).shape == (2, 3, 1)
  assert schedules.elbo_weight(t, schedule).shape == (2, 3, 1)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_alpha_derivative_matches_finite_difference(schedule):
  h = 1e-2
  t = np.linspace(0.02, 0.98, 49)
  fd = (_np(schedules.alpha(jnp.asarray(t + h, jnp.float32), schedule))
        - _np(schedules.alpha(jnp.asarray(t - h, jnp.float32), schedule))) / (2 * h)
  d = _np(schedules.alpha_derivative(jnp.asarray(t, jnp.float32), schedule))
  # Central difference: truncation (π/2)³ h² / 6 ≈ 6.5e-5, float32 rounding ≈ 1e-5.
  np.testing.assert_allclose(d, fd, atol=3e-4)
  assert np.all(d < 0)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_alpha_derivative_at_endpoints(schedule):
  d = _np(schedules.alpha_derivative(jnp.array([0.0, 1.0]), schedule))
  expected = [-1.0, -1.0] if schedule == "linear" else [0.0, -0.5 * np.pi]
  np.testing.assert_allclose(d, expected, atol=1e-6)


@pytest.mark.parametrize("t", [1e-4, 1e-3, 1e-2, 0.1, 0.5, 0.9, 1.0])
def test_elbo_weight_linear_is_one_over_t(t):
  w = float(schedules.elbo_weight(jnp.float32(t), "linear"))
  np.testing.assert_allclose(w, 1.0 / float(np.float32(t)), rtol=1e-3)


@pytest.mark.parametrize("t", [1e-4, 1e-3, 1e-2, 0.1, 0.5, 0.9, 1.0])
def test_elbo_weight_cosine_matches_formula(t):
  # w(t) = −α'_t / (1 − α_t) = (π/2) sin(πt/2) / (1 − cos(πt/2)) = (π/2) cot(πt/4).
  t64 = float(np.float32(t))
  expected = 0.5 * np.pi / np.tan(0.25 * np.pi * t64)
  w = float(schedules.elbo_weight(jnp.float32(t), "cosine"))
  np.testing.assert_allclose(w, expected, rtol=1e-3)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_elbo_weight_is_positive_and_decreasing(schedule):
  t = np.linspace(0.01, 1.0, 100, dtype=np.float32)
  w = _np(schedules.elbo_weight(jnp.asarray(t), schedule))
  assert np.all(np.isfinite(w)) and np.all(w > 0)
  assert np.all(np.diff(w) < 0)


@pytest.mark.parametrize("num_steps", [1, 2, 7, 64])
@pytest.mark.parametrize("grid", ["uniform", "cosine"])
def test_time_grid_shape_endpoints_and_monotone(num_steps, grid):
  g = np.asarray(schedules.time_grid(num_steps, grid))
  assert g.shape == (num_steps + 1,)
  assert g[0] == 1.0 and g[-1] == 0.0
  assert np.all(np.diff(g) < 0)
  i = np.arange(num_steps, -1, -1, dtype=np.float64)
  if grid == "uniform":
    expected = i / num_steps
  else:
    expected = 1.0 - np.cos(0.5 * np.pi * i / num_steps)
  np.testing.assert_allclose(g, expected, atol=1e-6)


def test_cosine_time_grid_is_finer_near_zero():
  g = np.asarray(schedules.time_grid(16, "cosine"), np.float64)
  steps = -np.diff(g)  # step sizes from t = 1 down to t = 0
  assert np.all(np.diff(steps) < 0)
  assert steps[-1] < 1.0 / 16 < steps[0]


@pytest.mark.parametrize("fn", [schedules.alpha, schedules.alpha_derivative,
                                schedules.elbo_weight])
def test_unknown_schedule_raises(fn):
  with pytest.raises(ValueError, match="Unknown schedule"):
    fn(jnp.float32(0.5), "quadratic")


def test_check_schedule():
  for name in SCHEDULES:
    schedules.check_schedule(name)
  with pytest.raises(ValueError, match="Unknown schedule"):
    schedules.check_schedule("Linear")


@pytest.mark.parametrize("num_steps", [0, -1, -8])
def test_time_grid_rejects_non_positive_steps(num_steps):
  with pytest.raises(ValueError, match="positive"):
    schedules.time_grid(num_steps)


def test_time_grid_rejects_unknown_grid():
  with pytest.raises(ValueError, match="Unknown time grid"):
    schedules.time_grid(4, "log")
