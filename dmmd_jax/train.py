"""Teacher training: setup from a config, the jit-sharded ELBO step, and the shared training loop.

`train_teacher(config, workdir)` is what `experiments/train_teacher.py` calls. Everything that can
be checked (config values, data, vocabulary, mesh, stored workdir) is checked in `build_setup`
before anything is compiled or written. Randomness of step n is `fold_in(seed, n)` and the data
iterator state is checkpointed, so killing a run and restarting the same command reproduces the
uninterrupted loss curve exactly.
"""

import dataclasses
import functools
import math
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from dmmd_jax import blocks, config_lib, denoiser, losses, sharding
from dmmd_jax import data as data_lib
from dmmd_jax import workdir as workdir_lib


class TrainingError(RuntimeError):
  """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  ema_params: dict
  opt_state: optax.OptState


@dataclasses.dataclass
class Setup:
  """Everything a run needs, built and validated before any compile."""

  config: object
  info: data_lib.DataInfo
  train_tokens: np.ndarray
  eval_tokens: np.ndarray
  kernel: object
  model_cfg: denoiser.DenoiserConfig
  mesh: object

  @functools.cached_property
  def apply_fn(self):
    """One partial per setup: jit caches by identity, a new partial per call would recompile."""
    return functools.partial(blocks.apply if self.is_block else denoiser.apply, cfg=self.model_cfg)

  @property
  def is_block(self) -> bool:
    """A block-autoregressive model: its apply_fn also takes the clean context (`blocks.py`)."""
    return self.model_cfg.block_size > 0

  @property
  def seq_len(self) -> int:
    return self.info.seq_len


def build_setup(config, batch_size: int) -> Setup:
  """Validate config, load and check data, build kernel/model config and mesh. No compile."""
  config_lib.validate(config)
  train_tokens, eval_tokens, info = data_lib.load_dataset(config.data)
  kernel = config_lib.kernel_from_config(config, info.vocab_size)
  model_cfg = config_lib.denoiser_config(config, kernel, info.seq_len, info.image_shape or ())
  denoiser.validate_config(model_cfg)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_divisibility(mesh, batch_size, model_cfg.width)
  return Setup(config, info, train_tokens, eval_tokens, kernel, model_cfg, mesh)


def make_optimizer(learning_rate, warmup_steps, total_steps, weight_decay=0.0, grad_clip=1.0,
                   b1=0.9, b2=0.99):
  """AdamW with linear warmup, cosine decay to 10% and global-norm clipping."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, warmup_steps, max(total_steps, warmup_steps + 1),
      end_value=0.1 * learning_rate)
  return optax.chain(optax.clip_by_global_norm(grad_clip),
                     optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay))


def ema_update(ema, params, decay: float):
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def teacher_optimizer(config):
  t = config.train
  return make_optimizer(t.learning_rate, t.warmup_steps, t.num_steps, t.weight_decay,
                        t.grad_clip, t.b1, t.b2)


def init_teacher_state(setup: Setup, optimizer):
  """A fresh TrainState, parameters born sharded; returns (state, state_shardings)."""
  key = jax.random.key(setup.config.seed)
  init = functools.partial(denoiser.init_params, cfg=setup.model_cfg)
  params, _ = sharding.init_sharded(init, key, setup.mesh)
  opt_state = init_opt_state(optimizer, params, setup.mesh)
  step = jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(setup.mesh))
  state = TrainState(step=step, params=params, ema_params=jax.tree.map(jnp.copy, params),
                     opt_state=opt_state)
  return state, shardings_of(state)


def init_opt_state(optimizer, params, mesh):
  """optimizer.init(params) with every moment sharded like its parameter, counters replicated.

  A plain jax.jit(optimizer.init) puts its outputs (zeros that do not depend on the parameters'
  values) on one device, which a multi-device or multi-process step cannot take. A state leaf is
  matched to the parameter whose key path ends its own (optax.multi_transform nests them too).
  """
  by_path = {_key_names(path): x for path, x in jax.tree_util.tree_leaves_with_path(params)}
  depth = max(map(len, by_path), default=0)

  def leaf_sharding(path, leaf):
    names = _key_names(path)
    for n in range(min(depth, len(names)), 0, -1):
      param = by_path.get(names[-n:])
      if param is not None and param.shape == leaf.shape:
        return param.sharding
    return sharding.replicated(mesh)

  abstract = jax.eval_shape(optimizer.init, params)
  shardings = jax.tree_util.tree_map_with_path(leaf_sharding, abstract)
  return jax.jit(optimizer.init, out_shardings=shardings)(params)


