"""Ancestral samplers for teachers and D-MMD students.

k steps on a time grid 1 = t_k > … > t_0 = 0 (`schedules.time_grid`): start from the prior (all
MASK, or uniform tokens) and at each step draw z_s ~ Σ_c x̂_c q(z_s | z_t, e_c) with
x̂ = softmax(adjusted logits of the denoiser at z_t). One `lax.scan` per (k, options) → one compile.

Options:
- temperature τ (logits / τ) and top-p (nucleus: keep the smallest set of tokens with mass ≥ p;
  the threshold is found by bisection on the probability, no sort of the vocabulary);
- float64 categorical sampling (default for evaluation): Gumbel-max in float32 cannot produce
  Gumbel noise above ≈ 16.6, so tokens more than that many nats below the best are never drawn
  and rare tokens are under-sampled; the whole sampler is traced with x64 enabled instead;
- `cache` (masked only): if no position changed since the last network call, reuse its output
  instead of calling the network (MDLM's caching). Exact for time-independent denoisers
  (`model.time_conditioning=False`), an approximation otherwise; never used with student noise
  (fresh noise changes the input every step);
- `noise`: the D-MMD student's Gaussian input, drawn fresh at every step;
- prompts and infilling (`fixed`, `fixed_tokens`): fixed positions hold their given token at
  every step (masked: they start unmasked and are never masked; uniform: clamped after every
  step), the other positions are sampled given them (`data/prompts.py` builds the arrays);
- `return_order` (masked only): also the step at which each position was unmasked, to see which
  step of a few-step sampler makes an error (`bench/mirror_errors.py`).
"""

import dataclasses

import jax
import jax.numpy as jnp

from dmmd_jax import config_lib
from dmmd_jax.diffusion import forward_process, schedules


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  steps: int
  grid: str = "uniform"
  temperature: float = 1.0
  top_p: float = 1.0
  float64: bool = True
  cache: bool = False

  def validate(self):
    if self.steps <= 0:
      raise ValueError(f"Sampling steps must be positive, got {self.steps}.")
    if self.temperature <= 0:
      raise ValueError(f"temperature must be positive, got {self.temperature}.")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
    if self.grid not in config_lib.TIME_GRIDS:
      raise ValueError(f"Unknown time grid {self.grid!r}; choose one of {config_lib.TIME_GRIDS}.")


def top_p_keep(logits, top_p: float, iterations: int = 32):
  """Nucleus set `[..., K]` bool: tokens with probability ≥ τ, the largest τ keeping mass ≥ top_p.

  τ is found by bisection on [0, max p]; ties at the threshold are all kept.
  """
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

  def mass_above(tau):
    return jnp.sum(jnp.where(probs >= tau[..., None], probs, 0.0), axis=-1)

  def body(_, bounds):
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    ok = mass_above(mid) >= top_p
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  hi = jnp.max(probs, axis=-1)
  lo, _ = jax.lax.fori_loop(0, iterations, body, (jnp.zeros_like(hi), hi))
  return probs >= lo[..., None]


def adjust_logits(logits, temperature: float = 1.0, top_p: float = 1.0, top_p_mode: str = "hard",
                  top_p_delta: float = 2.0):
  """Temperature and top-p applied to logits `[..., K]`.

  hard: excluded tokens get log 0 (`kernels.NEG_INF`) — what a sampler wants.
  soft: excluded tokens get logits − Δ — what D-MMD distillation of a top-p teacher needs, since a
    −∞ teacher log-probability makes the student's log-ratio loss diverge (paper, "soft top-p").
  """
  if top_p_mode not in config_lib.TOP_P_MODES:
    raise ValueError(f"Unknown top_p_mode {top_p_mode!r}; choose one of {config_lib.TOP_P_MODES}.")
  logits = logits / temperature
  if top_p >= 1.0:
    return logits
  keep = top_p_keep(logits, top_p)
  excluded = forward_process.NEG_INF if top_p_mode == "hard" else logits - top_p_delta
  return jnp.where(keep, logits, excluded)


def categorical(key, log_probs, float64: bool):
  """Gumbel-max draw `[...]` int32 from log-probs `[..., K]` (float64 noise if enabled)."""
  dtype = jnp.float64 if float64 else jnp.float32
  gumbel = jax.random.gumbel(key, log_probs.shape, dtype)
  return jnp.argmax(log_probs.astype(dtype) + gumbel, axis=-1).astype(jnp.int32)


