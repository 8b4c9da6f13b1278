"""The forward process of discrete diffusion: masked (absorbing) and uniform categorical kernels.

`ForwardProcess` names the kind ("kernel" in the paper and in `config.kernel`) and its schedule.

Per position, with K data tokens and prior π,

    q(z_t | x) = Cat(α_t x + (1 − α_t) π)
    masked:  π = one-hot of MASK, an extra token id K (the model sees K + 1 input ids)
    uniform: π = 1 / K

Posterior for s < t, with α_{t|s} = α_t / α_s:

    q(z_s | z_t, x) ∝ [α_{t|s} z_t + (1 − α_{t|s}) (πᵀ z_t) 1] ⊙ [α_s x + (1 − α_s) π]

For a *soft* x (a probability vector x̂, e.g. a denoiser's output) this module always returns the
mixture Σ_c x̂_c q(z_s | z_t, x = e_c), the D3PM "x0-parametrised" reverse step. For the masked
kernel the posterior is linear in x, so the mixture equals the plug-in formula. For the uniform
kernel it does not (the normaliser depends on x); the mixture is the proper reverse transition of
a factorised denoiser and is linear in x̂, which the D-MMD losses rely on (see `distill/dmmd.py`).

The uniform mixture costs O(K) per position. With i = z_t,
    a_j = α_{t|s} δ_ij + (1 − α_{t|s}) / K      = q(z_t = i | z_s = j)
    m_cj = α_s δ_cj + (1 − α_s) / K             = q(z_s = j | x = c)
    n_c = α_t δ_ci + (1 − α_t) / K              = q(z_t = i | x = c)
    P_j = Σ_c x̂_c a_j m_cj / n_c = a_j [α_s x̂_j / n_j + ((1 − α_s) / K) Σ_c x̂_c / n_c]

Everything here is computed in log space so that hard one-hot inputs and tiny probabilities stay
finite: `NEG_INF` stands for log 0 (finite, so 0 · (log a − log b) terms stay 0 rather than NaN).
"""

import dataclasses

import jax
import jax.numpy as jnp

from dmmd_jax import config_lib
from dmmd_jax.diffusion import schedules

NEG_INF = -1e30




@dataclasses.dataclass(frozen=True)
class ForwardProcess:
  """A forward process: `kind` ∈ {masked, uniform}, K = `vocab_size` data tokens, a schedule."""

  kind: str
  vocab_size: int
  schedule: str = "linear"

  def __post_init__(self):
    if self.kind not in config_lib.KERNEL_KINDS:
      raise ValueError(f"Unknown kernel {self.kind!r}; choose one of {config_lib.KERNEL_KINDS}.")
    if self.vocab_size < 2:
      raise ValueError(f"vocab_size must be at least 2, got {self.vocab_size}.")
    schedules.check_schedule(self.schedule)

  @property
  def is_masked(self) -> bool:
    return self.kind == "masked"

  @property
  def mask_id(self) -> int:
    """The MASK token id (= K); only meaningful for the masked kernel."""
    return self.vocab_size

  @property
  def input_vocab_size(self) -> int:
    """Ids the denoiser reads: K + 1 for masked (with MASK), K for uniform."""
    return self.vocab_size + 1 if self.is_masked else self.vocab_size

  def alpha(self, t):
    return schedules.alpha(t, self.schedule)


def safe_log(x):
  """log x with log 0 = NEG_INF (finite)."""
  return jnp.where(x > 0, jnp.log(jnp.maximum(x, 1e-38)), NEG_INF)


def log_one_hot(x, num_classes: int):
  """Log of one-hot(x): `[...]` ints → `[..., num_classes]` with 0 at x and NEG_INF elsewhere."""
  return jnp.where(jax.nn.one_hot(x, num_classes, dtype=bool), 0.0, NEG_INF)


def prior_probs(kernel: ForwardProcess):
  """π over the input vocabulary, `[input_vocab]`."""
  if kernel.is_masked:
    return jax.nn.one_hot(kernel.mask_id, kernel.input_vocab_size)
  return jnp.full((kernel.vocab_size,), 1.0 / kernel.vocab_size)


def sample_prior(key, kernel: ForwardProcess, shape):
  """z_1 ~ π: int32 `shape` (all MASK, or uniform tokens)."""
  if kernel.is_masked:
    return jnp.full(shape, kernel.mask_id, jnp.int32)
  return jax.random.randint(key, shape, 0, kernel.vocab_size, jnp.int32)


