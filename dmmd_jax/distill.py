"""D-MMD: Discrete Moment Matching Distillation (Algorithm 1), masked and uniform.

Three parameter pytrees over one denoiser: frozen teacher θ, student η, auxiliary φ (student and
auxiliary start as copies of the teacher's EMA parameters). Per step, for data x and k student
steps:

    s ~ U(0, 1), δ ~ U(0, 1/k), t = min(1, s + δ);  z_t ~ q(z_t | x)
    p = x̂_η(z_t, t, ε)  (ε: fresh Gaussian noise input);  x ~ Cat(p);  z_s ~ q(z_s | z_t, x)

Losses — one code path for both kernels. Let s' = max(0, s − h) (h = `posterior_gap`) and
P(x̂) = Σ_c x̂_c q(z_{s'} | z_s, e_c) be the reverse transition a denoiser output x̂ induces from
z_s (`kernels.posterior_log_probs`). P is linear in x̂, so

    L_gen(η) = (1/h) Σ_i Σ_j P(p)_ij · ( log P(x̂_φ)_ij − log P(x̂_θ)_ij )
    L_aux(φ) = (1/h) Σ_i [ KL(P(y)_i ‖ P(x̂_φ)_i) + KL(P(x̂_θ)_i ‖ P(x̂_φ)_i) ],  y = one_hot(x)
               (or y = stop_grad(p), `soft_targets`, masked only)

with teacher and auxiliary under stop_grad in L_gen and the student sample under stop_grad in
L_aux. Why this is the paper's method:
- Masked kernel: at a masked z_s, P(x̂) puts γ x̂_c on token c and 1 − γ on MASK, with
  γ = (α_{s'} − α_s)/(1 − α_s); unmasked positions have P = δ and contribute 0. So
  L_gen = (γ/h) Σ_{masked i} Σ_c p_ic (log x̂_φ − log x̂_θ)_ic, and γ/h = w(s) = −α'_s/(1 − α_s)
  exactly for the linear schedule (a finite difference of it for cosine): the paper's loss.
  Likewise L_aux = (γ/h) Σ −(y + x̂_θ)·log x̂_φ + const.
- Uniform kernel (the paper's Appendix-D idea, our derivation): the plug-in posterior is not
  linear in x, but P is, and the P(e_c) are linearly independent, so KL(P(E[x|z_s]) ‖ P(x̂)) is
  minimised only at x̂ = E[x | z_s]. The auxiliary's optimum is P(x̂_φ) = ½(P(E_student[x|z_s]) +
  P(x̂_θ)) and the student's gradient vanishes iff P(E_student[x | z_s]) = P(x̂_θ), i.e. iff
  the student's first moments match the teacher's. As h → 0 this becomes a rate-weighted
  log-ratio over the states j ≠ z_s (continuous time); h = 1e-3 by default.
- Soft-sample identity: both losses are linear in the sampled one-hot x, so E_{x~p} L(x) = L(p):
  the student gets a gradient through p without differentiating through sampling.

Losses are normalised per token (divided by the sequence length). The moment-matching estimator
draws `samples_per_z` (M) student samples per z_t (vmapped over the sample-set axis) and averages.
"""

import dataclasses
import functools
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dmmd_jax import blocks, config_lib, denoiser, kernels, sampling, sharding
from dmmd_jax import train as train_lib
from dmmd_jax import workdir as workdir_lib


