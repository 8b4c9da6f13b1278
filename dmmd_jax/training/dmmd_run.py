"""D-MMD student training: state, alternating student/auxiliary updates, `distill`, a whole run.

The estimator and its losses are in `distill/dmmd.py`; this module owns the three parameter
pytrees' training: the student and the auxiliary start as copies of the teacher's EMA parameters,
updates alternate (`aux_updates_per_student` auxiliary updates, then one student update; whose
turn it is follows from the update's index, which equals `state.step`) or, with
distill.joint_updates, every update trains both from one draw (one student and teacher forward
instead of two), and the student's EMA is what `experiments/sample.py` samples.
"""

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dmmd_jax import config_lib
from dmmd_jax.distill import diagnostics, dmmd
from dmmd_jax.evaluation import metrics as metrics_lib
from dmmd_jax.infra import checkpoints, sharding, workdir_guard
from dmmd_jax.infra import workdir as workdir_lib
from dmmd_jax.models import blocks, denoiser
from dmmd_jax.training import loop
from dmmd_jax.training import setup as setup_lib
from dmmd_jax.training import state as state_lib


class DistillError(ValueError):
  """A distillation run that cannot start as configured."""


@flax.struct.dataclass
class DistillState:
  step: jax.Array
  student: dict
  student_ema: dict
  aux: dict
  student_opt: optax.OptState
  aux_opt: optax.OptState


LOSSES = {"student": "gen_loss", "aux": "aux_loss"}


def _update(which, state, teacher, x, *, estimator, optimizers, ema_decay, seed):
  """One optimizer step of each network in `which` (("student",), ("aux",) or both) from one
  estimator draw; returns (state, metrics).

  Both at once (distill.joint_updates): the generator loss reaches only the student (the
  log-ratio is under stop_grad) and the auxiliary loss only the auxiliary (the student's sample
  is), so the gradient of their sum is each network's own gradient, exactly as two separate
  updates from this state and key would compute it (tests/training/test_dmmd_run.py).
  """
  key = jax.random.fold_in(jax.random.key(seed), state.step)

  def loss_fn(params):
    nets = {"student": state.student, "aux": state.aux, **params}
    metrics = estimator(nets["student"], nets["aux"], teacher, x, key)
    return sum(metrics[LOSSES[w]] for w in which), metrics

  params = {w: getattr(state, w) for w in which}
  grads, metrics = jax.grad(loss_fn, has_aux=True)(params)
  for w in which:
    updates, opt_state = optimizers[w].update(grads[w], getattr(state, f"{w}_opt"), params[w])
    new = optax.apply_updates(params[w], updates)
    state = state.replace(**{w: new, f"{w}_opt": opt_state})
    if w == "student":
      state = state.replace(student_ema=state_lib.ema_update(state.student_ema, new, ema_decay))
    metrics = dict(metrics, **{f"{w}_grad_norm": optax.global_norm(grads[w])})
  return state.replace(step=state.step + 1), metrics


def is_student_turn(step: int, aux_updates_per_student: int) -> bool:
  """Update number `step` (0-based, = state.step) updates the student every (r + 1)-th time."""
  return step % (aux_updates_per_student + 1) == aux_updates_per_student


def load_teacher(setup, teacher_workdir: str):
  """Teacher EMA parameters on the mesh, after checking the teacher matches the config."""
  if not teacher_workdir:
    raise DistillError("config.distill.teacher_workdir is empty; pass "
                       "--config.distill.teacher_workdir=TEACHER_DIR.")
  config_path = os.path.join(teacher_workdir, "config.json")
  if not os.path.exists(config_path):
    raise DistillError(f"teacher workdir {teacher_workdir} has no config.json; train a teacher "
                       "there first (experiments/train_teacher.py).")
  stored = workdir_lib.read_json(config_path)
  mismatch = workdir_lib.architecture_mismatch(
      stored, config_lib.to_dict(setup.config),
      ignore=workdir_lib.STUDENT_FREE_KEYS + workdir_guard.moved_data_keys(teacher_workdir, setup))
  if mismatch:
    raise DistillError(f"teacher at {teacher_workdir} does not match this config ({mismatch}).")
  info = workdir_lib.load_run_info(teacher_workdir)["data_info"]
  if (info.vocab_size, info.seq_len) != (setup.info.vocab_size, setup.info.seq_len):
    raise DistillError(f"teacher vocabulary/length {info.vocab_size}/{info.seq_len} differ from "
                       f"the data's {setup.info.vocab_size}/{setup.info.seq_len}.")
  params = checkpoints.load_params(teacher_workdir, "ema_params")
  return place_params(params, setup, fresh_noise_projection=True)


