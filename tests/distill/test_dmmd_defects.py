"""Regression tests for the method defects of issue 11 (each fails on the defect it names):
float32 1 − α in the kernels, bfloat16 teacher/auxiliary logits in the D-MMD step, uniform
teachers trained on a time grid, learning-rate schedules sized to num_steps, and the per-bucket
D-MMD diagnostics."""

import dataclasses
import math
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmmd_jax import config_lib
from dmmd_jax.diffusion import elbo, forward_process
from dmmd_jax.distill import diagnostics, toy
from dmmd_jax.models import denoiser
from dmmd_jax.training import dmmd_run
from dmmd_jax.training import setup as setup_lib


@pytest.mark.parametrize("kind", ["masked", "uniform"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_posterior_is_float32_accurate_at_small_times(kind, schedule):
  """q(z_s | z_t, x̂) at s = 1e-6, t = 3e-6 in float32 equals the float64 value (rtol 1e-4).
  Computing 1 − α from α loses every digit there (cosine α rounds to 1)."""
  kernel = forward_process.ForwardProcess(kind, 3, schedule)
  z_t = jnp.asarray([kernel.mask_id if kind == "masked" else 1], jnp.int32)
  log_x = jnp.log(jnp.asarray([[0.2, 0.5, 0.3]]))
  got = np.exp(np.asarray(forward_process.posterior_log_probs(kernel, z_t, log_x, 1e-6, 3e-6)))
  with jax.enable_x64(True):
    ref = np.exp(np.asarray(forward_process.posterior_log_probs(
        kernel, z_t, jnp.asarray(log_x, jnp.float64), jnp.float64(1e-6), jnp.float64(3e-6))))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-12)
  if kind == "masked":  # γ = 1 − (1 − α_s)/(1 − α_t): 2/3 (linear), 8/9 (cosine)
    gamma = 2.0 / 3.0 if schedule == "linear" else 8.0 / 9.0
    np.testing.assert_allclose(got[0, :3].sum(), gamma, rtol=1e-4)


def test_teacher_and_auxiliary_logits_are_float32_in_a_bfloat16_model():
  """model.dtype = bfloat16: the D-MMD step's teacher/auxiliary forward (`score_apply_fn`)
  computes in float32 (its logits are not bfloat16 values and match a float32 model), while the
  model's own bfloat16 forward rounds every logit to a bfloat16 value."""
  config = config_lib.base_config()
  config.model.dtype = "bfloat16"
  kernel = forward_process.ForwardProcess("masked", 5)
  model_cfg = dataclasses.replace(setup_lib.denoiser_config_of(config, kernel, seq_len=6),
                                  num_layers=1, width=32, num_heads=2, cond_dim=16, noise_dim=4)
  setup = types.SimpleNamespace(config=config, model_cfg=model_cfg, is_block=False)
  params = jax.tree.map(lambda p: p + 0.1, nn.unbox(denoiser.init_params(jax.random.key(0),
                                                                         model_cfg)))
  tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, 6)
  t = jnp.asarray([0.3, 0.8])
  scored = dmmd_run.score_apply_fn(setup)(params, tokens, t)
  student = denoiser.apply(params, tokens, t, cfg=model_cfg)
  as_bf16 = lambda x: np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32))  # noqa: E731
  masked = np.asarray(tokens == kernel.mask_id)
  assert scored.dtype == jnp.float32 and masked.any()
  assert np.all(np.asarray(student)[masked] == as_bf16(student)[masked])  # the defect
  assert np.mean(np.asarray(scored)[masked] != as_bf16(scored)[masked]) > 0.9
  f32 = denoiser.apply(params, tokens, t, cfg=dataclasses.replace(model_cfg, dtype="float32"))
  np.testing.assert_allclose(scored, f32, rtol=1e-6, atol=1e-6)


def test_uniform_teacher_trains_on_continuous_times():
  """continuous: t = 1 − u (off the grid i/T), s = max(0, t − 1/T); grid: t = i/T exactly. The
  training default is continuous; the ELBO used for evaluation keeps the grid."""
  u = jnp.asarray([0.0, 0.25, 0.5004, 0.9995])
  s, t = elbo.uniform_step_times(u, 1000, continuous=True)
  np.testing.assert_allclose(t, 1.0 - u, rtol=1e-7)
  np.testing.assert_allclose(s, np.maximum(1.0 - np.asarray(u) - 1e-3, 0.0), atol=1e-7)
  assert np.any(np.abs(np.asarray(t) * 1000 - np.round(np.asarray(t) * 1000)) > 0.1)
  s, t = elbo.uniform_step_times(u, 1000, continuous=False)
  np.testing.assert_allclose(np.asarray(t) * 1000, [1, 251, 501, 1000], atol=1e-3)
  np.testing.assert_allclose(np.asarray(t) - np.asarray(s), 1e-3, atol=1e-6)
  assert config_lib.base_config().train.uniform_continuous_time