def reverse_step(key, kernel, cfg: SamplerConfig, z_t, logits, s, t):
  """One ancestral step: z_s ~ Σ_c x̂_c q(z_s | z_t, e_c)."""
  logits = adjust_logits(logits, cfg.temperature, cfg.top_p)
  log_x = jax.nn.log_softmax(logits, axis=-1)
  return categorical(key, forward_process.posterior_log_probs(kernel, z_t, log_x, s, t),
                     cfg.float64)


def clamp(z, fixed, fixed_tokens):
  """z `[batch, length]` with the fixed positions (bool, broadcastable) set to fixed_tokens."""
  return z if fixed is None else jnp.where(fixed, fixed_tokens, z).astype(z.dtype)


def _scan_sampler(key, apply_fn, params, kernel, cfg: SamplerConfig, batch_size, seq_len, noise_fn,
                  fixed=None, fixed_tokens=None):
  grid = schedules.time_grid(cfg.steps, cfg.grid)
  prior_key, key = jax.random.split(key)
  z = clamp(forward_process.sample_prior(prior_key, kernel, (batch_size, seq_len)), fixed,
            fixed_tokens)

  def network(z, t, step_key):
    noise = None if noise_fn is None else noise_fn(step_key, batch_size)
    return apply_fn(params, z, jnp.full((batch_size,), t), noise).astype(jnp.float32)

  use_cache = cfg.cache and kernel.is_masked and noise_fn is None

  def step(carry, i):
    z, prev_z, prev_logits, order = carry
    t, s = grid[i], grid[i + 1]
    noise_key, draw_key = jax.random.split(jax.random.fold_in(key, i))
    if use_cache:
      logits = jax.lax.cond(jnp.all(z == prev_z), lambda: prev_logits,
                            lambda: network(z, t, noise_key))
    else:
      logits = network(z, t, noise_key)
    z_s = clamp(reverse_step(draw_key, kernel, cfg, z, logits, s, t), fixed, fixed_tokens)
    if kernel.is_masked:
      order = jnp.where((z == kernel.mask_id) & (z_s != kernel.mask_id), i.astype(order.dtype),
                        order)
    return (z_s, z, logits, order), None

  init_logits = jnp.zeros((batch_size, seq_len, kernel.vocab_size), jnp.float32)
  init = (z, jnp.full_like(z, -1), init_logits, jnp.full_like(z, -1))
  (z, _, _, order), _ = jax.lax.scan(step, init, jnp.arange(cfg.steps))
  return z, order


_jitted_sampler = jax.jit(_scan_sampler, static_argnums=(1, 3, 4, 5, 6, 7))


def sample(key, apply_fn, params, kernel: forward_process.ForwardProcess, cfg: SamplerConfig,
           batch_size: int,
           seq_len: int, noise_fn=None, fixed=None, fixed_tokens=None, return_order: bool = False):
  """Draw `[batch_size, seq_len]` int32 tokens with `cfg.steps` ancestral steps.

  apply_fn(params, tokens, t, noise) → logits `[batch, length, K]` (hashable, e.g. a
  `functools.partial` of `denoiser.apply`); noise_fn(key, batch) → noise or None, drawn fresh at
  every step (students). fixed: bool `[batch, seq_len]` (or broadcastable) and fixed_tokens: int
  `[batch, seq_len]` in [0, K) — a prompt or infilling template; the fixed tokens appear unchanged
  in the output. Deterministic for a given key. return_order (masked kernels): also return int32
  `[batch_size, seq_len]`, the index in [0, steps) of the step that unmasked each position (0 =
  the first step, from t = 1; −1 for fixed positions); the tokens are the same as without it.
  """
  cfg.validate()
  if return_order and not kernel.is_masked:
    raise ValueError("return_order needs a masked kernel: uniform positions have no unmasking "
                     "step.")
  args = (key, apply_fn, params, kernel, cfg, batch_size, seq_len, noise_fn, fixed, fixed_tokens)
  if cfg.float64:
    with jax.enable_x64(True):
      tokens, order = _jitted_sampler(*args)
  else:
    tokens, order = _jitted_sampler(*args)
  return (tokens, order) if return_order else tokens
