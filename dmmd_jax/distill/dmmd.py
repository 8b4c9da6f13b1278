"""D-MMD: Discrete Moment Matching Distillation (Algorithm 1), masked and uniform.

Three parameter pytrees over one denoiser: frozen teacher θ, student η, auxiliary φ (student and
auxiliary start as copies of the teacher's EMA parameters). Per step, for data x and k student
steps:

    s ~ U(0, 1), δ ~ U(0, 1/k), t = min(1, s + δ);  z_t ~ q(z_t | x)
    p = x̂_η(z_t, t, ε)  (ε: fresh Gaussian noise input);  x ~ Cat(p);  z_s ~ q(z_s | z_t, x)

Losses — one code path for both kernels. Let s' = max(0, s − h) (h = `posterior_gap`) and
P(x̂) = Σ_c x̂_c q(z_{s'} | z_s, e_c) be the reverse transition a denoiser output x̂ induces from
z_s (`forward_process.posterior_log_probs`). P is linear in x̂, so with the rate
r(s) = −α'_s / (α_{s'} − α_s) (= 1/h for the linear schedule, `_rate`)

    L_gen(η) = r(s) Σ_i Σ_j P(p̃)_ij · ( log P(x̂_φ)_ij − log P(x̂_θ)_ij )
    L_aux(φ) = r(s) Σ_i [ KL(P(y)_i ‖ P(x̂_φ)_i) + KL(P(x̂_θ)_i ‖ P(x̂_φ)_i) ],  y = one_hot(x)
               (or y = stop_grad(p), `soft_targets`, masked only)

where p̃ = p (the soft estimator) or, for the uniform kernel with
distill.uniform_estimator = "rao_blackwell", p̃_ic = p_ic · stop_grad(w_ic) with
w_ic = q(z_s,i | z_t,i, e_c) / Σ_c' p_ic' q(z_s,i | z_t,i, e_c'), i.e. p̃_i = the student's
posterior P(x_i | z_t, z_s).

with teacher and auxiliary under stop_grad in L_gen and the student sample under stop_grad in
L_aux. Why this is the paper's method:
- Masked kernel: at a masked z_s, P(x̂) puts γ x̂_c on token c and 1 − γ on MASK, with
  γ = (α_{s'} − α_s)/(1 − α_s); unmasked positions have P = δ and contribute 0. So
  L_gen = γ r(s) Σ_{masked i} Σ_c p_ic (log x̂_φ − log x̂_θ)_ic with γ = (α_{s'} − α_s)/(1 − α_s),
  so γ r(s) = w(s) = −α'_s/(1 − α_s) exactly, for every schedule and also for s < h: the
  paper's loss. Likewise L_aux = w(s) Σ −(y + x̂_θ)·log x̂_φ + const.
- Uniform kernel (the paper's Appendix-D idea, our derivation): the plug-in posterior is not
  linear in x, but P is, and the P(e_c) are linearly independent, so KL(P(E[x|z_s]) ‖ P(x̂)) is
  minimised only at x̂ = E[x | z_s]. The auxiliary's optimum is P(x̂_φ) = ½(P(E_student[x|z_s]) +
  P(x̂_θ)) and the student's gradient vanishes iff P(E_student[x | z_s]) = P(x̂_θ), i.e. iff
  the student's first moments match the teacher's. As h → 0 this becomes a rate-weighted
  log-ratio over the states j ≠ z_s (continuous time); h = 1e-3 by default. The reverse step's
  off-diagonal mass is proportional to α_{s'} − α_s, which r(s) turns into the time rate.
- Soft-sample identity: both losses are linear in the sampled one-hot x, so for a *fixed* z_s
  E_{x~p} L(x) = L(p): the student gets a gradient through p without differentiating through
  sampling. But z_s is drawn from q(z_s | z_t, x) with the hard x. For the masked kernel that
  does not matter (a masked z_s says nothing about x, and an unmasked one carries no loss), so
  the soft form is exact. For the uniform kernel z_s carries information about x and the soft
  form is biased: its expected value and gradient differ from those of the hard-sample loss
  (tests/distill/test_dmmd_enumeration.py). The Rao-Blackwell form replaces p by the posterior
  P(x | z_t, z_s) = p ⊙ w: its value is the loss at E[x | z_t, z_s], and its expected value and
  gradient equal those of the hard-sample loss exactly (with the other positions' z_s held
  fixed, as Algorithm 1's stop_grad(z_s) does), proven against enumeration.
- Default: "soft". On the exactly enumerable copy toy (`distill/toy.py`, bench/uniform_estimator.py)
  the soft estimator lowered the exact moment mismatch faster at equal updates, reached the same
  mismatch later on, and kept a higher copy rate (RESULTS.md §8): the unbiased form's weights
  add variance, and the soft form's bias did not slow matching there. Choose "rao_blackwell"
  where unbiasedness matters more than speed.
- Precision: the teacher and auxiliary forwards run in distill.score_dtype (float32 by
  default, whatever model.dtype is), since bfloat16 rounding of their logits swamps the
  log-ratio; the student keeps model.dtype.

Losses are normalised per token (divided by the sequence length). The moment-matching estimator
draws `samples_per_z` (M) student samples per z_t (vmapped over the sample-set axis) and averages.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from dmmd_jax.diffusion import context as context_lib
from dmmd_jax.diffusion import forward_process, sampling, schedules


@dataclasses.dataclass(frozen=True)
class EstimatorConfig:
  """Static options of the moment-matching estimator (hashable for jit).

  `use_noise` (the student's Gaussian noise input) is on for masked students when
  distill.use_noise, and for uniform students only with distill.uniform_noise too: the paper gives
  uniform students no noise (z_1 is already random), but on the copy task such a student settles
  on a map z_1 → x that is symmetric in the two positions and so unbalanced (frequencies
  1/4 : 3/4); with the noise input it stays balanced (RESULTS.md §2).
  """

  student_steps: int
  samples_per_z: int = 1
  soft_targets: bool = False
  teacher_temperature: float = 1.0
  teacher_top_p: float = 1.0
  top_p_mode: str = "soft"
  top_p_delta: float = 2.0
  posterior_gap: float = 1e-3
  use_noise: bool = True
  uniform_estimator: str = "soft"
  context: bool = False  # block model (setup.is_block, set by training.dmmd_run.compile_updates)
  # "": t anywhere in (0, 1] (Algorithm 1); a `schedules.time_grid` name: t only at the k times
  # the student's k-step sampler calls it (`sample_times`).
  time_grid: str = ""


def sample_times(key, batch_size: int, student_steps: int, grid: str = ""):
  """(s, t), two `[batch]` arrays.

  grid "": s ~ U(0, 1), t = min(1, s + δ) with δ ~ U(0, 1/k) (Algorithm 1). grid a
  `schedules.time_grid` name with times 1 = t_k > … > t_0 = 0: t = t_i with i uniform in 1…k, the
  times at which the k-step sampler calls the student, and s ~ U(t_{i−1}, t_i), the span its step
  from t_i covers. The fixed point is the same — the student's z_s matches the data's at every s
  its sampler produces — but no update goes to a t the sampler never visits.
  """
  s_key, d_key = jax.random.split(key)
  if grid:
    times = schedules.time_grid(student_steps, grid)
    i = jax.random.randint(s_key, (batch_size,), 0, student_steps)  # t_k, …, t_1 at index 0 … k−1
    t, lower = times[i], times[i + 1]
    return lower + jax.random.uniform(d_key, (batch_size,)) * (t - lower), t
  s = jax.random.uniform(s_key, (batch_size,))
  delta = jax.random.uniform(d_key, (batch_size,), maxval=1.0 / student_steps)
  return s, jnp.minimum(1.0, s + delta)


def teacher_log_probs(logits, cfg: EstimatorConfig):
  """The (possibly mode-seeking) teacher: temperature and soft/hard top-p on its logits."""
  adjusted = sampling.adjust_logits(logits, cfg.teacher_temperature, cfg.teacher_top_p,
                                    cfg.top_p_mode, cfg.top_p_delta)
  return jax.nn.log_softmax(adjusted, axis=-1)


def reverse_log_probs(kernel, z_s, log_x, s, gap: float):
  """log P(x̂) = log Σ_c x̂_c q(z_{s'} | z_s, e_c), s' = max(0, s − gap): `[batch, length, V_in]`."""
  s_prev = jnp.maximum(s - gap, 0.0)
  return forward_process.posterior_log_probs(kernel, z_s, log_x, s_prev[:, None], s[:, None])


def _kl(log_p, log_q):
  """KL(P ‖ Q) over the last axis."""
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def _rate(kernel, s, gap: float):
  """−α'_s / (α_{s'} − α_s) per sequence `[batch, 1]`, s' = max(0, s − gap).

  The reverse step's off-diagonal mass is proportional to α_{s'} − α_s, so this makes the loss
  the continuous-time rate to first order for every schedule: for the masked kernel the weight
  γ · rate is exactly w(s) = −α'_s / (1 − α_s) (also for s < gap), and for the linear schedule
  the rate is 1 / (s − s'). Rows with no step (s = 0) get 0: all their KL terms are 0.
  """
  s_prev = jnp.maximum(s - gap, 0.0)
  step = (kernel.one_minus_alpha(s) - kernel.one_minus_alpha(s_prev))
  step = jnp.where(kernel.alpha(s_prev) < 0.5, kernel.alpha(s_prev) - kernel.alpha(s), step)
  slope = -schedules.alpha_derivative(s, kernel.schedule)
  return jnp.where(step > 0, slope / jnp.maximum(step, 1e-30), 0.0)[:, None]


def rao_blackwell_log_weights(kernel, draw):
  """log w_ic = log q(z_s,i | z_t,i, e_c) − log Σ_c' p_ic' q(z_s,i | z_t,i, e_c'), `[batch, L, K]`.

  p_ic w_ic = P(x_i = c | z_t, z_s) under the (factorised, given ε) student: its posterior over
  the clean token once z_s is known. Held fixed (stop_grad) by the caller.
  """
  log_q = forward_process.class_log_likelihoods(kernel, draw["z_t"], draw["z_s"],
                                                draw["s"][:, None],
                                        draw["t"][:, None])
  log_p = jax.lax.stop_gradient(draw["log_p"])
  return jax.lax.stop_gradient(
      log_q - jax.nn.logsumexp(log_p + log_q, axis=-1, keepdims=True))


def student_draw(key, student_params, x, *, apply_fn, kernel, cfg: EstimatorConfig, noise_fn,
                 times=None):
  """Algorithm 1's sampling half for one set of student samples.

  times: (s, t) `[batch]` to use instead of `sample_times`. Returns dict with s, t `[batch]`,
  z_t, x_student, z_s `[batch, length]` and the student's log p `[batch, length, K]`
  (differentiable w.r.t. student_params).
  """
  time_key, zt_key, noise_key, x_key, zs_key = jax.random.split(key, 5)
  s, t = times if times is not None else sample_times(time_key, x.shape[0], cfg.student_steps,
                                                       cfg.time_grid)
  z_t = forward_process.sample_marginal(zt_key, kernel, x, t)
  noise = noise_fn(noise_key, x.shape[0]) if (cfg.use_noise and noise_fn) else None
  log_p = jax.nn.log_softmax(apply_fn(student_params, z_t, t, noise), axis=-1)
  x_student = sampling.categorical(x_key, jax.lax.stop_gradient(log_p), float64=False)
  log_x = forward_process.log_one_hot(x_student, kernel.vocab_size)
  z_s = sampling.categorical(
      zs_key, forward_process.posterior_log_probs(kernel, z_t, log_x, s[:, None],
                                                  t[:, None]), False)
  return dict(s=s, t=t, z_t=z_t, x_student=x_student, z_s=z_s, log_p=log_p)


def moment_losses(draw, log_teacher, log_aux, *, kernel, cfg: EstimatorConfig):
  """Generator and auxiliary losses (per token) plus diagnostics for one draw.

  log_teacher, log_aux: `[batch, length, K]` log x̂_θ(z_s), log x̂_φ(z_s). Gradients flow into
  the student through draw["log_p"] in `gen_loss` and into the auxiliary through log_aux in
  `aux_loss`; everything else is held fixed.
  """
  s, z_s, gap = draw["s"], draw["z_s"], cfg.posterior_gap
  rev = functools.partial(reverse_log_probs, kernel, z_s, s=s, gap=gap)
  rate = _rate(kernel, s, gap)
  log_teacher = jax.lax.stop_gradient(log_teacher)
  log_p_gen = draw["log_p"]
  if not kernel.is_masked and cfg.uniform_estimator == "rao_blackwell":
    log_p_gen = log_p_gen + rao_blackwell_log_weights(kernel, draw)
  p_student = jnp.exp(rev(log_p_gen))
  rev_teacher, rev_aux = rev(log_teacher), rev(log_aux)
  log_ratio = jax.lax.stop_gradient(rev_aux - rev_teacher)
  gen = rate * jnp.sum(p_student * log_ratio, axis=-1)

  if cfg.soft_targets:
    target = jax.lax.stop_gradient(draw["log_p"])
  else:
    target = forward_process.log_one_hot(draw["x_student"], kernel.vocab_size)
  aux = rate * (_kl(rev(target), rev_aux) + _kl(rev_teacher, rev_aux))

  length = z_s.shape[1]
  counted = (z_s == kernel.mask_id) if kernel.is_masked else jnp.ones_like(z_s, bool)
  p = jnp.exp(jax.lax.stop_gradient(draw["log_p"]))
  entropy = -jnp.sum(p * jax.lax.stop_gradient(draw["log_p"]), axis=-1)
  teacher_p = jnp.exp(log_teacher)
  ratio_norm = jnp.sqrt(jnp.sum(teacher_p * (log_teacher - log_aux) ** 2, axis=-1))
  n = jnp.maximum(jnp.sum(counted), 1)
  return dict(
      gen_loss=jnp.mean(jnp.sum(gen, -1)) / length,
      aux_loss=jnp.mean(jnp.sum(aux, -1)) / length,
      student_entropy=jnp.sum(jnp.where(counted, entropy, 0.0)) / n,
      log_ratio_norm=jax.lax.stop_gradient(jnp.sum(jnp.where(counted, ratio_norm, 0.0)) / n),
  )


def moment_matching_estimator(student_params, aux_params, teacher_params, x, key, *, apply_fn,
                              kernel, cfg: EstimatorConfig, noise_fn=None, score_apply_fn=None):
  """The D-MMD estimator: M = cfg.samples_per_z student sample sets per z_t, vmapped.

  x: int `[batch, length]` data. Returns the losses and diagnostics averaged over the M sets.
  Pure: differentiate w.r.t. student_params for `gen_loss`, aux_params for `aux_loss`.
  score_apply_fn (default apply_fn) runs the teacher and the auxiliary: their log-ratio is the
  student's learning signal, so it may run at a higher precision than the student.
  """
  score_apply_fn = score_apply_fn or apply_fn
  if cfg.context:  # block models: all three networks read the same clean context, the data x
    apply_fn = context_lib.with_context(apply_fn, x)
    score_apply_fn = context_lib.with_context(score_apply_fn, x)

  def one_set(set_key):
    draw = student_draw(set_key, student_params, x, apply_fn=apply_fn, kernel=kernel, cfg=cfg,
                        noise_fn=noise_fn)
    teacher_logits = score_apply_fn(teacher_params, draw["z_s"], draw["s"])
    log_teacher = teacher_log_probs(teacher_logits, cfg)
    log_aux = jax.nn.log_softmax(score_apply_fn(aux_params, draw["z_s"], draw["s"]), axis=-1)
    return moment_losses(draw, log_teacher, log_aux, kernel=kernel, cfg=cfg)

  # All M sets share z_t's data x but draw their own times, z_t, noise and student samples.
  per_set = jax.vmap(one_set)(jax.random.split(key, cfg.samples_per_z))
  return jax.tree.map(jnp.mean, per_set)