@pytest.mark.parametrize("num_steps, ratio", [(400, 1), (401, 1), (300, 2), (7, 3)])
def test_learning_rate_schedules_are_sized_to_each_networks_updates(num_steps, ratio):
  """update_counts agrees with the turn rule, and each optimizer's schedule (Adam steps of size
  ≈ learning rate on a constant gradient) peaks after its share of the warm-up and ends at 10%
  of its rate exactly when that network's last update of the run is made."""
  turns = [dmmd_run.is_student_turn(i, ratio) for i in range(num_steps)]
  student_updates, aux_updates = dmmd_run.update_counts(num_steps, ratio)
  assert (student_updates, aux_updates) == (sum(turns), num_steps - sum(turns))
  config = config_lib.base_config()
  config.distill.update(num_steps=num_steps, aux_updates_per_student=ratio, warmup_steps=0,
                        learning_rate=1e-2, aux_learning_rate=1e-3)
  student_opt, aux_opt = dmmd_run.distill_optimizers(config)
  for opt, count, rate in ((student_opt, student_updates, 1e-2), (aux_opt, aux_updates, 1e-3)):
    params = {"w": jnp.zeros(())}
    state = opt.init(params)
    steps = []
    for _ in range(count):
      updates, state = opt.update({"w": jnp.ones(())}, state, params)
      steps.append(-float(updates["w"]))
    np.testing.assert_allclose(steps[0], rate, rtol=1e-3)
    if count > 2:
      np.testing.assert_allclose(steps[-1], 0.1 * rate + 0.9 * rate * 0.5 * (
          1 + math.cos(math.pi * (count - 1) / count)), rtol=1e-3)


def test_diagnostics_read_the_exact_mismatch_off_an_optimal_auxiliary():
  """moment_diagnostics with the auxiliary at its optimum ½(E_student[x | z_s] + x̂_θ) gives, per
  bucket of s, the mean over z_s states of ½‖E_student[x | z_s] − x̂_θ(z_s)‖₁ (enumerated on
  the copy toy), and the student's mean entropy."""
  problem = toy.ToyProblem(forward_process.ForwardProcess("uniform", 3))
  student, _, _ = toy.initial_state(problem, 0, 1.0)
  student = student + jax.random.normal(jax.random.key(4), student.shape)  # not the teacher
  z = problem.states(problem.num_ids)
  s_values = jnp.asarray([0.2, 0.7])  # buckets 0 and 1 of 2
  log_teacher, log_aux, expected = [], [], []
  for s in s_values:
    _, moments = toy.exact_moments(problem, student, s)
    teacher = jnp.exp(toy.copy_teacher_log_probs(problem, z, jnp.full(z.shape[:1], s)))
    log_teacher.append(jnp.log(teacher))
    log_aux.append(jnp.log(0.5 * (moments + teacher)))
    expected.append(float(jnp.mean(0.5 * jnp.sum(jnp.abs(moments - teacher), -1))))
  log_p = jax.nn.log_softmax(jnp.tile(student[0, :1], (2 * z.shape[0], 1, 1)), -1)
  draw = dict(s=jnp.repeat(s_values, z.shape[0]), z_s=jnp.tile(z, (2, 1)), log_p=log_p)
  out = diagnostics.moment_diagnostics(draw, jnp.concatenate(log_teacher),
                                            jnp.concatenate(log_aux), kernel=problem.kernel,
                                            num_buckets=2)
  assert min(expected) > 0.01
  np.testing.assert_allclose(out["moment_mismatch"], expected, rtol=1e-5)
  entropy = float(-jnp.sum(jnp.exp(log_p[0]) * log_p[0], -1).mean())
  np.testing.assert_allclose(out["student_entropy"], [entropy, entropy], rtol=1e-5)


def test_stratified_times_fill_every_bucket():
  s, t = diagnostics.stratified_times(jax.random.key(0), 10, 4, 2)
  buckets = np.floor(np.asarray(s) * 4).astype(int)
  np.testing.assert_array_equal(buckets, np.arange(10) % 4)
  assert np.all((np.asarray(t) >= np.asarray(s)) & (np.asarray(t) <= np.minimum(1, s + 0.5)))


def test_config_rejects_a_ratio_with_joint_updates():
  config = config_lib.base_config()
  config.distill.update(joint_updates=True, aux_updates_per_student=2)
  with pytest.raises(config_lib.ConfigError, match="aux_updates_per_student must stay 1"):
    config_lib.validate(config)
  config.distill.aux_updates_per_student = 1
  config_lib.validate(config)


def test_config_rejects_unknown_estimator_and_score_dtype():
  for key, value in (("uniform_estimator", "hard"), ("score_dtype", "float16")):
    config = config_lib.base_config()
    config.distill[key] = value
    with pytest.raises(config_lib.ConfigError, match=f"distill.{key}"):
      config_lib.validate(config)
