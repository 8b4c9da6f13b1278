"""Where D-MMD matching fails: moment mismatch and student entropy per noise-level bucket.

D-MMD's fixed point is E_student[x | z_s] = x̂_θ(z_s) at every s. The auxiliary's optimum is
x̂_φ = ½(E_student[x | z_s] + x̂_θ) (the reverse step P(·) is linear and injective), so

    mismatch(z_s) = ½ ‖E_student[x | z_s] − x̂_θ(z_s)‖₁ = ‖x̂_φ(z_s) − x̂_θ(z_s)‖₁

per position: the total-variation distance between the student's and the teacher's first
moments, read off the auxiliary (exact when the auxiliary is at its optimum; otherwise it also
measures how far the auxiliary lags). It is averaged per bucket of s ∈ [b/n, (b+1)/n) over the
positions that carry loss (masked: positions still masked in z_s; uniform: all), beside the
student's output entropy (nats) over the same positions. `training/dmmd_run.py` logs both
into metrics.jsonl as `moment_mismatch/b{b}` and `student_entropy/b{b}`.
"""

import jax
import jax.numpy as jnp

from dmmd_jax.diffusion import context as context_lib
from dmmd_jax.distill import dmmd


def stratified_times(key, batch_size: int, num_buckets: int, student_steps: int):
  """s with row r in bucket r mod n (uniform inside it), t = min(1, s + δ), δ ~ U(0, 1/k).

  Returns s, t `[batch]`: every bucket gets rows whenever batch_size ≥ num_buckets.
  """
  s_key, d_key = jax.random.split(key)
  bucket = jnp.arange(batch_size) % num_buckets
  s = (bucket + jax.random.uniform(s_key, (batch_size,))) / num_buckets
  delta = jax.random.uniform(d_key, (batch_size,), maxval=1.0 / student_steps)
  return s, jnp.minimum(1.0, s + delta)


def bucket_means(values, counted, s, num_buckets: int):
  """Mean of values `[batch, length]` over counted positions, per bucket of s: `[num_buckets]`.

  A bucket without counted positions gives 0.
  """
  bucket = jnp.clip(jnp.floor(s * num_buckets).astype(jnp.int32), 0, num_buckets - 1)
  one_hot = jax.nn.one_hot(bucket, num_buckets)  # [batch, n]
  weight = counted.astype(values.dtype)
  total = one_hot.T @ jnp.sum(jnp.where(counted, values, 0.0), axis=-1)
  count = one_hot.T @ jnp.sum(weight, axis=-1)
  return total / jnp.maximum(count, 1.0)


def moment_diagnostics(draw, log_teacher, log_aux, *, kernel, num_buckets: int):
  """Per-bucket moment mismatch and student entropy of one D-MMD draw.

  draw: `distill.student_draw`'s dict (s `[batch]`, z_s `[batch, length]`, log_p
  `[batch, length, K]`); log_teacher, log_aux: `[batch, length, K]` at z_s.
  Returns {"moment_mismatch": `[num_buckets]`, "student_entropy": `[num_buckets]`}.
  """
  counted = (draw["z_s"] == kernel.mask_id) if kernel.is_masked else jnp.ones_like(
      draw["z_s"], bool)
  mismatch = jnp.sum(jnp.abs(jnp.exp(log_aux) - jnp.exp(log_teacher)), axis=-1)
  log_p = draw["log_p"]
  entropy = -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)
  return dict(moment_mismatch=bucket_means(mismatch, counted, draw["s"], num_buckets),
              student_entropy=bucket_means(entropy, counted, draw["s"], num_buckets))


def diagnose_student(student_params, aux_params, teacher_params, x, key, *, apply_fn,
                     score_apply_fn, kernel, cfg: dmmd.EstimatorConfig, noise_fn, num_buckets: int):
  """`moment_diagnostics` of one draw on data x `[batch, length]`, with s
  stratified over the buckets: dict of `[num_buckets]` arrays."""
  if cfg.context:  # block models read the clean context x
    apply_fn = context_lib.with_context(apply_fn, x)
    score_apply_fn = context_lib.with_context(score_apply_fn, x)
  time_key, draw_key = jax.random.split(key)
  times = stratified_times(time_key, x.shape[0], num_buckets, cfg.student_steps)
  draw = dmmd.student_draw(draw_key, student_params, x, apply_fn=apply_fn, kernel=kernel, cfg=cfg,
                      noise_fn=noise_fn, times=times)
  log_teacher = dmmd.teacher_log_probs(score_apply_fn(teacher_params, draw["z_s"], draw["s"]), cfg)
  log_aux = jax.nn.log_softmax(score_apply_fn(aux_params, draw["z_s"], draw["s"]), axis=-1)
  return moment_diagnostics(draw, log_teacher, log_aux, kernel=kernel,
                                             num_buckets=num_buckets)
