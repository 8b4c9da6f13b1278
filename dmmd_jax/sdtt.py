"""Progressive distillation baseline in the style of SDTT (Deschenaux & Gulcehre 2024), masked only.

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
- one training run with `train.run_loop`: every round trains `distill.num_steps` steps with a
  fresh AdamW state (warm-up and cosine decay per round); at a round's start the round teacher
  becomes the student's EMA parameters, the student keeps training its raw parameters;
- times only on the student's own grid points (the sampler never queries others);
- no teacher temperature / top-p (rejected with an error), no student noise input, masked
  kernel only (SDTT is defined for masked diffusion);
- the intermediate teacher state is sampled in float32 (Gumbel-max), not float64.

Workdir: like a D-MMD student's (run.json kind "student", student_steps = k, plus method "sdtt",
start_steps and num_rounds); the checkpoint state holds "student_ema" (what `runs.load` reads) and
the stored config sets distill.use_noise = False, so `runs.load` / experiments/sample.py sample it
unchanged with k steps and no noise.
"""

import copy
import functools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dmmd_jax import distill, kernels, sampling, sharding
from dmmd_jax import train as train_lib
from dmmd_jax import workdir as workdir_lib


class SDTTError(distill.DistillError):
  """An SDTT run that cannot start as configured."""


def round_schedule(start_steps: int, student_steps: int) -> list:
  """Teacher step counts of the rounds: [N, N/2, …, 2k]; N must be k · 2^r with r ≥ 1."""
  ratio = start_steps / student_steps if student_steps > 0 else 0
  rounds = int(round(math.log2(ratio))) if ratio >= 1 else 0
  if rounds < 1 or student_steps * 2**rounds != start_steps:
    raise SDTTError(f"start steps {start_steps} must be the student's {student_steps} times a "
                    "power of two (at least 2): each round halves the steps.")
  return [start_steps // 2**r for r in range(rounds)]


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
      key, kernels.posterior_log_probs(kernel, z_t, log_x1, t1[:, None], t0[:, None]), False)
  log_x2 = jax.nn.log_softmax(apply_fn(teacher_params, z_mid, t1), axis=-1)
  first = (z_t == kernel.mask_id) & (z_mid != kernel.mask_id)
  return jnp.exp(jnp.where(first[..., None], log_x1, log_x2))


def noisy_inputs(key, x, num_steps, *, kernel, grid):
  """Student-grid times and noisy tokens: (teacher grid index 2j `[b]`, t `[b]`, z_t `[b, L]`)."""
  index_key, zt_key = jax.random.split(key)
  index = 2 * jax.random.randint(index_key, (x.shape[0],), 0, jnp.asarray(num_steps) // 2)
  t = grid_time(index, num_steps, grid)
  return index, t, kernels.sample_marginal(zt_key, kernel, x, t)


def _masked_kl(target, log_student, z_t, kernel):
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
  total, count = _masked_kl(target, log_student, z_t, kernel)
  masked = z_t == kernel.mask_id
  entropy = -jnp.sum(jnp.where(masked, jnp.sum(jnp.exp(log_student) * log_student, -1), 0.0))
  count = jnp.maximum(count, 1)
  return total / x.size, {"kl_per_masked": total / count, "student_entropy": entropy / count}


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
  index, t, z_t = noisy_inputs(input_key, x, num_steps, kernel=kernel, grid=grid)
  targets = jax.vmap(lambda k: teacher_targets(
      k, teacher_params, z_t, index, num_steps, apply_fn=apply_fn, kernel=kernel, grid=grid))(
          jax.random.split(mid_key, num_draws))
  log_student = jax.nn.log_softmax(apply_fn(student_params, z_t, t), axis=-1)
  total, count = _masked_kl(targets.mean(axis=0), log_student, z_t, kernel)
  return total / jnp.maximum(count, 1)


@flax.struct.dataclass
class SDTTState:
  """Mirrors `distill.DistillState`'s names where they mean the same (runs.load reads
  "student_ema"); `teacher` is the current round's teacher."""

  step: jax.Array
  student: dict
  student_ema: dict
  teacher: dict
  student_opt: optax.OptState


def sdtt_update(state: SDTTState, batch, num_steps, *, loss_fn, optimizer, ema_decay: float,
                seed: int):
  """One AdamW step of the student; num_steps: the round teacher's n (traced)."""
  key = jax.random.fold_in(jax.random.key(seed), state.step)
  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.student, state.teacher, batch, key, num_steps)
  updates, opt_state = optimizer.update(grads, state.student_opt, state.student)
  student = optax.apply_updates(state.student, updates)
  state = state.replace(step=state.step + 1, student=student, student_opt=opt_state,
                        student_ema=train_lib.ema_update(state.student_ema, student, ema_decay))
  return state, {"kl_loss": loss, "student_grad_norm": optax.global_norm(grads), **metrics}


def sdtt_optimizer(config):
  d = config.distill
  return train_lib.make_optimizer(d.learning_rate, d.warmup_steps, d.num_steps,
                                  grad_clip=d.grad_clip)


def run_config(config):
  """The config stored in the workdir: no student noise input (runs.load then samples without)."""
  c = copy.deepcopy(config)
  c.unlock()
  c.distill.use_noise = False
  c.lock()
  return c


