"""The SDTT baseline's training run (losses in `distill/sdtt.py`): rounds N → N/2 → … → k.

One training run with the shared loop: every round trains `distill.num_steps` steps with a fresh
AdamW state (warm-up and cosine decay per round); at a round's start the round teacher becomes the
student's EMA parameters, the student keeps training its raw parameters. Which round an update
belongs to follows from its index (= state.step).

Workdir: like a D-MMD student's (run.json kind "student", student_steps = k, plus method "sdtt",
start_steps and num_rounds); the checkpoint state holds "student_ema" (what
`trained_model.load` reads) and the stored config sets distill.use_noise = False, so
`trained_model.load` / experiments/sample.py sample it unchanged with k steps and no noise.
"""

import functools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dmmd_jax import config_lib
from dmmd_jax.distill import sdtt
from dmmd_jax.infra import checkpoints, sharding, workdir_guard
from dmmd_jax.infra import workdir as workdir_lib
from dmmd_jax.training import dmmd_run, loop
from dmmd_jax.training import setup as setup_lib
from dmmd_jax.training import state as state_lib


class SDTTError(dmmd_run.DistillError):
  """An SDTT run that cannot start as configured."""


@flax.struct.dataclass
class SDTTState:
  """Mirrors `dmmd_run.DistillState`'s names where they mean the same (`trained_model.load`
  reads "student_ema"); `teacher` is the current round's teacher."""

  step: jax.Array
  student: dict
  student_ema: dict
  teacher: dict
  student_opt: optax.OptState


def round_schedule(start_steps: int, student_steps: int) -> list:
  """Teacher step counts of the rounds: [N, N/2, …, 2k]; N must be k · 2^r with r ≥ 1."""
  ratio = start_steps / student_steps if student_steps > 0 else 0
  rounds = int(round(math.log2(ratio))) if ratio >= 1 else 0
  if rounds < 1 or student_steps * 2**rounds != start_steps:
    raise SDTTError(f"start steps {start_steps} must be the student's {student_steps} times "
                    "a power of two (at least 2): each round halves the steps.")
  return [start_steps // 2**r for r in range(rounds)]


def sdtt_update(state: SDTTState, batch, num_steps, *, loss_fn, optimizer, ema_decay: float,
                seed: int):
  """One AdamW step of the student; num_steps: the round teacher's n (traced)."""
  key = jax.random.fold_in(jax.random.key(seed), state.step)
  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.student, state.teacher, batch, key, num_steps)
  updates, opt_state = optimizer.update(grads, state.student_opt, state.student)
  student = optax.apply_updates(state.student, updates)
  state = state.replace(step=state.step + 1, student=student, student_opt=opt_state,
                        student_ema=state_lib.ema_update(state.student_ema, student, ema_decay))
  return state, {"kl_loss": loss, "student_grad_norm": optax.global_norm(grads), **metrics}


def sdtt_optimizer(config):
  d = config.distill
  return state_lib.make_optimizer(d.learning_rate, d.warmup_steps, d.num_steps,
                                  grad_clip=d.grad_clip)


def run_config(config: config_lib.ExperimentConfig) -> config_lib.ExperimentConfig:
  """The config stored in the workdir: no student noise input (so it samples without)."""
  return config_lib.replace(config_lib.typed(config), distill={"use_noise": False})


def check_config(config) -> None:
  d = config.distill
  if config.kernel.kind != "masked":
    raise SDTTError("SDTT is defined for masked diffusion; this config has kernel.kind="
                    f"{config.kernel.kind!r}.")
  if d.teacher_temperature != 1.0 or d.teacher_top_p != 1.0:
    raise SDTTError("SDTT here distils the plain teacher; set distill.teacher_temperature=1 and "
                    "distill.teacher_top_p=1.")
  if d.init_workdir:
    raise SDTTError("SDTT starts every round from its teacher; distill.init_workdir is for D-MMD "
                    "students.")
  if config.model.block_size not in (0, config.data.seq_len):
    raise SDTTError("SDTT here distils whole-sequence teachers; this config has "
                    f"model.block_size={config.model.block_size}.")