def place_params(params, setup, fresh_noise_projection: bool = False):
  """Check host params against the model's shapes and put them on the mesh with its shardings.

  fresh_noise_projection: replace the (unused, teacher-side) noise projection by zeros of this
  model's noise size, so a student may choose its own noise input.
  """
  boxed = jax.eval_shape(functools.partial(denoiser.init_params, cfg=setup.model_cfg),
                         jax.random.key(0))
  shardings = sharding.logical_shardings(boxed, setup.mesh)
  expected = jax.tree.map(lambda x: x.shape, flax.linen.unbox(boxed))
  params = dict(params)
  if fresh_noise_projection:
    params.pop("noise_proj", None)
    if "noise_proj" in expected:
      params["noise_proj"] = jax.tree.map(lambda shape: np.zeros(shape, np.float32),
                                          expected["noise_proj"], is_leaf=_is_shape)
  got = jax.tree.map(lambda x: tuple(np.shape(x)), params)
  if jax.tree.structure(expected, is_leaf=_is_shape) != jax.tree.structure(
      got, is_leaf=_is_shape) or expected != got:
    raise DistillError("checkpoint parameters do not match the model config (different layers, "
                       "width or vocabulary).")
  return jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s), params, shardings)


def _is_shape(x):
  return isinstance(x, tuple)


def student_noise_fn(setup, cfg: dmmd.EstimatorConfig):
  if not cfg.use_noise or setup.model_cfg.noise_kind == "none":
    return None
  return functools.partial(_noise, model_cfg=setup.model_cfg)


def _noise(key, batch_size, *, model_cfg):
  return denoiser.sample_noise(key, model_cfg, batch_size)


def load_warm_start(setup, init_workdir: str, teacher_workdir: str) -> dict:
  """{student, student_ema, aux} of the D-MMD student run in init_workdir, on the mesh.

  The run must be a student of the same teacher (a curriculum over k: a k = 4 student starts the
  k = 16 one); its optimizer states are not taken.
  """
  if not os.path.isdir(init_workdir):
    raise DistillError(f"distill.init_workdir {init_workdir} does not exist.")
  info = workdir_lib.load_run_info(init_workdir)
  if info.get("kind") != "student":
    raise DistillError(f"distill.init_workdir {init_workdir} is a {info.get('kind')} run, not a "
                       "D-MMD student.")
  if not workdir_guard.same_teacher(info, teacher_workdir):
    raise DistillError(f"distill.init_workdir {init_workdir} distils {info.get('teacher_workdir')}"
                       f", not this run's teacher {teacher_workdir}.")
  trees = checkpoints.load_param_trees(init_workdir, ("student", "student_ema", "aux"))
  return {name: place_params(params, setup) for name, params in trees.items()}


def init_distill_state(teacher, student_opt, aux_opt, mesh, key, noise_init_scale: float):
  """Student, its EMA and the auxiliary start as copies of the teacher (never its optimizer).

  The student's noise projection gets N(0, noise_init_scale² / noise_dim) weights, so the
  injected noise has per-feature std noise_init_scale (0 gives the paper's exact copy). Why not
  0 by default: with a zero projection the expected gradient on it is zero too (the student's
  samples do not depend on ε yet), and the D-MMD loss is unstable towards ε-independent mode
  collapse, so on the copy task the student collapses to one token before it learns to use its
  noise (tests/training/test_copy_task.py; measurements and the choice of default: RESULTS.md
  §2–§3).
  """
  copy = functools.partial(jax.tree.map, jnp.copy)
  student = copy(teacher)
  if "noise_proj" in student and noise_init_scale:
    kernel = student["noise_proj"]["kernel"]
    scale = noise_init_scale / np.sqrt(kernel.shape[0])
    student["noise_proj"] = dict(student["noise_proj"], kernel=jax.device_put(
        scale * jax.random.normal(key, kernel.shape, kernel.dtype), kernel.sharding))
  step = jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(mesh))
  return DistillState(step=step, student=student, student_ema=copy(student), aux=copy(teacher),
                      student_opt=state_lib.init_opt_state(student_opt, student, mesh),
                      aux_opt=state_lib.init_opt_state(aux_opt, teacher, mesh))


