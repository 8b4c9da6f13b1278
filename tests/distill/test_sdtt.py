"""Tests of the SDTT-style progressive-distillation baseline (dmmd_jax/sdtt.py).

The workdir path (experiments/sdtt.py → runs.load → experiments/evaluate.py) is tested in
test_eval_binaries.py, which shares its teacher.
"""

import copy
import functools
import importlib.util
import pathlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dmmd_jax.data import synthetic
from dmmd_jax.diffusion import elbo, forward_process, schedules
from dmmd_jax.distill import sdtt
from dmmd_jax.models import denoiser
from dmmd_jax.training import sdtt_run

ROOT = pathlib.Path(__file__).resolve().parents[2]
KERNEL = forward_process.ForwardProcess("masked", 4)
CFG = denoiser.DenoiserConfig(vocab_size=4, input_vocab_size=5, seq_len=8, num_layers=1,
                              width=32, num_heads=2, cond_dim=16, mask_id=4)
APPLY = functools.partial(denoiser.apply, cfg=CFG)


# Test-side evaluation of one SDTT round (the part of the loss training can remove).


@functools.partial(jax.jit, static_argnames=("apply_fn", "kernel", "grid", "num_draws"))
def marginal_kl(student_params, teacher_params, x, key, num_steps, *, apply_fn, kernel,
                grid: str = "uniform", num_draws: int = 32):
  """KL(E_{z'}[target] ‖ x̂_S(z_t, t)) per masked position: the distance between the student's
  one-step output and the teacher's two-step output distribution, with the intermediate teacher
  state z' averaged out over num_draws samples. It is the part of `sdtt_loss` that training can
  remove (the loss = this + the spread of the target over z'), 0 iff the student matches.

  x: int `[batch, length]`; returns a scalar (nats per masked position).
  """
  input_key, mid_key = jax.random.split(key)
  index, t, z_t = sdtt.noisy_inputs(input_key, x, num_steps, kernel=kernel, grid=grid)
  targets = jax.vmap(lambda k: sdtt.teacher_targets(
      k, teacher_params, z_t, index, num_steps, apply_fn=apply_fn, kernel=kernel, grid=grid))(
          jax.random.split(mid_key, num_draws))
  log_student = jax.nn.log_softmax(apply_fn(student_params, z_t, t), axis=-1)
  total, count = sdtt.masked_kl(targets.mean(axis=0), log_student, z_t, kernel)
  return total / jnp.maximum(count, 1)


def expected_marginal_kl(student_params, teacher_params, x, num_steps: int, *, apply_fn, kernel,
                         grid: str = "uniform", num_keys: int = 8, num_draws: int = 32,
                         seed: int = 1234) -> float:
  """`marginal_kl` averaged over num_keys fixed draws of (t, z_t): an evaluation of one round."""
  keys = jax.random.split(jax.random.key(seed), num_keys)
  return float(np.mean([marginal_kl(student_params, teacher_params, x, k, num_steps,
                                    apply_fn=apply_fn, kernel=kernel, grid=grid,
                                    num_draws=num_draws) for k in keys]))


def test_round_schedule():
  assert sdtt_run.round_schedule(64, 4) == [64, 32, 16, 8]
  assert sdtt_run.round_schedule(8, 4) == [8]
  for start, k in [(48, 4), (4, 4), (2, 4), (8, 0)]:
    with pytest.raises(sdtt_run.SDTTError, match="power of two"):
      sdtt_run.round_schedule(start, k)


@pytest.mark.parametrize("grid", ["uniform", "cosine"])
def test_grid_time_matches_the_sampler_grid(grid):
  index = jnp.arange(9)
  np.testing.assert_allclose(sdtt.grid_time(index, 8, grid), schedules.time_grid(8, grid),
                             atol=1e-6)
  np.testing.assert_allclose(sdtt.grid_time(index[::2], jnp.int32(8), grid),
                             schedules.time_grid(4, grid), atol=1e-6)


def _time_only_apply(params, tokens, t, noise=None):
  """A denoiser whose output depends only on t: logits (t, 2t, 0, −t) at every position."""
  del params, noise
  logits = jnp.stack([t, 2 * t, jnp.zeros_like(t), -t], axis=-1)
  return jnp.broadcast_to(logits[:, None, :], tokens.shape + (4,)) * 3.0