def _key_names(path) -> tuple:
  return tuple(str(k) for k in path)


def shardings_of(tree):
  """The NamedShardings of a tree of live arrays (params, optimizer states, …)."""
  return jax.tree.map(lambda x: x.sharding, tree)


def teacher_step(state: TrainState, batch, *, apply_fn, kernel, optimizer, ema_decay: float,
                 uniform_elbo_steps: int, seed: int, context: bool = False):
  """One AdamW step on the negative ELBO. batch: int `[batch, length]`; context: block model."""
  key = jax.random.fold_in(jax.random.key(seed), state.step)

  def loss_fn(params):
    return jnp.mean(losses.diffusion_loss(key, params, apply_fn, kernel, batch,
                                          uniform_elbo_steps, context))

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = TrainState(step=state.step + 1, params=params,
                         ema_params=ema_update(state.ema_params, params, ema_decay),
                         opt_state=opt_state)
  metrics = {"loss_bpt": losses.bits_per_token(loss, batch.shape[1]),
             "grad_norm": optax.global_norm(grads)}
  return new_state, metrics


def compile_teacher_step(setup: Setup, optimizer, shardings):
  c = setup.config
  step = functools.partial(
      teacher_step, apply_fn=setup.apply_fn, kernel=setup.kernel, optimizer=optimizer,
      ema_decay=c.train.ema_decay, uniform_elbo_steps=c.train.uniform_elbo_steps, seed=c.seed,
      context=setup.is_block)
  return jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(setup.mesh)),
                 out_shardings=(shardings, sharding.replicated(setup.mesh)), donate_argnums=0)