class DistillError(ValueError):
  """A distillation run that cannot start as configured."""


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """Static options of the D-MMD losses (hashable for jit).

  `use_noise` (the student's Gaussian noise input) is on for masked students when
  distill.use_noise, and for uniform students only with distill.uniform_noise too: the paper gives
  uniform students no noise (z_1 is already random), but on the copy task such a student settles
  on a map z_1 → x that is symmetric in the two positions and so unbalanced (frequencies
  1/4 : 3/4); with the noise input it stays balanced (RESULTS.md §2).
  """

  student_steps: int
  samples_per_z: int = 1
  soft_targets: bool = False
  teacher_temperature: float = 1.0
  teacher_top_p: float = 1.0
  top_p_mode: str = "soft"
  top_p_delta: float = 2.0
  posterior_gap: float = 1e-3
  use_noise: bool = True
  context: bool = False  # block model (setup.is_block, set by compile_updates)

  @classmethod
  def from_config(cls, config):
    d = config.distill
    return cls(student_steps=d.student_steps, samples_per_z=d.samples_per_z,
               soft_targets=d.soft_targets, teacher_temperature=d.teacher_temperature,
               teacher_top_p=d.teacher_top_p, top_p_mode=d.top_p_mode,
               top_p_delta=d.top_p_delta, posterior_gap=d.posterior_gap,
               use_noise=(d.use_noise and config.model.noise_kind != "none"
                          and (config.kernel.kind == "masked" or d.get("uniform_noise", False))))


def sample_times(key, batch_size: int, student_steps: int):
  """s ~ U(0, 1), t = min(1, s + δ) with δ ~ U(0, 1/k): two `[batch]` arrays."""
  s_key, d_key = jax.random.split(key)
  s = jax.random.uniform(s_key, (batch_size,))
  delta = jax.random.uniform(d_key, (batch_size,), maxval=1.0 / student_steps)
  return s, jnp.minimum(1.0, s + delta)


def teacher_log_probs(logits, cfg: DistillConfig):
  """The (possibly mode-seeking) teacher: temperature and soft/hard top-p on its logits."""
  adjusted = sampling.adjust_logits(logits, cfg.teacher_temperature, cfg.teacher_top_p,
                                    cfg.top_p_mode, cfg.top_p_delta)
  return jax.nn.log_softmax(adjusted, axis=-1)


def reverse_log_probs(kernel, z_s, log_x, s, gap: float):
  """log P(x̂) = log Σ_c x̂_c q(z_{s'} | z_s, e_c), s' = max(0, s − gap): `[batch, length, V_in]`."""
  s_prev = jnp.maximum(s - gap, 0.0)
  return kernels.posterior_log_probs(kernel, z_s, log_x, s_prev[:, None], s[:, None])


def _kl(log_p, log_q):
  """KL(P ‖ Q) over the last axis."""
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def _rate(s, gap: float):
  """1 / (s − s') per sequence `[batch, 1]` (finite at s = 0, where every KL term is 0)."""
  return (1.0 / jnp.maximum(s - jnp.maximum(s - gap, 0.0), 1e-6))[:, None]


def student_draw(key, student_params, x, *, apply_fn, kernel, cfg: DistillConfig, noise_fn):
  """Algorithm 1's sampling half for one set of student samples.

  Returns dict with s, t `[batch]`, z_t, x_student, z_s `[batch, length]` and the student's
  log p `[batch, length, K]` (differentiable w.r.t. student_params).
  """
  time_key, zt_key, noise_key, x_key, zs_key = jax.random.split(key, 5)
  s, t = sample_times(time_key, x.shape[0], cfg.student_steps)
  z_t = kernels.sample_marginal(zt_key, kernel, x, t)
  noise = noise_fn(noise_key, x.shape[0]) if (cfg.use_noise and noise_fn) else None
  log_p = jax.nn.log_softmax(apply_fn(student_params, z_t, t, noise), axis=-1)
  x_student = sampling.categorical(x_key, jax.lax.stop_gradient(log_p), float64=False)
  log_x = kernels.log_one_hot(x_student, kernel.vocab_size)
  z_s = sampling.categorical(
      zs_key, kernels.posterior_log_probs(kernel, z_t, log_x, s[:, None], t[:, None]), False)
  return dict(s=s, t=t, z_t=z_t, x_student=x_student, z_s=z_s, log_p=log_p)


