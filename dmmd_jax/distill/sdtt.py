"""Losses of the SDTT-style progressive distillation baseline (Deschenaux & Gulcehre 2024).

Masked kernel only.

Self-Distillation Through Time: a student initialised from the teacher learns to take, in one
step of size 2Δ, the step the teacher takes in two steps of size Δ; rounds then halve the step
count, each round's student becoming the next round's teacher:

    N → N/2 → N/4 → … → k      (N = start steps, k = config.distill.student_steps)

One round, for a round teacher with n steps on the grid t_0 = 1 > t_1 > … > t_n = 0
(`schedules.time_grid`, uniform or cosine) and a student with n/2 steps on t_0, t_2, t_4, …:

    x ~ data;  j ~ U{0 … n/2 − 1};  t = t_{2j};  z_t ~ q(z_t | x)
    teacher, two Δ-steps with its intermediate state sampled:
      x̂_1 = x̂_T(z_t, t);          z' ~ Σ_c x̂_1c q(z_{t_{2j+1}} | z_t, e_c)
      x̂_2 = x̂_T(z', t_{2j+1})
    target_i = x̂_1,i  if position i was unmasked by the first step (z_t,i = MASK ≠ z'_i)
               x̂_2,i  otherwise (unmasked by the second step, or still masked: the teacher's
                      last, best-informed prediction)
    loss = (1/L) Σ_{i: z_t,i = MASK} KL(target_i ‖ x̂_S(z_t, t)_i)

The target is what the teacher's two steps decided each position from, so the student's one
2Δ-step reproduces the teacher's two-step marginals per position — and only per position: the
student stays factorised and cannot represent the correlation the teacher's intermediate sample
created between positions. This is why progressive distillation drops modes at few steps.

Simplifications compared with the SDTT paper (honest list):
- the KL (their best divergence) over masked positions, normalised per token, no MSE/TVD options;
- times only on the student's own grid points (the sampler never queries others);
- no teacher temperature / top-p (rejected with an error), no student noise input, masked
  kernel only (SDTT is defined for masked diffusion);
- the intermediate teacher state is sampled in float32 (Gumbel-max), not float64.

The training run (rounds, optimizer, workdir) is `training/sdtt_run.py`.
"""


import jax
import jax.numpy as jnp

from dmmd_jax.diffusion import forward_process, sampling


def grid_time(index, num_steps, grid: str = "uniform"):
  """t_index on a num_steps grid (`schedules.time_grid`); index, num_steps may be traced ints."""
  u = 1.0 - index.astype(jnp.float32) / jnp.asarray(num_steps, jnp.float32)
  if grid == "uniform":
    return u
  return 1.0 - jnp.cos(0.5 * jnp.pi * u)


def teacher_targets(key, teacher_params, z_t, index, num_steps, *, apply_fn, kernel, grid):
  """The round teacher's two-step target distribution `[batch, length, K]`.

  Args:
    key: PRNG key of the intermediate sample.
    teacher_params: the round teacher.
    z_t: int `[batch, length]` noisy tokens at t_index.
    index: int `[batch]` teacher grid index 2j of t.
    num_steps: the round teacher's step count n (an int, or a traced scalar).
    apply_fn, kernel, grid: network, forward process and time grid.
  """
  t0, t1 = grid_time(index, num_steps, grid), grid_time(index + 1, num_steps, grid)
  log_x1 = jax.nn.log_softmax(apply_fn(teacher_params, z_t, t0), axis=-1)
  z_mid = sampling.categorical(
      key, forward_process.posterior_log_probs(kernel, z_t, log_x1, t1[:, None],
                                               t0[:, None]), False)
  log_x2 = jax.nn.log_softmax(apply_fn(teacher_params, z_mid, t1), axis=-1)
  first = (z_t == kernel.mask_id) & (z_mid != kernel.mask_id)
  return jnp.exp(jnp.where(first[..., None], log_x1, log_x2))


def noisy_inputs(key, x, num_steps, *, kernel, grid):
  """Student-grid times and noisy tokens: (teacher grid index 2j `[b]`, t `[b]`, z_t `[b, L]`)."""
  index_key, zt_key = jax.random.split(key)
  index = 2 * jax.random.randint(index_key, (x.shape[0],), 0, jnp.asarray(num_steps) // 2)
  t = grid_time(index, num_steps, grid)
  return index, t, forward_process.sample_marginal(zt_key, kernel, x, t)


def masked_kl(target, log_student, z_t, kernel):
  """(Σ over masked positions of KL(target ‖ student), number of masked positions)."""
  kl = jnp.sum(jax.scipy.special.xlogy(target, target) - target * log_student, axis=-1)
  masked = z_t == kernel.mask_id
  return jnp.sum(jnp.where(masked, kl, 0.0)), jnp.sum(masked)


def sdtt_loss(student_params, teacher_params, x, key, num_steps, *, apply_fn, kernel, grid):
  """Per-token KL(two-step teacher target ‖ one-step student) over masked positions.

  x: int `[batch, length]` data; num_steps: the round teacher's n (traced scalar is fine).
  Returns (loss, metrics dict).
  """
  input_key, mid_key = jax.random.split(key)
  index, t, z_t = noisy_inputs(input_key, x, num_steps, kernel=kernel, grid=grid)
  target = jax.lax.stop_gradient(teacher_targets(
      mid_key, teacher_params, z_t, index, num_steps, apply_fn=apply_fn, kernel=kernel,
      grid=grid))
  log_student = jax.nn.log_softmax(apply_fn(student_params, z_t, t), axis=-1)
  total, count = masked_kl(target, log_student, z_t, kernel)
  masked = z_t == kernel.mask_id
  entropy = -jnp.sum(jnp.where(masked, jnp.sum(jnp.exp(log_student) * log_student, -1), 0.0))
  count = jnp.maximum(count, 1)
  return total / x.size, {"kl_per_masked": total / count, "student_entropy": entropy / count}