def _embed_data_probs(kernel: ForwardProcess, x_probs):
  """`[..., K]` → `[..., input_vocab]` (zero mass on MASK for the masked kernel)."""
  if kernel.is_masked:
    return jnp.concatenate([x_probs, jnp.zeros_like(x_probs[..., :1])], axis=-1)
  return x_probs


def marginal_probs(kernel: ForwardProcess, x_probs, t):
  """q(z_t | x) = α_t x + (1 − α_t) π.

  x_probs `[..., K]`, t broadcastable to `[...]` → `[..., V_in]`.
  """
  a = kernel.alpha(jnp.asarray(t))[..., None]
  return a * _embed_data_probs(kernel, x_probs) + (1.0 - a) * prior_probs(kernel)


def sample_marginal(key, kernel: ForwardProcess, x, t):
  """z_t ~ q(z_t | x): int x `[batch, length]`, t `[batch]` → int32 `[batch, length]`."""
  keep_key, noise_key = jax.random.split(key)
  a = kernel.alpha(t)[:, None]
  keep = jax.random.uniform(keep_key, x.shape) < a
  noise = sample_prior(noise_key, kernel, x.shape)
  return jnp.where(keep, x, noise).astype(jnp.int32)


def posterior_log_probs(kernel: ForwardProcess, z_t, log_x, s, t):
  """log Σ_c x̂_c q(z_s | z_t, x = e_c).

  Args:
    kernel: the forward process.
    z_t: int `[...]` current tokens (input ids).
    log_x: `[..., K]` log-probabilities of the clean token (a denoiser's log-softmax, or
      `log_one_hot(x, K)` for a hard x).
    s, t: times with 0 ≤ s ≤ t ≤ 1, broadcastable to `[...]`.

  Returns:
    `[..., input_vocab]` log-probabilities of z_s.
  """
  s = jnp.broadcast_to(jnp.asarray(s, log_x.dtype), z_t.shape)[..., None]
  t = jnp.broadcast_to(jnp.asarray(t, log_x.dtype), z_t.shape)[..., None]
  alpha_s, alpha_t = kernel.alpha(s), kernel.alpha(t)
  if kernel.is_masked:
    return _masked_posterior_log_probs(kernel, z_t, log_x, alpha_s, alpha_t)
  return _uniform_posterior_log_probs(kernel, z_t, log_x, alpha_s, alpha_t)


def _masked_posterior_log_probs(kernel, z_t, log_x, alpha_s, alpha_t):
  # z_t = MASK: token j with prob γ x̂_j, γ = (α_s − α_t)/(1 − α_t); MASK with prob 1 − γ.
  denom = jnp.maximum(1.0 - alpha_t, 1e-12)
  gamma = jnp.clip((alpha_s - alpha_t) / denom, 0.0, 1.0)
  from_mask = jnp.concatenate([safe_log(gamma) + log_x, safe_log(1.0 - gamma)], axis=-1)
  # z_t ≠ MASK: z_s = z_t.
  stay = log_one_hot(z_t, kernel.input_vocab_size)
  is_mask = (z_t == kernel.mask_id)[..., None]
  return jnp.where(is_mask, from_mask, stay)


def _uniform_posterior_log_probs(kernel, z_t, log_x, alpha_s, alpha_t):
  k = kernel.vocab_size
  alpha_ts = alpha_t / jnp.maximum(alpha_s, 1e-12)
  is_i = jax.nn.one_hot(z_t, k, dtype=bool)
  log_a = safe_log(jnp.where(is_i, alpha_ts, 0.0) + (1.0 - alpha_ts) / k)
  log_n = safe_log(jnp.where(is_i, alpha_t, 0.0) + (1.0 - alpha_t) / k)
  x_over_n = log_x - log_n  # log x̂_c / n_c
  direct = safe_log(alpha_s) + x_over_n
  spread = safe_log((1.0 - alpha_s) / k) + jax.nn.logsumexp(x_over_n, axis=-1, keepdims=True)
  mixture = log_a + jnp.logaddexp(direct, spread)
  # α_t = 1 (t = 0, or cosine t ≲ 1.6e-4 in float32): no noise up to t, so z_s = z_t.
  return jnp.where(alpha_t >= 1.0, log_one_hot(z_t, k), mixture)