def moment_losses(draw, log_teacher, log_aux, *, kernel, cfg: DistillConfig):
  """Generator and auxiliary losses (per token) plus diagnostics for one draw.

  log_teacher, log_aux: `[batch, length, K]` log x̂_θ(z_s), log x̂_φ(z_s). Gradients flow into
  the student through draw["log_p"] in `gen_loss` and into the auxiliary through log_aux in
  `aux_loss`; everything else is held fixed.
  """
  s, z_s, gap = draw["s"], draw["z_s"], cfg.posterior_gap
  rev = functools.partial(reverse_log_probs, kernel, z_s, s=s, gap=gap)
  rate = _rate(s, gap)
  log_teacher = jax.lax.stop_gradient(log_teacher)
  p_student = jnp.exp(rev(draw["log_p"]))
  rev_teacher, rev_aux = rev(log_teacher), rev(log_aux)
  log_ratio = jax.lax.stop_gradient(rev_aux - rev_teacher)
  gen = rate * jnp.sum(p_student * log_ratio, axis=-1)

  if cfg.soft_targets:
    target = jax.lax.stop_gradient(draw["log_p"])
  else:
    target = kernels.log_one_hot(draw["x_student"], kernel.vocab_size)
  aux = rate * (_kl(rev(target), rev_aux) + _kl(rev_teacher, rev_aux))

  length = z_s.shape[1]
  counted = (z_s == kernel.mask_id) if kernel.is_masked else jnp.ones_like(z_s, bool)
  p = jnp.exp(jax.lax.stop_gradient(draw["log_p"]))
  entropy = -jnp.sum(p * jax.lax.stop_gradient(draw["log_p"]), axis=-1)
  teacher_p = jnp.exp(log_teacher)
  ratio_norm = jnp.sqrt(jnp.sum(teacher_p * (log_teacher - log_aux) ** 2, axis=-1))
  n = jnp.maximum(jnp.sum(counted), 1)
  return dict(
      gen_loss=jnp.mean(jnp.sum(gen, -1)) / length,
      aux_loss=jnp.mean(jnp.sum(aux, -1)) / length,
      student_entropy=jnp.sum(jnp.where(counted, entropy, 0.0)) / n,
      log_ratio_norm=jax.lax.stop_gradient(jnp.sum(jnp.where(counted, ratio_norm, 0.0)) / n),
  )


def moment_matching_estimator(student_params, aux_params, teacher_params, x, key, *, apply_fn,
                              kernel, cfg: DistillConfig, noise_fn=None):
  """The D-MMD estimator: M = cfg.samples_per_z student sample sets per z_t, vmapped.

  x: int `[batch, length]` data. Returns the losses and diagnostics averaged over the M sets.
  Pure: differentiate w.r.t. student_params for `gen_loss`, aux_params for `aux_loss`.
  Block models (cfg.context): all three networks read the same clean context, the data x, so
  Algorithm 1 runs for every block of the batch at once (`blocks.py`).
  """
  if cfg.context:
    apply_fn = blocks.with_context(apply_fn, x)

  def one_set(set_key):
    draw = student_draw(set_key, student_params, x, apply_fn=apply_fn, kernel=kernel, cfg=cfg,
                        noise_fn=noise_fn)
    teacher_logits = apply_fn(teacher_params, draw["z_s"], draw["s"])
    log_teacher = teacher_log_probs(teacher_logits, cfg)
    log_aux = jax.nn.log_softmax(apply_fn(aux_params, draw["z_s"], draw["s"]), axis=-1)
    return moment_losses(draw, log_teacher, log_aux, kernel=kernel, cfg=cfg)

  # All M sets share z_t's data x but draw their own times, z_t, noise and student samples.
  per_set = jax.vmap(one_set)(jax.random.split(key, cfg.samples_per_z))
  return jax.tree.map(jnp.mean, per_set)


@flax.struct.dataclass
class DistillState:
  step: jax.Array
  student: dict
  student_ema: dict
  aux: dict
  student_opt: optax.OptState
  aux_opt: optax.OptState