def check_config(config) -> None:
  d = config.distill
  if config.kernel.kind != "masked":
    raise SDTTError("SDTT is defined for masked diffusion; this config has kernel.kind="
                    f"{config.kernel.kind!r}.")
  if d.teacher_temperature != 1.0 or d.teacher_top_p != 1.0:
    raise SDTTError("SDTT here distils the plain teacher; set distill.teacher_temperature=1 and "
                    "distill.teacher_top_p=1.")
  if config.model.block_size not in (0, config.data.seq_len):
    raise SDTTError("SDTT here distils whole-sequence teachers; this config has "
                    f"model.block_size={config.model.block_size}.")


def start_round(state: SDTTState, optimizer, shardings) -> SDTTState:
  """New round: the teacher becomes the student's EMA; the optimizer state starts afresh."""
  opt_state = jax.device_put(jax.jit(optimizer.init)(state.student), shardings.student_opt)
  teacher = jax.tree.map(jnp.copy, state.student_ema)
  return state.replace(teacher=teacher, student_opt=opt_state)


def _prepare_workdir(workdir, config, setup, schedule, start_steps):
  d = config.distill
  info = {"kind": "student", "method": "sdtt", "data_info": setup.info,
          "student_steps": d.student_steps, "teacher_workdir": d.teacher_workdir,
          "start_steps": start_steps, "num_rounds": len(schedule)}
  try:
    stored = workdir_lib.load_run_info(workdir)
  except workdir_lib.WorkdirError:
    stored = None
  if stored is not None and (stored.get("method"), stored.get("start_steps"),
                             stored.get("student_steps")) != ("sdtt", start_steps,
                                                              d.student_steps):
    raise SDTTError(f"{workdir} holds a different run ({stored.get('method', 'dmmd')}, start "
                    f"{stored.get('start_steps')}, k={stored.get('student_steps')}); use a new "
                    "--workdir.")
  workdir_lib.prepare(workdir, config, info)


def distill_sdtt(config, workdir: str, start_steps: int = 0) -> dict:
  """Run (or resume) SDTT rounds from config.distill.teacher_workdir down to k steps.

  start_steps: the first round teacher's steps N (0: config.sample.steps). Every round trains
  config.distill.num_steps steps. Returns {"step", "rounds"}.
  """
  check_config(config)
  config = run_config(config)
  d = config.distill
  start_steps = start_steps or config.sample.steps
  schedule = round_schedule(start_steps, d.student_steps)
  setup = train_lib.build_setup(config, d.batch_size)
  teacher = distill.load_teacher(setup, d.teacher_workdir)
  _prepare_workdir(workdir, config, setup, schedule, start_steps)
  optimizer = sdtt_optimizer(config)
  copy_tree = functools.partial(jax.tree.map, jnp.copy)
  state = SDTTState(step=jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(setup.mesh)),
                    student=copy_tree(teacher), student_ema=copy_tree(teacher), teacher=teacher,
                    student_opt=jax.jit(optimizer.init)(teacher))
  shardings = train_lib.shardings_of(state)
  iterator = train_lib.data_iterator(setup, d.batch_size, config.seed)
  manager = workdir_lib.checkpoint_manager(workdir, config.train.keep_checkpoints)
  state = train_lib.restore_or_init(manager, state, shardings, iterator)
  log = workdir_lib.MetricsLog(workdir, int(state.step))
  loss_fn = functools.partial(sdtt_loss, apply_fn=setup.apply_fn, kernel=setup.kernel,
                              grid=config.sample.grid)
  update = jax.jit(functools.partial(sdtt_update, loss_fn=loss_fn, optimizer=optimizer,
                                     ema_decay=d.ema_decay, seed=config.seed),
                   in_shardings=(shardings, sharding.batch_sharding(setup.mesh), None),
                   out_shardings=(shardings, sharding.replicated(setup.mesh)), donate_argnums=0)
  counter = [int(state.step)]

  def step_fn(state, batch):
    step, counter[0] = counter[0], counter[0] + 1
    if step and step % d.num_steps == 0:
      state = start_round(state, optimizer, shardings)
    state, metrics = update(state, batch, np.int32(schedule[step // d.num_steps]))
    return state, dict(metrics, round=step // d.num_steps)

  with sharding.rules_context(setup.mesh):
    state = train_lib.run_loop(
        state=state, step_fn=step_fn, iterator=iterator, manager=manager, log=log,
        num_steps=d.num_steps * len(schedule), log_every=d.log_every,
        checkpoint_every=d.checkpoint_every, mesh=setup.mesh,
        tokens_per_step=d.batch_size * setup.seq_len, desc=f"sdtt {start_steps}→{d.student_steps}")
  log.close()
  manager.close()
  return {"step": int(state.step), "rounds": len(schedule)}


def expected_marginal_kl(student_params, teacher_params, x, num_steps: int, *, apply_fn, kernel,
                         grid: str = "uniform", num_keys: int = 8, num_draws: int = 32,
                         seed: int = 1234) -> float:
  """`marginal_kl` averaged over num_keys fixed draws of (t, z_t): an evaluation of one round."""
  keys = jax.random.split(jax.random.key(seed), num_keys)
  return float(np.mean([marginal_kl(student_params, teacher_params, x, k, num_steps,
                                    apply_fn=apply_fn, kernel=kernel, grid=grid,
                                    num_draws=num_draws) for k in keys]))
