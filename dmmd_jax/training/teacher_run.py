"""Teacher training: the jit-sharded negative-ELBO step and `train_teacher`, a whole run.

`train_teacher(config, workdir)` is what `experiments/train_teacher.py` calls. Everything that can
be checked (config values, data, vocabulary, mesh, stored workdir) is checked in `build_setup`
before anything is compiled or written; resume is exact (`loop.py`).
"""

import functools
import math
import os

import jax
import jax.numpy as jnp
import optax

from dmmd_jax import config_lib
from dmmd_jax.data import render
from dmmd_jax.diffusion import elbo
from dmmd_jax.infra import checkpoints, sharding, workdir_guard
from dmmd_jax.infra import workdir as workdir_lib
from dmmd_jax.models import blocks, denoiser
from dmmd_jax.training import loop
from dmmd_jax.training import setup as setup_lib
from dmmd_jax.training import state as state_lib


def teacher_optimizer(config: config_lib.ExperimentConfig):
  t = config.train
  return state_lib.make_optimizer(t.learning_rate, t.warmup_steps, t.num_steps, t.weight_decay,
                        t.grad_clip, t.b1, t.b2)


def init_teacher_state(setup: setup_lib.Setup, optimizer):
  """A fresh TrainState, parameters born sharded; returns (state, state_shardings)."""
  key = jax.random.key(setup.config.seed)
  init = functools.partial(denoiser.init_params, cfg=setup.model_cfg)
  params, _ = sharding.init_sharded(init, key, setup.mesh)
  opt_state = state_lib.init_opt_state(optimizer, params, setup.mesh)
  step = jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(setup.mesh))
  state = state_lib.TrainState(step=step, params=params, ema_params=jax.tree.map(jnp.copy, params),
                     opt_state=opt_state)
  return state, state_lib.shardings_of(state)


def teacher_step(state: state_lib.TrainState, batch, *, apply_fn, kernel, optimizer,
                 ema_decay: float, uniform_elbo_steps: int, seed: int,
                 continuous_time: bool = False, context: bool = False):
  """One AdamW step on the negative ELBO. batch: int `[batch, length]`; context: block model."""
  key = jax.random.fold_in(jax.random.key(seed), state.step)

  def loss_fn(params):
    return jnp.mean(elbo.diffusion_loss(key, params, apply_fn, kernel, batch,
                                        uniform_elbo_steps, context=context,
                                        continuous_time=continuous_time))

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state_lib.TrainState(step=state.step + 1, params=params,
                         ema_params=state_lib.ema_update(state.ema_params, params, ema_decay),
                         opt_state=opt_state)
  metrics = {"loss_bpt": elbo.bits_per_token(loss, batch.shape[1]),
             "grad_norm": optax.global_norm(grads)}
  return new_state, metrics


def compile_teacher_step(setup: setup_lib.Setup, optimizer, shardings):
  c = setup.config
  step = functools.partial(
      teacher_step, apply_fn=setup.apply_fn, kernel=setup.kernel, optimizer=optimizer,
      ema_decay=c.train.ema_decay, uniform_elbo_steps=c.train.uniform_elbo_steps, seed=c.seed,
      continuous_time=c.train.uniform_continuous_time, context=setup.is_block)
  return jax.jit(sharding.on_mesh(step, setup.mesh),
                 in_shardings=(shardings, sharding.batch_sharding(setup.mesh)),
                 out_shardings=(shardings, sharding.replicated(setup.mesh)), donate_argnums=0)


def heldout_bits_per_token(setup: setup_lib.Setup, params, batch_size: int, num_batches: int,
                           seed=1234):
  """Mean negative ELBO (bits/token) on the first num_batches·batch_size held-out sequences."""
  tokens = setup.eval_tokens
  num_batches = max(1, min(num_batches, len(tokens) // batch_size))
  loss = jax.jit(functools.partial(
      elbo.diffusion_loss, apply_fn=setup.apply_fn, kernel=setup.kernel,
      uniform_elbo_steps=setup.config.train.uniform_elbo_steps, context=setup.is_block))
  total = 0.0
  for i in range(num_batches):
    rows = tokens[i * batch_size:(i + 1) * batch_size]
    batch = sharding.global_batch(sharding.host_rows(rows), setup.mesh)
    nats = loss(jax.random.fold_in(jax.random.key(seed), i), params, x=batch)
    total += float(jnp.mean(nats))
  return total / num_batches / (setup.seq_len * math.log(2.0))


@workdir_guard.releases_locks
def train_teacher(config, workdir: str) -> dict:
  """Train (or resume) a teacher; returns final metrics {step, eval_bpt}.

  config: an `ExperimentConfig` (or the ConfigDict of a config file, converted here).
  """
  config = config_lib.typed(config)
  setup = setup_lib.build_setup(config, config.train.batch_size)
  workdir_guard.claim(workdir, "teacher", config, {"kind": "teacher", "data_info": setup.info},
                      (setup.train_tokens, setup.eval_tokens))
  optimizer = teacher_optimizer(config)
  state, shardings = init_teacher_state(setup, optimizer)
  iterator = loop.data_iterator(setup, config.train.batch_size, config.seed)
  manager = checkpoints.checkpoint_manager(workdir, config.train.keep_checkpoints)
  state = loop.restore_or_init(manager, state, shardings, iterator, workdir)
  log = workdir_lib.MetricsLog(workdir, int(state.step))
  t = config.train

  def evaluate(state, step):
    return {"eval_bpt": heldout_bits_per_token(setup, state.ema_params, t.batch_size,
                                               t.eval_batches)}

  def samples(state, step):
    tokens = blocks.sample_model(jax.random.key(step), setup.apply_fn, state.ema_params,
                                 setup.kernel, setup_lib.sampler_config_of(config),
                                 setup.model_cfg, t.num_samples, setup.seq_len)
    if jax.process_index() == 0:
      os.makedirs(f"{workdir}/samples", exist_ok=True)
      render.dump_samples(setup.info, tokens, f"{workdir}/samples/step_{step}")
    return {}

  compiled = compile_teacher_step(setup, optimizer, shardings)

  def step_fn(state, batch, index):
    del index  # every update is the same
    return compiled(state, batch)

  state = loop.run_loop(
      state=state, step_fn=step_fn, iterator=iterator, manager=manager, log=log,
      num_steps=t.num_steps, log_every=t.log_every, checkpoint_every=t.checkpoint_every,
      mesh=setup.mesh, tokens_per_step=t.batch_size * setup.seq_len,
      periodic=((t.eval_every, evaluate), (t.sample_every, samples)), desc="teacher")
  final = {"step": int(state.step), **evaluate(state, int(state.step))}
  log.write(final["step"], {"final_eval_bpt": final["eval_bpt"]})
  log.close()
  manager.close()
  return final