def test_marginal_kl_of_a_time_only_teacher():
  """n = 2: one student step from t = 1 (all masked). The teacher's first step reveals each
  position with probability γ = ½, so its two-step output is ½ x̂(1) + ½ x̂(0.5), and the
  one-step output x̂(1) is exactly KL(mix ‖ x̂(1)) away from it."""
  x = jnp.zeros((4, 8), jnp.int32)
  kl = marginal_kl(None, None, x, jax.random.key(2), 2, apply_fn=_time_only_apply,
                        kernel=KERNEL, num_draws=64)
  one = jax.nn.softmax(_time_only_apply(None, x[:1], jnp.array([1.0]))[0, 0])
  mix = 0.5 * one + 0.5 * jax.nn.softmax(_time_only_apply(None, x[:1], jnp.array([0.5]))[0, 0])
  assert float(kl) == pytest.approx(float(jnp.sum(mix * jnp.log(mix / one))), rel=0.15)


def _trained_teacher(data, steps=150):
  params = flax.linen.unbox(denoiser.init_params(jax.random.key(0), CFG))
  opt = optax.adam(3e-3)

  @jax.jit
  def step(params, state, x, key):
    loss_fn = lambda p: jnp.mean(elbo.diffusion_loss(key, p, APPLY, KERNEL, x, 1))
    grads = jax.grad(loss_fn)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state, rng = opt.init(params), np.random.default_rng(0)
  for i in range(steps):
    params, state = step(params, state, data[rng.integers(0, len(data), 64)], jax.random.key(i))
  return params


def test_one_round_moves_the_student_towards_the_two_step_teacher():
  source = synthetic.SyntheticSource(4, 8, seed=0, concentration=0.3)
  data = synthetic.sample(source, 4096, seed=1)
  teacher = _trained_teacher(data)
  optimizer = optax.adam(1e-3)
  state = sdtt_run.SDTTState(step=jnp.zeros((), jnp.int32), student=teacher, student_ema=teacher,
                         teacher=teacher, student_opt=optimizer.init(teacher))
  loss_fn = functools.partial(sdtt.sdtt_loss, apply_fn=APPLY, kernel=KERNEL, grid="uniform")
  update = jax.jit(functools.partial(sdtt_run.sdtt_update, loss_fn=loss_fn, optimizer=optimizer,
                                     ema_decay=0.0, seed=0))
  rng = np.random.default_rng(1)
  # Same (t, z_t) draws before and after; the finite-draw bias of the KL does not depend on the
  # student, so the comparison is fair.
  evaluate = functools.partial(expected_marginal_kl, x=data[:64], num_steps=4,
                               apply_fn=APPLY, kernel=KERNEL, num_keys=4, num_draws=128)
  before = evaluate(teacher, teacher)
  for _ in range(50):
    state, metrics = update(state, data[rng.integers(0, len(data), 64)], np.int32(4))
  after = evaluate(state.student, teacher)
  assert np.isfinite(float(metrics["kl_loss"]))
  assert before > 1e-3 and after < 0.8 * before
  np.testing.assert_array_equal(state.student_ema["logits"]["kernel"],
                                state.student["logits"]["kernel"])  # ema_decay 0


def _digits_config():
  spec = importlib.util.spec_from_file_location("digits", ROOT / "configs/digits.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("tiny")


def test_config_checks_and_stored_config():
  config = _digits_config()
  stored = sdtt_run.run_config(config)
  assert stored.distill.use_noise is False and config.distill.use_noise is True
  for key, value in [("kernel.kind", "uniform"), ("distill.teacher_top_p", 0.9),
                     ("distill.teacher_temperature", 0.5),
                     ("distill.init_workdir", "runs/k4")]:
    bad = copy.deepcopy(config)
    section, name = key.split(".")
    bad[section][name] = value
    with pytest.raises(sdtt_run.SDTTError, match=name):
      sdtt_run.check_config(bad)
  with pytest.raises(sdtt_run.SDTTError, match="teacher_workdir is empty|power of two"):
    sdtt_run.distill_sdtt(config, "/nonexistent/sdtt", start_steps=12)