def _update(loss_name, which, state, teacher, x, *, estimator, optimizer, ema_decay, seed):
  """One optimizer step of `which` ∈ {student, aux} on `loss_name`; returns (state, metrics)."""
  key = jax.random.fold_in(jax.random.key(seed), state.step)

  def loss_fn(params):
    student = params if which == "student" else state.student
    aux = params if which == "aux" else state.aux
    metrics = estimator(student, aux, teacher, x, key)
    return metrics[loss_name], metrics

  params, opt_state = (state.student, state.student_opt) if which == "student" else (
      state.aux, state.aux_opt)
  grads, metrics = jax.grad(loss_fn, has_aux=True)(params)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  if which == "student":
    state = state.replace(student=params, student_opt=opt_state,
                          student_ema=train_lib.ema_update(state.student_ema, params, ema_decay))
  else:
    state = state.replace(aux=params, aux_opt=opt_state)
  metrics = dict(metrics, **{f"{which}_grad_norm": optax.global_norm(grads)})
  return state.replace(step=state.step + 1), metrics


def is_student_turn(step: int, aux_updates_per_student: int) -> bool:
  """Update number `step` (0-based) updates the student every (r + 1)-th time, after r aux."""
  return step % (aux_updates_per_student + 1) == aux_updates_per_student


# ---------------------------------------------------------------------------------------------
# Training run (what experiments/distill.py calls).


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
  mismatch = workdir_lib.architecture_mismatch(stored, workdir_lib.config_to_dict(setup.config),
                                               ignore=workdir_lib.STUDENT_FREE_KEYS)
  if mismatch:
    raise DistillError(f"teacher at {teacher_workdir} does not match this config ({mismatch}).")
  info = workdir_lib.load_run_info(teacher_workdir)["data_info"]
  if (info.vocab_size, info.seq_len) != (setup.info.vocab_size, setup.info.seq_len):
    raise DistillError(f"teacher vocabulary/length {info.vocab_size}/{info.seq_len} differ from "
                       f"the data's {setup.info.vocab_size}/{setup.info.seq_len}.")
  params = workdir_lib.load_params(teacher_workdir, "ema_params")
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


def student_noise_fn(setup, cfg: DistillConfig):
  if not cfg.use_noise or setup.model_cfg.noise_kind == "none":
    return None
  return functools.partial(_noise, model_cfg=setup.model_cfg)


def _noise(key, batch_size, *, model_cfg):
  return denoiser.sample_noise(key, model_cfg, batch_size)


def init_distill_state(teacher, student_opt, aux_opt, mesh, key, noise_init_scale: float):
  """Student, its EMA and the auxiliary start as copies of the teacher (never its optimizer).

  The student's noise projection gets N(0, noise_init_scale² / noise_dim) weights, so the
  injected noise has per-feature std noise_init_scale (0 gives the paper's exact copy). Why not
  0 by default: with a zero projection the expected gradient on it is zero too (the student's
  samples do not depend on ε yet), and the D-MMD loss is unstable towards ε-independent mode
  collapse, so on the copy task the student collapses to one token before it learns to use its
  noise (tests/test_distill.py, RESULTS.md). The default 1.0 suits real data (digits: better
  than 0 and 3 at equal budget); the two-token copy task needs 3.0.
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
                      student_opt=train_lib.init_opt_state(student_opt, student, mesh),
                      aux_opt=train_lib.init_opt_state(aux_opt, teacher, mesh))


def distill_optimizers(config):
  """(student, auxiliary) optimizers; the student's noise projection may learn faster."""
  d = config.distill
  make = functools.partial(train_lib.make_optimizer, warmup_steps=d.warmup_steps,
                           total_steps=d.num_steps, grad_clip=d.grad_clip)
  student = make(d.learning_rate)
  if d.noise_lr_multiplier != 1.0:
    student = optax.multi_transform(
        {"default": student, "noise": make(d.learning_rate * d.noise_lr_multiplier)},
        lambda params: {k: ("noise" if k == "noise_proj" else "default") for k in params})
  return student, make(d.aux_learning_rate)


