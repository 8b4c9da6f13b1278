"""Noise schedules α_t for discrete diffusion, t ∈ [0, 1], α_0 = 1 > … > α_1 = 0.

`alpha(t)` is the probability that a token is still clean at time t; the forward kernels
(`kernels.py`) mix the clean one-hot with the prior π by 1 − α_t.

- linear (MDLM):  α_t = 1 − t,           α'_t = −1
- cosine (MD4):   α_t = cos(π t / 2),    α'_t = −(π/2) sin(π t / 2)

The continuous-time ELBO weight of masked diffusion is w(t) = −α'_t / (1 − α_t) (= 1/t linear).
"""

import jax.numpy as jnp

from dmmd_jax import config_lib


def check_schedule(name: str) -> None:
  if name not in config_lib.SCHEDULES:
    raise ValueError(f"Unknown schedule {name!r}; choose one of {config_lib.SCHEDULES}.")


def alpha(t, schedule: str = "linear"):
  """α_t, same shape as t."""
  check_schedule(schedule)
  t = jnp.clip(t, 0.0, 1.0)
  if schedule == "linear":
    return 1.0 - t
  # cos(π/2) is 6e-17 in float64 but −4.4e-8 in float32; clip so α_1 = 0 exactly.
  return jnp.clip(jnp.cos(0.5 * jnp.pi * t), 0.0, 1.0)


def alpha_derivative(t, schedule: str = "linear"):
  """dα_t/dt, same shape as t."""
  check_schedule(schedule)
  if schedule == "linear":
    return -jnp.ones_like(t)
  return -0.5 * jnp.pi * jnp.sin(0.5 * jnp.pi * t)


def one_minus_alpha(t, schedule: str = "linear"):
  """1 − α_t without float32 cancellation near t = 0 (cosine: 2 sin²(π t / 4))."""
  check_schedule(schedule)
  t = jnp.clip(t, 0.0, 1.0)
  return t if schedule == "linear" else 2.0 * jnp.sin(0.25 * jnp.pi * t) ** 2


def elbo_weight(t, schedule: str = "linear"):
  """w(t) = −α'_t / (1 − α_t): the masked continuous-time ELBO weight (1/t for linear)."""
  return -alpha_derivative(t, schedule) / jnp.maximum(one_minus_alpha(t, schedule), 1e-12)


def time_grid(num_steps: int, grid: str = "uniform"):
  """Sampling grid t_k > … > t_0 = 0, returned as `[num_steps + 1]` times from 1 down to 0.

  "uniform": t_i = i / k. "cosine": t_i = 1 − cos(π i / (2k)), denser near t = 0 so that the
  last, finest decisions get the smallest steps.
  """
  if num_steps <= 0:
    raise ValueError(f"Sampling steps must be positive, got {num_steps}.")
  u = jnp.linspace(1.0, 0.0, num_steps + 1)
  if grid == "uniform":
    return u
  if grid == "cosine":
    return 1.0 - jnp.cos(0.5 * jnp.pi * u)
  raise ValueError(f"Unknown time grid {grid!r}; choose 'uniform' or 'cosine'.")
