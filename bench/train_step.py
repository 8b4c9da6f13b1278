r"""Training-step throughput: teacher step, D-MMD updates, and a bare-JAX reference step.

    python bench/train_step.py --config=configs/shakespeare_char.py:small [--steps=20]

Prints tokens/s of (a) the library's teacher step (AdamW + clipping + EMA + metrics, jit-sharded),
(b) a bare-JAX step of the same network (value_and_grad + optax.adam, nothing else), their ratio
(goal ≥ 0.9), and (c) the D-MMD student and auxiliary updates and their cost relative to the
teacher step (goal ≤ 3.5×), and sampling speed of a k-step student vs a T-step teacher.
"""

import functools
import time

import jax
import jax.numpy as jnp
import optax
from absl import app, flags
from ml_collections import config_flags

from dmmd_jax.diffusion import elbo, sampling
from dmmd_jax.infra import sharding
from dmmd_jax.training import dmmd_run, teacher_run
from dmmd_jax.training import setup as setup_lib
from dmmd_jax.training import state as state_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/shakespeare_char.py:small", "")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per measurement (after 2 warm-up).")
_K = flags.DEFINE_integer("k", 16, "Student steps for the sampling comparison.")
_T = flags.DEFINE_integer("teacher_steps", 256, "Teacher steps for the sampling comparison.")


def timed(fn, state, batch, steps):
  """Seconds per call of state → fn(state, batch)[0], after two warm-up calls."""
  for _ in range(2):
    state = fn(state, batch)[0]
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in range(steps):
    state = fn(state, batch)[0]
  jax.block_until_ready(state)
  return (time.perf_counter() - start) / steps, state


def bare_step_fn(setup):
  """The reference: the same network and loss, plain optax.adam, nothing else."""
  opt = optax.adam(1e-4)

  @jax.jit
  def step(carry, batch):
    params, opt_state, key = carry
    key, sub = jax.random.split(key)
    loss_fn = lambda p: jnp.mean(elbo.diffusion_loss(
        sub, p, setup.apply_fn, setup.kernel, batch, setup.config.train.uniform_elbo_steps))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state)
    return (optax.apply_updates(params, updates), opt_state, key), loss

  return step, opt


def main(argv):
  del argv
  config = _CONFIG.value
  setup = setup_lib.build_setup(config, config.train.batch_size)
  batch_size, length = config.train.batch_size, setup.seq_len
  tokens = batch_size * length
  batch = sharding.global_batch(setup.train_tokens[:batch_size], setup.mesh)
  print(f"devices: {jax.devices()}  preset={config.preset} batch={batch_size} length={length}")

  optimizer = teacher_run.teacher_optimizer(config)
  state, shardings = teacher_run.init_teacher_state(setup, optimizer)
  step = teacher_run.compile_teacher_step(setup, optimizer, shardings)
  lib_s, state = timed(step, state, batch, _STEPS.value)
  bare, opt = bare_step_fn(setup)
  carry = (jax.tree.map(jnp.copy, state.params), opt.init(state.params), jax.random.key(0))
  bare_s, _ = timed(bare, carry, batch, _STEPS.value)
  print(f"teacher step   {lib_s * 1e3:8.1f} ms  {tokens / lib_s:10.0f} tokens/s")
  print(f"bare-JAX step  {bare_s * 1e3:8.1f} ms  {tokens / bare_s:10.0f} tokens/s")
  print(f"library / bare throughput ratio: {bare_s / lib_s:.3f} (goal >= 0.9)")

  cfg = setup_lib.estimator_config_of(config)
  student_opt, aux_opt = dmmd_run.distill_optimizers(config)
  dstate = dmmd_run.init_distill_state(state.ema_params, student_opt, aux_opt, setup.mesh,
                                      jax.random.key(1), config.distill.noise_init_scale)
  teacher = state.ema_params
  updates = dmmd_run.compile_updates(
      setup, cfg, student_opt, aux_opt, state_lib.shardings_of(dstate),
      state_lib.shardings_of(teacher))
  student_s, dstate = timed(lambda s, b: updates.student(s, teacher, b), dstate, batch,
                            _STEPS.value)
  aux_s, dstate = timed(lambda s, b: updates.aux(s, teacher, b), dstate, batch, _STEPS.value)
  joint_s, dstate = timed(lambda s, b: updates.joint(s, teacher, b), dstate, batch,
                          _STEPS.value)
  print(f"student update {student_s * 1e3:8.1f} ms  ({student_s / lib_s:.2f}x teacher step)")
  print(f"aux update     {aux_s * 1e3:8.1f} ms  ({aux_s / lib_s:.2f}x teacher step)")
  print(f"joint update   {joint_s * 1e3:8.1f} ms  ({joint_s / (student_s + aux_s):.2f}x a student "
        "plus an aux update)")

  n = batch_size
  sampler = functools.partial(sampling.sample, jax.random.key(0), setup.apply_fn)
  noise_fn = dmmd_run.student_noise_fn(setup, cfg)
  times = {}
  for name, steps, params, nf in (("teacher", _T.value, teacher, None),
                                  ("student", _K.value, dstate.student, noise_fn)):
    scfg = sampling.SamplerConfig(steps=steps)
    jax.block_until_ready(sampler(params, setup.kernel, scfg, n, length, nf))
    start = time.perf_counter()
    jax.block_until_ready(sampler(params, setup.kernel, scfg, n, length, nf))
    times[name] = time.perf_counter() - start
    print(f"{name} sampling, {steps} steps: {n / times[name]:8.2f} sequences/s")
  speedup = times["teacher"] / times["student"]
  goal = 0.8 * _T.value / _K.value
  print(f"student k={_K.value} vs teacher T={_T.value}: {speedup:.1f}x faster "
        f"(goal >= {goal:.1f})")


if __name__ == "__main__":
  app.run(main)