def compile_updates(setup, cfg: DistillConfig, student_opt, aux_opt, shardings, teacher_shardings):
  """The two jitted updates (student, auxiliary), sharded over the batch."""
  c = setup.config
  cfg = dataclasses.replace(cfg, context=setup.is_block)
  estimator = functools.partial(moment_matching_estimator, apply_fn=setup.apply_fn,
                                kernel=setup.kernel, cfg=cfg,
                                noise_fn=student_noise_fn(setup, cfg))
  common = dict(estimator=estimator, ema_decay=c.distill.ema_decay, seed=c.seed)
  batch = sharding.batch_sharding(setup.mesh)
  out = (shardings, sharding.replicated(setup.mesh))

  def jit(fn):
    return jax.jit(fn, in_shardings=(shardings, teacher_shardings, batch), out_shardings=out,
                   donate_argnums=0)

  student_update = jit(functools.partial(_update, "gen_loss", "student", optimizer=student_opt,
                                         **common))
  aux_update = jit(functools.partial(_update, "aux_loss", "aux", optimizer=aux_opt, **common))
  return student_update, aux_update


def sample_student(setup, params, cfg: DistillConfig, num_samples: int, key, **sampler_overrides):
  """`[num_samples, length]` tokens from a student: k steps, fresh noise each step."""
  sampler_cfg = config_lib.sampler_config(setup.config, cfg.student_steps, **sampler_overrides)
  return blocks.sample_model(key, setup.apply_fn, params, setup.kernel, sampler_cfg,
                            setup.model_cfg, num_samples, setup.seq_len,
                            student_noise_fn(setup, cfg))


def distill(config, workdir: str) -> dict:
  """Distil (or resume distilling) a student from config.distill.teacher_workdir."""
  d = config.distill
  setup = train_lib.build_setup(config, d.batch_size)
  cfg = DistillConfig.from_config(config)
  teacher = load_teacher(setup, d.teacher_workdir)
  workdir_lib.prepare(workdir, config, {"kind": "student", "data_info": setup.info,
                                        "student_steps": d.student_steps,
                                        "teacher_workdir": d.teacher_workdir})
  student_opt, aux_opt = distill_optimizers(config)
  state = init_distill_state(teacher, student_opt, aux_opt, setup.mesh,
                             jax.random.key(config.seed + 1), d.noise_init_scale)
  shardings = train_lib.shardings_of(state)
  iterator = train_lib.data_iterator(setup, d.batch_size, config.seed)
  manager = workdir_lib.checkpoint_manager(workdir, config.train.keep_checkpoints)
  state = train_lib.restore_or_init(manager, state, shardings, iterator)
  log = workdir_lib.MetricsLog(workdir, int(state.step))

  with sharding.rules_context(setup.mesh):
    student_update, aux_update = compile_updates(setup, cfg, student_opt, aux_opt, shardings,
                                                 train_lib.shardings_of(teacher))
    counter = [int(state.step)]

    def step_fn(state, batch):
      turn = is_student_turn(counter[0], d.aux_updates_per_student)
      counter[0] += 1
      return (student_update if turn else aux_update)(state, teacher, batch)

    def evaluate(state, step):
      return evaluate_student(setup, state.student_ema, cfg, d.eval_samples, step)

    state = train_lib.run_loop(
        state=state, step_fn=step_fn, iterator=iterator, manager=manager, log=log,
        num_steps=d.num_steps, log_every=d.log_every, checkpoint_every=d.checkpoint_every,
        mesh=setup.mesh, tokens_per_step=d.batch_size * setup.seq_len,
        periodic=((d.eval_every, evaluate),), desc=f"distill k={d.student_steps}")
  log.close()
  manager.close()
  return {"step": int(state.step)}


def evaluate_student(setup, params, cfg: DistillConfig, num_samples: int, step: int) -> dict:
  """Kernel MMD² between student samples and held-out data (logged during distillation)."""
  from dmmd_jax import metrics  # noqa: PLC0415

  tokens = sample_student(setup, params, cfg, num_samples, jax.random.key(step))
  held_out = setup.eval_tokens[:num_samples]
  return {"mmd2_to_data": float(metrics.mmd2(np.asarray(tokens), held_out))}