def heldout_bits_per_token(setup: Setup, params, batch_size: int, num_batches: int, seed=1234):
  """Mean negative ELBO (bits/token) on the first num_batches·batch_size held-out sequences."""
  tokens = setup.eval_tokens
  num_batches = max(1, min(num_batches, len(tokens) // batch_size))
  loss = jax.jit(functools.partial(
      losses.diffusion_loss, apply_fn=setup.apply_fn, kernel=setup.kernel,
      uniform_elbo_steps=setup.config.train.uniform_elbo_steps, context=setup.is_block))
  total = 0.0
  for i in range(num_batches):
    rows = tokens[i * batch_size:(i + 1) * batch_size]
    batch = sharding.global_batch(_host_rows(rows), setup.mesh)
    nats = loss(jax.random.fold_in(jax.random.key(seed), i), params, x=batch)
    total += float(jnp.mean(nats))
  return total / num_batches / (setup.seq_len * math.log(2.0))


def _host_rows(global_rows: np.ndarray) -> np.ndarray:
  """This host's contiguous share of a global batch (matches the batch sharding's row order)."""
  n = len(global_rows) // jax.process_count()
  return global_rows[jax.process_index() * n:(jax.process_index() + 1) * n]


def data_iterator(setup: Setup, batch_size: int, seed: int):
  return data_lib.batch_iterator(setup.train_tokens, batch_size, seed,
                                 process_index=jax.process_index(),
                                 process_count=jax.process_count())


def dump_samples(setup: Setup, tokens, path_stem: str) -> str:
  """Write samples as text (.txt) or a PNG grid; returns the path."""
  tokens = np.asarray(tokens)
  if setup.info.kind == "image":
    path = path_stem + ".png"
    data_lib.save_image_grid(setup.info, tokens, path)
    return path
  path = path_stem + ".txt"
  with open(path, "w") as f:
    f.write("\n\n=====\n\n".join(data_lib.decode_text(setup.info, tokens)))
  return path


def run_loop(*, state, step_fn, iterator, manager, log, num_steps: int, log_every: int,
             checkpoint_every: int, mesh, tokens_per_step: int, periodic=(), desc="train"):
  """The shared loop: steps, NaN guard, logging, periodic hooks, checkpoints, progress bar.

  step_fn(state, global_batch) → (state, metrics dict of scalars). periodic: (every, fn(state,
  step) → dict of scalars to log). A non-finite metric whose name ends in "loss…" stops the run
  with TrainingError before the next checkpoint, so the last checkpoint on disk is always good.
  """
  start = int(state.step)
  pending = []
  bar = tqdm(total=num_steps, initial=start, desc=desc, disable=jax.process_index() != 0,
             dynamic_ncols=True)
  tick = time.perf_counter()
  try:
    for step in range(start + 1, num_steps + 1):
      batch = sharding.global_batch(next(iterator), mesh)
      state, metrics = step_fn(state, batch)
      pending.append(metrics)
      bar.update(1)
      if step % log_every == 0 or step % checkpoint_every == 0 or step == num_steps:
        means = _check_and_average(pending, step - len(pending) + 1)
        rate = tokens_per_step * len(pending) / (time.perf_counter() - tick)
        pending, tick = [], time.perf_counter()
        means["tokens_per_s"] = rate
        for every, hook in periodic:
          if every and step % every == 0:
            means.update(hook(state, step))
        log.write(step, means)
        bar.set_postfix({k: f"{v:.3g}" for k, v in means.items()})
      if step % checkpoint_every == 0 or step == num_steps:
        workdir_lib.save_checkpoint(manager, step, state, iterator.get_state())
  finally:  # an error (e.g. a NaN) must not leave the last checkpoint half-written
    bar.close()
    manager.wait_until_finished()
  return state


def _check_and_average(pending, first_step: int) -> dict:
  host = jax.device_get(pending)
  for offset, metrics in enumerate(host):
    for name, value in metrics.items():
      if ("loss" in name or name.endswith("grad_norm")) and not np.isfinite(value):
        raise TrainingError(f"{name} became {value} at step {first_step + offset}; stopping. The "
                            "last good checkpoint is kept; lower the learning rate or check the "
                            "data.")
  names = sorted({k for m in host for k in m})  # alternating updates may log different names
  return {k: float(np.mean([m[k] for m in host if k in m])) for k in names}


def restore_or_init(manager, state, shardings, iterator):
  """Resume from the latest checkpoint if one exists; returns the state."""
  if manager.latest_step() is None:
    return state
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          state, shardings)
  state, data_state = workdir_lib.restore_checkpoint(manager, abstract)
  iterator.set_state(data_state)
  return state


def train_teacher(config, workdir: str) -> dict:
  """Train (or resume) a teacher; returns final metrics {step, eval_bpt}."""
  setup = build_setup(config, config.train.batch_size)
  workdir_lib.prepare(workdir, config, {"kind": "teacher", "data_info": setup.info})
  optimizer = teacher_optimizer(config)
  state, shardings = init_teacher_state(setup, optimizer)
  iterator = data_iterator(setup, config.train.batch_size, config.seed)
  manager = workdir_lib.checkpoint_manager(workdir, config.train.keep_checkpoints)
  state = restore_or_init(manager, state, shardings, iterator)
  log = workdir_lib.MetricsLog(workdir, int(state.step))
  t = config.train

  def evaluate(state, step):
    return {"eval_bpt": heldout_bits_per_token(setup, state.ema_params, t.batch_size,
                                               t.eval_batches)}

  def samples(state, step):
    tokens = blocks.sample_model(jax.random.key(step), setup.apply_fn, state.ema_params,
                                 setup.kernel, config_lib.sampler_config(config), setup.model_cfg,
                                 t.num_samples, setup.seq_len)
    if jax.process_index() == 0:
      import os  # noqa: PLC0415
      os.makedirs(f"{workdir}/samples", exist_ok=True)
      dump_samples(setup, tokens, f"{workdir}/samples/step_{step}")
    return {}

  with sharding.rules_context(setup.mesh):
    step_fn = compile_teacher_step(setup, optimizer, shardings)
    state = run_loop(state=state, step_fn=step_fn, iterator=iterator, manager=manager, log=log,
                     num_steps=t.num_steps, log_every=t.log_every,
                     checkpoint_every=t.checkpoint_every, mesh=setup.mesh,
                     tokens_per_step=t.batch_size * setup.seq_len,
                     periodic=((t.eval_every, evaluate), (t.sample_every, samples)),
                     desc="teacher")
    final = {"step": int(state.step), **evaluate(state, int(state.step))}
  log.write(final["step"], {"final_eval_bpt": final["eval_bpt"]})
  log.close()
  manager.close()
  return final