def update_counts(num_steps: int, aux_updates_per_student: int,
                  joint: bool = False) -> tuple[int, int]:
  """(student, auxiliary) updates among the first num_steps (see `is_student_turn`; joint
  updates train both networks every time)."""
  if joint:
    return num_steps, num_steps
  student = num_steps // (aux_updates_per_student + 1)
  return student, num_steps - student


def distill_optimizers(config: config_lib.ExperimentConfig):
  """(student, auxiliary) optimizers; the student's noise projection may learn faster.

  Each optimizer's schedule counts its own updates, so warm-up and decay are sized to the share
  of distill.num_steps that network really gets (`update_counts`), and both end their cosine
  decay when the run ends.
  """
  d = config.distill
  counts = update_counts(d.num_steps, d.aux_updates_per_student, d.joint_updates)
  student_steps, aux_steps = (max(n, 1) for n in counts)

  def make(learning_rate, total):
    warmup = round(d.warmup_steps * total / d.num_steps)
    return state_lib.make_optimizer(learning_rate, warmup_steps=warmup, total_steps=total,
                                    grad_clip=d.grad_clip)

  student = make(d.learning_rate, student_steps)
  if d.noise_lr_multiplier != 1.0:
    student = optax.multi_transform(
        {"default": student,
         "noise": make(d.learning_rate * d.noise_lr_multiplier, student_steps)},
        lambda params: {k: ("noise" if k == "noise_proj" else "default") for k in params})
  return student, make(d.aux_learning_rate, aux_steps)


def score_apply_fn(setup):
  """The teacher's and auxiliary's forward in the D-MMD step: the model's, computed in
  distill.score_dtype (default float32: with bfloat16 logits the rounding noise of the log-ratio
  exceeds its signal)."""
  model_cfg = dataclasses.replace(setup.model_cfg, dtype=setup.config.distill.score_dtype)
  return functools.partial(blocks.apply if setup.is_block else denoiser.apply, cfg=model_cfg)


class Updates(NamedTuple):
  """Jitted D-MMD updates, each (state, teacher, batch) → (state, metrics)."""

  student: Callable
  aux: Callable
  joint: Callable


def compile_updates(setup, cfg: dmmd.EstimatorConfig, student_opt, aux_opt, shardings,
                    teacher_shardings):
  """The jitted `Updates` (student, aux, joint: both from one draw), sharded over the batch: the
  three networks' activations are pinned to the batch split (`sharding.on_mesh`) like the
  teacher step's. Each compiles on its first call."""
  c = setup.config
  cfg = dataclasses.replace(cfg, context=setup.is_block)
  estimator = functools.partial(dmmd.moment_matching_estimator, apply_fn=setup.apply_fn,
                                kernel=setup.kernel, cfg=cfg,
                                noise_fn=student_noise_fn(setup, cfg),
                                score_apply_fn=score_apply_fn(setup))
  common = dict(estimator=estimator, optimizers={"student": student_opt, "aux": aux_opt},
                ema_decay=c.distill.ema_decay, seed=c.seed)
  batch = sharding.batch_sharding(setup.mesh)
  out = (shardings, sharding.replicated(setup.mesh))

  def jit(fn):
    return jax.jit(sharding.on_mesh(fn, setup.mesh),
                   in_shardings=(shardings, teacher_shardings, batch), out_shardings=out,
                   donate_argnums=0)

  return Updates(*(jit(functools.partial(_update, which, **common))
                   for which in (("student",), ("aux",), ("student", "aux"))))