def start_round(state: SDTTState, optimizer, mesh) -> SDTTState:
  """New round: the teacher becomes the student's EMA; the optimizer state starts afresh."""
  opt_state = state_lib.init_opt_state(optimizer, state.student, mesh)
  teacher = jax.tree.map(jnp.copy, state.student_ema)
  return state.replace(teacher=teacher, student_opt=opt_state)


def _prepare_workdir(workdir, config, setup, schedule, start_steps):
  d = config.distill
  info = {"kind": "student", "method": "sdtt", "data_info": setup.info,
          "student_steps": d.student_steps, "teacher_workdir": d.teacher_workdir,
          "start_steps": start_steps, "num_rounds": len(schedule)}
  workdir_guard.claim(workdir, "sdtt", config, info, (setup.train_tokens, setup.eval_tokens))


def init_sdtt_state(teacher, optimizer, mesh) -> SDTTState:
  """Student and its EMA start as copies of the teacher; the optimizer state is born sharded."""
  copy_tree = functools.partial(jax.tree.map, jnp.copy)
  return SDTTState(step=jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(mesh)),
                   student=copy_tree(teacher), student_ema=copy_tree(teacher), teacher=teacher,
                   student_opt=state_lib.init_opt_state(optimizer, teacher, mesh))


def compile_update(setup: setup_lib.Setup, optimizer, shardings):
  """The jitted SDTT update (state, batch, round teacher's steps) → (state, metrics)."""
  c = setup.config
  loss_fn = functools.partial(sdtt.sdtt_loss, apply_fn=setup.apply_fn, kernel=setup.kernel,
                              grid=c.sample.grid)
  update = functools.partial(sdtt_update, loss_fn=loss_fn, optimizer=optimizer,
                             ema_decay=c.distill.ema_decay, seed=c.seed)
  return jax.jit(sharding.on_mesh(update, setup.mesh),
                 in_shardings=(shardings, sharding.batch_sharding(setup.mesh), None),
                 out_shardings=(shardings, sharding.replicated(setup.mesh)), donate_argnums=0)


@workdir_guard.releases_locks
def distill_sdtt(config, workdir: str, start_steps: int = 0) -> dict:
  """Run (or resume) SDTT rounds from config.distill.teacher_workdir down to k steps.

  start_steps: the first round teacher's steps N (0: config.sample.steps). Every round trains
  config.distill.num_steps steps. Returns {"step", "rounds"}.
  """
  config = config_lib.typed(config)
  check_config(config)
  config = run_config(config)
  d = config.distill
  start_steps = start_steps or config.sample.steps
  schedule = round_schedule(start_steps, d.student_steps)
  setup = setup_lib.build_setup(config, d.batch_size)
  teacher = dmmd_run.load_teacher(setup, d.teacher_workdir)
  _prepare_workdir(workdir, config, setup, schedule, start_steps)
  optimizer = sdtt_optimizer(config)
  state = init_sdtt_state(teacher, optimizer, setup.mesh)
  shardings = state_lib.shardings_of(state)
  iterator = loop.data_iterator(setup, d.batch_size, config.seed)
  manager = checkpoints.checkpoint_manager(workdir, config.train.keep_checkpoints)
  state = loop.restore_or_init(manager, state, shardings, iterator, workdir)
  log = workdir_lib.MetricsLog(workdir, int(state.step))
  update = compile_update(setup, optimizer, shardings)

  def step_fn(state, batch, index):
    if index and index % d.num_steps == 0:
      state = start_round(state, optimizer, setup.mesh)
    state, metrics = update(state, batch, np.int32(schedule[index // d.num_steps]))
    return state, dict(metrics, round=index // d.num_steps)

  state = loop.run_loop(
      state=state, step_fn=step_fn, iterator=iterator, manager=manager, log=log,
      num_steps=d.num_steps * len(schedule), log_every=d.log_every,
      checkpoint_every=d.checkpoint_every, mesh=setup.mesh,
      tokens_per_step=d.batch_size * setup.seq_len, desc=f"sdtt {start_steps}→{d.student_steps}")
  log.close()
  manager.close()
  return {"step": int(state.step), "rounds": len(schedule)}
