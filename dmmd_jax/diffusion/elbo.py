"""Teacher training losses: negative ELBOs of discrete diffusion, in nats per sequence.

Masked kernel — the continuous-time ELBO of MDLM / MD4:

    L = E_{t ~ U(0,1)} E_{z_t} [ w(t) Σ_{i: z_t,i = MASK} −log x̂_θ(z_t, t)_i[x_i] ],
    w(t) = −α'_t / (1 − α_t).

Uniform kernel — the discrete-time D3PM ELBO with T steps on the grid t_i = i / T:

    L = Σ_{i=1..T} E_{z_{t_i}} KL( q(z_{t_{i−1}} | z_{t_i}, x) ‖ p_θ(z_{t_{i−1}} | z_{t_i}) )
        + KL( q(z_1 | x) ‖ π ),

where p_θ(z_s | z_t) = Σ_c x̂_c q(z_s | z_t, e_c) is the mixture reverse step of `forward_process.py`
(the same step the sampler takes) and the prior term is 0 because α_1 = 0. The i = 1 term is the
reconstruction −log x̂(z_{t_1})[x], since the posterior at s = 0 is x itself. We chose the
discrete-time form because it is exact for the T-step sampler that realises it, needs only the
posterior that the sampler and the D-MMD loss already use (one code path), and is tested by
enumeration in `tests/diffusion/test_elbo.py`; the continuous-time uniform ELBO (USDM/DUO) is its
T → ∞ limit. One term is sampled per sequence (i ~ U{1..T}) and scaled by T.

Bits per token = nats / (length · ln 2).
"""


import jax
import jax.numpy as jnp

from dmmd_jax.diffusion import context as context_lib
from dmmd_jax.diffusion import forward_process, schedules


def antithetic_times(key, batch_size: int):
  """Low-variance t ∈ [0, 1): (u + i / batch) mod 1, `[batch]` (as in MD4)."""
  u = jax.random.uniform(key, ())
  return jnp.mod(u + jnp.arange(batch_size) / batch_size, 1.0)


def masked_elbo(kernel: forward_process.ForwardProcess, log_x, x, z_t, t):
  """Continuous-time masked ELBO terms `[batch]` (nats).

  log_x: `[batch, length, K]` denoiser log-probs at z_t; x, z_t: int `[batch, length]`;
  t: `[batch]`.
  """
  nll = -jnp.take_along_axis(log_x, x[..., None], axis=-1)[..., 0]
  masked = z_t == kernel.mask_id
  return schedules.elbo_weight(t, kernel.schedule) * jnp.sum(jnp.where(masked, nll, 0.0), -1)


def posterior_kl(kernel: forward_process.ForwardProcess, log_x, x, z_t, s, t):
  """Σ_positions KL(q(z_s | z_t, x) ‖ p_θ(z_s | z_t)) `[batch]` (nats); s, t `[batch]`."""
  s, t = s[:, None], t[:, None]
  log_data = forward_process.log_one_hot(x, kernel.vocab_size)
  log_q = forward_process.posterior_log_probs(kernel, z_t, log_data, s, t)
  log_p = forward_process.posterior_log_probs(kernel, z_t, log_x, s, t)
  q = jnp.exp(log_q)
  return jnp.sum(q * (log_q - log_p), axis=(-2, -1))


def discrete_elbo(kernel: forward_process.ForwardProcess, log_x, x, z_t, t_index, num_steps: int):
  """T · KL term of the T-step ELBO for step index t_index ∈ {1..T} `[batch]` (nats)."""
  t = t_index / num_steps
  s = (t_index - 1) / num_steps
  return num_steps * posterior_kl(kernel, log_x, x, z_t, s, t)


def uniform_step_times(u, num_steps: int, continuous: bool):
  """(s, t) `[batch]` of the sampled T-step ELBO term from u ∈ [0, 1) `[batch]`.

  Grid: t = i / T, s = (i − 1) / T with i = ⌊u T⌋ + 1 (the exact T-step ELBO). Continuous:
  t = 1 − u ∈ (0, 1], s = max(0, t − 1/T): the same step length at every t, so that a teacher
  that D-MMD queries at continuous times has been trained there (with the grid it only sees
  t = i / T, and its time embedding of 1000 t is off-grid elsewhere). Each term is still
  minimised by x̂ = E[x | z_t]; the grid form stays the evaluation ELBO.
  """
  if continuous:
    t = 1.0 - u
    return jnp.maximum(t - 1.0 / num_steps, 0.0), t
  t_index = jnp.floor(u * num_steps) + 1
  return (t_index - 1) / num_steps, t_index / num_steps


def diffusion_loss(key, params, apply_fn, kernel: forward_process.ForwardProcess, x,
                   uniform_elbo_steps: int, context: bool = False, continuous_time: bool = False):
  """Negative ELBO of a batch, nats per sequence `[batch]`.

  apply_fn(params, tokens, t) → logits `[batch, length, K]`; x: int `[batch, length]`.
  context: a block model (`models/blocks.py`), called as apply_fn(params, tokens, t, None, x) so
  that every block reads its clean context from x; the loss is then the sum of the per-block
  ELBOs.
  continuous_time (uniform only): sample the T-step term at continuous t (`uniform_step_times`),
  for training.
  """
  if context:
    apply_fn = context_lib.with_context(apply_fn, x)
  time_key, noise_key = jax.random.split(key)
  u = antithetic_times(time_key, x.shape[0])
  if kernel.is_masked:
    t = 1.0 - u  # in (0, 1]: avoids t = 0 where no position is masked
    z_t = forward_process.sample_marginal(noise_key, kernel, x, t)
    log_x = jax.nn.log_softmax(apply_fn(params, z_t, t), axis=-1)
    return masked_elbo(kernel, log_x, x, z_t, t)
  s, t = uniform_step_times(u, uniform_elbo_steps, continuous_time)
  z_t = forward_process.sample_marginal(noise_key, kernel, x, t)
  log_x = jax.nn.log_softmax(apply_fn(params, z_t, t), axis=-1)
  return uniform_elbo_steps * posterior_kl(kernel, log_x, x, z_t, s, t)


def bits_per_token(nats_per_sequence, length: int):
  """Convert nats per sequence to bits per token."""
  return nats_per_sequence / (length * jnp.log(2.0))