def sample_student(setup, params, cfg: dmmd.EstimatorConfig, num_samples: int, key,
                   **sampler_overrides):
  """`[num_samples, length]` tokens from a student: k steps, fresh noise each step."""
  sampler_cfg = setup_lib.sampler_config_of(setup.config, cfg.student_steps, **sampler_overrides)
  return blocks.sample_model(key, setup.apply_fn, params, setup.kernel, sampler_cfg,
                            setup.model_cfg, num_samples, setup.seq_len,
                            student_noise_fn(setup, cfg))


@workdir_guard.releases_locks
def distill_student(config, workdir: str) -> dict:
  """Distil (or resume distilling) a student from config.distill.teacher_workdir.

  config: an `ExperimentConfig` (or the ConfigDict of a config file, converted here).
  """
  config = config_lib.typed(config)
  d = config.distill
  setup = setup_lib.build_setup(config, d.batch_size)
  cfg = dataclasses.replace(setup_lib.estimator_config_of(config), context=setup.is_block)
  teacher = load_teacher(setup, d.teacher_workdir)
  fresh = d.init_workdir and not checkpoints.has_checkpoint(workdir)  # a resume needs no init
  warm = load_warm_start(setup, d.init_workdir, d.teacher_workdir) if fresh else {}
  workdir_guard.claim(workdir, "student", config, {"kind": "student", "data_info": setup.info,
                                                    "student_steps": d.student_steps,
                                                    "teacher_workdir": d.teacher_workdir},
                      (setup.train_tokens, setup.eval_tokens))
  student_opt, aux_opt = distill_optimizers(config)
  state = init_distill_state(teacher, student_opt, aux_opt, setup.mesh,
                             jax.random.key(config.seed + 1), d.noise_init_scale).replace(**warm)
  shardings = state_lib.shardings_of(state)
  iterator = loop.data_iterator(setup, d.batch_size, config.seed)
  manager = checkpoints.checkpoint_manager(workdir, config.train.keep_checkpoints)
  state = loop.restore_or_init(manager, state, shardings, iterator, workdir)
  log = workdir_lib.MetricsLog(workdir, int(state.step))

  updates = compile_updates(setup, cfg, student_opt, aux_opt, shardings,
                            state_lib.shardings_of(teacher))

  def step_fn(state, batch, index):
    update = (updates.joint if d.joint_updates else updates.student
              if is_student_turn(index, d.aux_updates_per_student) else updates.aux)
    return update(state, teacher, batch)

  diagnose = jax.jit(functools.partial(
      diagnostics.diagnose_student, apply_fn=setup.apply_fn,
      score_apply_fn=score_apply_fn(setup), kernel=setup.kernel, cfg=cfg,
      noise_fn=student_noise_fn(setup, cfg), num_buckets=d.diagnostic_buckets))
  held_out = jnp.asarray(setup.eval_tokens[:max(d.eval_samples, d.diagnostic_buckets)])

  def evaluate(state, step):
    metrics = evaluate_student(setup, state.student_ema, cfg, d.eval_samples, step)
    per_bucket = jax.device_get(diagnose(state.student, state.aux, teacher, held_out,
                                         jax.random.key(step)))
    for name, values in per_bucket.items():
      metrics.update({f"{name}/b{b}": float(v) for b, v in enumerate(values)})
    return metrics

  state = loop.run_loop(
      state=state, step_fn=step_fn, iterator=iterator, manager=manager, log=log,
      num_steps=d.num_steps, log_every=d.log_every, checkpoint_every=d.checkpoint_every,
      mesh=setup.mesh, tokens_per_step=d.batch_size * setup.seq_len,
      periodic=((d.eval_every, evaluate),), desc=f"distill k={d.student_steps}")
  log.close()
  manager.close()
  return {"step": int(state.step)}


def evaluate_student(setup, params, cfg: dmmd.EstimatorConfig, num_samples: int,
                     step: int) -> dict:
  """Kernel MMD² between student samples and held-out data (logged during distillation)."""
  tokens = sample_student(setup, params, cfg, num_samples, jax.random.key(step))
  held_out = setup.eval_tokens[:num_samples]
  return {"mmd2_to_data": float(metrics_lib.mmd2(np.asarray(tokens), held_out))}
