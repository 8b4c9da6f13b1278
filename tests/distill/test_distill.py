"""Tests for `dmmd_jax.distill`: the D-MMD claims of docs/dmmd-method.md §4, then the training run.

Part 1 checks the losses on problems small enough to enumerate: K = 3 tokens, length L = 2, one
z_t, every student sample x and every z_s ~ q(z_s | z_t, x) weighted by its exact probability (no
Monte Carlo unless the claim is about Monte Carlo). The forward posterior used for the enumeration
is an independent numpy transcription of the formula in the method doc, and everything runs in
float64 so that "zero" means zero.

Part 2 runs the real path (train_teacher → distill_student → trained_model.load(...).sample) on the
"beyond single tokens" copy task: a fair coin copied to the second position. A 1-step teacher
samples the two positions independently (agreement 1/2); a 1-step D-MMD student must learn the
correlation. These runs take minutes and are marked slow; they print what they measure
(`pytest -s`).

Part 3 covers resume exactness and the errors of a distillation run.
"""

import functools
import itertools
import math
import os
import shutil

import _helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import jax_compilation_cache  # noqa: F401

from dmmd_jax import config_lib
from dmmd_jax.diffusion import forward_process
from dmmd_jax.distill import dmmd
from dmmd_jax.infra import checkpoints
from dmmd_jax.infra import workdir as workdir_lib
from dmmd_jax.training import dmmd_run, loop, teacher_run, trained_model

K = 3  # data tokens
L = 2  # sequence length
S, T = 0.3, 0.7  # the student's z_t time and the re-noised time s < t
GAP = 1e-3


# ------------------------------------------------------------------------------------------------
# Independent numpy model of the forward process and exact enumeration of Algorithm 1's draws.


def np_alpha(t, schedule="linear"):
  return 1.0 - t if schedule == "linear" else math.cos(0.5 * math.pi * t)


def np_posterior(kernel, z_t: int, x: int, s: float, t: float) -> np.ndarray:
  """q(z_s | z_t, x) for one position, over the input vocabulary (method doc §2)."""
  v = kernel.input_vocab_size
  a_s, a_t = np_alpha(s, kernel.schedule), np_alpha(t, kernel.schedule)
  out = np.zeros(v)
  if kernel.is_masked:
    if z_t != kernel.mask_id:
      out[z_t] = 1.0
      return out
    gamma = (a_s - a_t) / (1.0 - a_t)
    out[x], out[kernel.mask_id] = gamma, 1.0 - gamma
    return out
  a_ts = a_t / a_s
  for j in range(K):
    out[j] = (a_ts * (j == z_t) + (1 - a_ts) / K) * (a_s * (j == x) + (1 - a_s) / K)
  return out / out.sum()


def all_states(num_ids: int) -> np.ndarray:
  return np.array(list(itertools.product(range(num_ids), repeat=L)), np.int32)


def state_index(z, num_ids: int):
  return z[..., 0] * num_ids + z[..., 1]


def softmax_np(logits):
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def enumerate_draws(kernel, z_t, student_logits, weights, s=S, t=T):
  """Every (component c, sample x, z_s) of a mixture student, with its probability.

  student_logits `[C, L, K]`: component c's factorised output at z_t (C > 1 stands for the
  student's noise input taking C values with probabilities `weights`).
  """
  probs = softmax_np(np.asarray(student_logits, np.float64))
  v = kernel.input_vocab_size
  rows = []
  for c, weight in enumerate(weights):
    for x in itertools.product(range(K), repeat=L):
      p_x = weight * np.prod([probs[c, i, x[i]] for i in range(L)])
      per_pos = [np_posterior(kernel, int(z_t[i]), x[i], s, t) for i in range(L)]
      for z in itertools.product(range(v), repeat=L):
        q = np.prod([per_pos[i][z[i]] for i in range(L)])
        if p_x * q > 0:
          rows.append((c, x, z, p_x * q))
  comp, xs, zs, prob = zip(*rows, strict=True)
  return dict(comp=np.array(comp), x=np.array(xs, np.int32), z_s=np.array(zs, np.int32),
              prob=np.array(prob))


def student_moments(kernel, draws) -> np.ndarray:
  """E_student[x_i | z_s] for every z_s state `[V_in**L, L, K]` (uniform for impossible z_s)."""
  v = kernel.input_vocab_size
  num = np.zeros((v**L, L, K))
  den = np.zeros(v**L)
  for x, z, p in zip(draws["x"], draws["z_s"], draws["prob"], strict=True):
    num[state_index(z, v)] += p * np.eye(K)[x]
    den[state_index(z, v)] += p
  out = np.full_like(num, 1.0 / K)
  seen = den > 0
  out[seen] = num[seen] / den[seen, None, None]
  return out


def copy_teacher(kernel, s=S) -> np.ndarray:
  """The exact denoiser x̂_θ(z_s) of copy data (x_1 = x_2 uniform over K), `[V_in**L, L, K]`."""
  v = kernel.input_vocab_size
  out = np.zeros((v**L, L, K))
  for z in all_states(v):
    post = np.zeros(K)  # over the shared value c
    for c in range(K):
      post[c] = np.prod([np_posterior_marginal(kernel, int(z[i]), c, s) for i in range(L)])
    out[state_index(z, v)] = post / post.sum() if post.sum() > 0 else 1.0 / K  # impossible z_s
  return out


def np_posterior_marginal(kernel, z: int, x: int, s: float) -> float:
  """q(z_s = z | x) = α_s δ + (1 − α_s) π."""
  a = np_alpha(s, kernel.schedule)
  prior = (z == kernel.mask_id) if kernel.is_masked else 1.0 / K
  return a * (z == x) + (1.0 - a) * prior


def safe_log_np(p):
  return np.where(p > 0, np.log(np.maximum(p, 1e-300)), forward_process.NEG_INF)


def dcfg(**kw):
  return dmmd.EstimatorConfig(student_steps=1, posterior_gap=GAP, **kw)


moment_losses = jax.jit(dmmd.moment_losses, static_argnames=("kernel", "cfg"))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _per_row_losses(kernel, cfg, x, z_s, log_p_rows, log_teacher_rows, log_aux_rows, s):
  def one(log_p, x, z, lt, la):
    draw = dict(s=jnp.full((1,), s), z_s=z[None], log_p=log_p[None], x_student=x[None])
    return dmmd.moment_losses(draw, lt[None], la[None], kernel=kernel, cfg=cfg)

  return jax.vmap(one)(log_p_rows, x, z_s, log_teacher_rows, log_aux_rows)


def per_row_losses(kernel, cfg, draws, log_p_rows, log_teacher_rows, log_aux_rows, s=S):
  """`moment_losses` of every enumerated draw as its own batch of one (vmapped) → dict of `[B]`."""
  return _per_row_losses(kernel, cfg, jnp.asarray(draws["x"]), jnp.asarray(draws["z_s"]),
                         log_p_rows, log_teacher_rows, log_aux_rows, s)


KERNELS = [forward_process.ForwardProcess("masked", K),
           forward_process.ForwardProcess("uniform", K)]
KERNEL_IDS = ["masked", "uniform"]


def z_t_for(kernel):
  return np.array([kernel.mask_id] * L if kernel.is_masked else [0, 2], np.int32)


# ------------------------------------------------------------------------------------------------
# Part 1: the claims, enumerated.


def _factorised_student(kernel):
  rng = np.random.default_rng(0)
  return rng.normal(size=(1, L, K)), np.ones(1)


def _moment_setup(kernel, student, teacher_kind):
  logits, weights = student
  draws = enumerate_draws(kernel, z_t_for(kernel), logits, weights)
  moments = student_moments(kernel, draws)
  teacher = moments if teacher_kind == "matching" else copy_teacher(kernel)
  return logits, draws, moments, teacher


@pytest.mark.parametrize("kernel", KERNELS, ids=KERNEL_IDS)
def test_auxiliary_optimum_is_half_student_moments_plus_teacher(kernel):
  """E_{x, z_s}[∇_φ L_aux] = 0 exactly at φ = ½(E_student[x | z_s] + x̂_θ(z_s)), not elsewhere."""
  with jax.enable_x64(True):
    logits, draws, moments, teacher = _moment_setup(kernel, _factorised_student(kernel), "copy")
    v = kernel.input_vocab_size
    zi = state_index(draws["z_s"], v)
    log_p_rows = jax.nn.log_softmax(jnp.asarray(logits)[draws["comp"]], -1)
    log_teacher_rows = jnp.asarray(safe_log_np(teacher[zi]))
    prob = jnp.asarray(draws["prob"])

    def expected_aux(table):
      log_aux = jax.nn.log_softmax(table[zi], -1)
      losses = per_row_losses(kernel, dcfg(), draws, log_p_rows, log_teacher_rows, log_aux)
      return jnp.sum(prob * losses["aux_loss"])

    optimum = safe_log_np(0.5 * (moments + teacher))
    grad_aux = jax.jit(jax.grad(expected_aux))
    grad_at_optimum = grad_aux(jnp.asarray(optimum))
    grad_at_teacher = grad_aux(jnp.asarray(np.log(teacher + 1e-12)))
    # Any step away from the optimum raises the expected loss.
    noise = 0.05 * np.random.default_rng(1).normal(size=optimum.shape)
    assert float(expected_aux(jnp.asarray(optimum + noise))) > float(
        expected_aux(jnp.asarray(optimum)))
    scale = float(jnp.linalg.norm(grad_at_teacher))
    residual = float(jnp.linalg.norm(grad_at_optimum))
  assert scale > 1e-2
  assert residual < 1e-9 * scale


@pytest.mark.parametrize("kernel", KERNELS, ids=KERNEL_IDS)
def test_soft_target_identity(kernel):
  """Cross-entropy is linear in its target: over x ~ Cat(p) at a fixed z_s,
  - the Monte-Carlo mean of L_aux(y = one_hot(x)) converges to the exact expectation, which equals
    L_aux(y = p) plus the φ-independent entropy gap (1/h)·Σ_i [H(P(p_i)) − E_x H(P(x_i))] / L;
  - the gradient of gen_loss at the soft p equals ∇ E_x[gen(P(one_hot x))] (exact enumeration) and
    its score-function Monte-Carlo estimate."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(4)
    z_s = np.array([kernel.mask_id, 1] if kernel.is_masked else [2, 0], np.int32)
    logits = jnp.asarray(rng.normal(size=(L, K)))
    log_teacher = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(L, K))), -1)
    aux_tables = [jax.nn.log_softmax(jnp.asarray(rng.normal(size=(L, K))), -1) for _ in range(2)]
    xs = all_states(K)
    s = jnp.full((1,), S)

    def losses(log_p, x, log_aux, soft):
      draw = dict(s=s, z_s=jnp.asarray(z_s)[None], log_p=log_p[None], x_student=x[None])
      return moment_losses(draw, log_teacher[None], log_aux[None], kernel=kernel,
                                   cfg=dcfg(soft_targets=soft))

    log_p = jax.nn.log_softmax(logits, -1)
    p_x = jnp.prod(jnp.exp(jnp.take_along_axis(log_p[None], xs[..., None], -1)[..., 0]), -1)
    rev = jax.jit(jax.vmap(lambda lx: dmmd.reverse_log_probs(
        kernel, jnp.asarray(z_s)[None], lx[None], s, GAP)[0]))
    entropy = lambda lp: -jnp.sum(jnp.exp(lp) * lp, -1)  # over the last axis
    hard_entropy = jnp.sum(p_x[:, None] * entropy(rev(forward_process.log_one_hot(xs, K))), 0)
    gap = jnp.sum(entropy(rev(log_p[None])[0]) - hard_entropy) / GAP / L
    key_x = jax.random.split(jax.random.key(5), 20_000)
    mc_x = jax.jit(jax.vmap(lambda k: jax.random.categorical(k, log_p)))(key_x)
    for log_aux in aux_tables:
      per_x = jax.jit(jax.vmap(lambda x, la=log_aux: losses(log_p, x, la, False)["aux_loss"]))
      exact = float(jnp.sum(p_x * per_x(jnp.asarray(xs))))
      soft = float(losses(log_p, xs[0], log_aux, True)["aux_loss"])
      np.testing.assert_allclose(exact, soft + float(gap), rtol=1e-10)
      samples = per_x(mc_x)
      stderr = float(jnp.std(samples)) / math.sqrt(len(samples))
      assert abs(float(jnp.mean(samples)) - exact) < 5 * stderr

    log_aux = aux_tables[0]

    def gen_soft(lg):
      return losses(jax.nn.log_softmax(lg, -1), xs[0], log_aux, False)["gen_loss"]

    def gen_hard(x):  # the per-sample loss: P(one_hot x) in place of P(p)
      return losses(forward_process.log_one_hot(x, K), x, log_aux, False)["gen_loss"]

    hard_values = jax.jit(jax.vmap(gen_hard))(jnp.asarray(xs))

    def expected_hard(lg):
      lp = jax.nn.log_softmax(lg, -1)
      probs = jnp.prod(jnp.exp(jnp.take_along_axis(lp[None], xs[..., None], -1)[..., 0]), -1)
      return jnp.sum(probs * hard_values)

    g_soft = jax.jit(jax.grad(gen_soft))(logits)
    np.testing.assert_allclose(gen_soft(logits), expected_hard(logits), rtol=1e-10)
    np.testing.assert_allclose(g_soft, jax.jit(jax.grad(expected_hard))(logits), rtol=1e-8,
                               atol=1e-12)

    # Score-function Monte Carlo: E_x[gen(x) ∇ log p(x)] over many sampled x.
    def score(x):
      return jax.grad(lambda lg: jnp.sum(jnp.take_along_axis(
          jax.nn.log_softmax(lg, -1), x[:, None], -1)))(logits)

    values = jax.jit(jax.vmap(gen_hard))(mc_x)
    scores = jax.jit(jax.vmap(score))(mc_x)
    estimate = jnp.mean(values[:, None, None] * scores, 0)
    stderr = jnp.std(values[:, None, None] * scores, 0) / math.sqrt(len(values))
    assert bool(jnp.all(jnp.abs(estimate - g_soft) < 5 * stderr + 1e-9)), (estimate, g_soft)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_masked_gen_loss_is_the_papers_weighted_log_ratio(dtype):
  """Linear schedule: gen_loss = mean_b w(s_b) Σ_{masked i} Σ_c p_ic (log x̂_φ − log x̂_θ)_ic / L
  with w(s) = 1/s (also for s < posterior_gap, where s' is clamped to 0); aux_loss equals the
  paper's w(s) Σ_{masked i} −(y + x̂_θ)·log x̂_φ / L up to a φ-independent constant."""
  kernel = forward_process.ForwardProcess("masked", 4)
  batch, length = 5, 6
  rng = np.random.default_rng(7)
  with jax.enable_x64(dtype == "float64"):
    s = jnp.asarray([0.9, 0.5, 0.2, 0.01, 4e-4], dtype)
    z_s = rng.integers(0, 5, size=(batch, length)).astype(np.int32)
    z_s[:, 0] = kernel.mask_id  # at least one masked and ...
    z_s[:, 1] = 2  # ... one unmasked position per row
    x_student = np.where(z_s == kernel.mask_id, rng.integers(0, 4, size=z_s.shape), z_s)
    log_p, log_teacher, *aux = (jax.nn.log_softmax(jnp.asarray(rng.normal(size=(batch, length, 4)),
                                                               dtype), -1) for _ in range(4))
    draw = dict(s=s, z_s=jnp.asarray(z_s), log_p=log_p, x_student=jnp.asarray(x_student))
    masked = jnp.asarray(z_s == kernel.mask_id)[..., None]
    w = (1.0 / s)[:, None, None]

    def paper_gen(log_aux):
      terms = jnp.where(masked, w * jnp.exp(log_p) * (log_aux - log_teacher), 0.0)
      return jnp.mean(jnp.sum(terms, (1, 2))) / length

    def paper_aux(log_aux):
      y = jax.nn.one_hot(x_student, 4, dtype=dtype)
      terms = jnp.where(masked, -w * (y + jnp.exp(log_teacher)) * log_aux, 0.0)
      return jnp.mean(jnp.sum(terms, (1, 2))) / length

    cfg = dcfg()
    got = [moment_losses(draw, log_teacher, a, kernel=kernel, cfg=cfg) for a in aux]
    rtol = 1e-9 if dtype == "float64" else 2e-3
    for g, a in zip(got, aux, strict=True):
      np.testing.assert_allclose(g["gen_loss"], paper_gen(a), rtol=rtol)
    np.testing.assert_allclose(got[0]["aux_loss"] - got[1]["aux_loss"],
                               paper_aux(aux[0]) - paper_aux(aux[1]), rtol=rtol)


def test_hard_top_p_explodes_and_soft_top_p_stays_bounded():
  """Hard top-p gives excluded tokens log 0 ≈ −1e30, so the student's log-ratio (and its gradient)
  explodes; soft top-p (Δ = 2) keeps them of order one. Config validation refuses hard mode unless
  allow_hard_top_p is set."""
  kernel = forward_process.ForwardProcess("masked", 6)
  rng = np.random.default_rng(10)
  teacher_logits = jnp.asarray(rng.normal(size=(2, 3, 6)) * 2.0, jnp.float32)
  student_logits = jnp.asarray(rng.normal(size=(2, 3, 6)), jnp.float32)
  log_aux = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(2, 3, 6)), jnp.float32), -1)
  z_s = jnp.full((2, 3), kernel.mask_id, jnp.int32)
  results = {}
  for mode in ("hard", "soft"):
    cfg = dcfg(teacher_top_p=0.5, top_p_mode=mode, top_p_delta=2.0)
    log_teacher = dmmd.teacher_log_probs(teacher_logits, cfg)

    def gen(lg, log_teacher=log_teacher, cfg=cfg):
      draw = dict(s=jnp.full((2,), 0.5), z_s=z_s, log_p=jax.nn.log_softmax(lg, -1),
                  x_student=jnp.zeros((2, 3), jnp.int32))
      return moment_losses(draw, log_teacher, log_aux, kernel=kernel, cfg=cfg)["gen_loss"]

    value, grad = jax.jit(jax.value_and_grad(gen))(student_logits)
    results[mode] = (log_teacher, float(value), float(jnp.linalg.norm(grad)))
  hard, soft = results["hard"], results["soft"]
  excluded = hard[0] < -1e20
  assert bool(jnp.any(excluded)) and bool(jnp.all(jnp.any(~excluded, -1)))
  assert float(jnp.max(hard[0][excluded])) < -1e29
  assert bool(jnp.all(jnp.isfinite(soft[0]))) and float(jnp.min(soft[0])) > -50.0
  print(f"gen_loss hard {hard[1]:.3g} (|grad| {hard[2]:.3g}), soft {soft[1]:.3g} "
        f"(|grad| {soft[2]:.3g})")
  assert abs(hard[1]) > 1e6 and hard[2] > 1e6
  assert abs(soft[1]) < 1e3 and soft[2] < 1e3

  config = _helpers.make_config("npy_tokens", **{"distill.top_p_mode": "hard",
                                                 "distill.teacher_top_p": 0.85})
  with pytest.raises(config_lib.ConfigError, match="allow_hard_top_p"):
    config_lib.validate(config)
  config.distill.allow_hard_top_p = True
  config_lib.validate(config)


def test_losses_are_finite_when_s_is_exactly_zero():
  """s ~ U[0, 1) is exactly 0 with probability 2^-23 per float32 draw (≈ once in 8M draws; seen at
  update 1316 of a uniform copy-task run with batch 64 and samples_per_z 4). Then s' = s − h is
  clamped to 0, the rate 1/(s − s') is inf and the losses must still be finite (no position
  changes between s' = 0 and s = 0, so the row contributes nothing)."""
  for kernel in KERNELS:
    z_s = jnp.array([[0, 1], [2, 0]], jnp.int32)
    log_p = jax.nn.log_softmax(jnp.asarray(np.random.default_rng(11).normal(size=(2, L, K)),
                                           jnp.float32), -1)
    draw = dict(s=jnp.array([0.0, 0.5], jnp.float32), t=jnp.array([0.3, 0.7], jnp.float32),
                z_t=z_s, z_s=z_s, log_p=log_p, x_student=jnp.array([[0, 1], [2, 0]], jnp.int32))
    for estimator in ("soft", "rao_blackwell"):
      out = moment_losses(draw, log_p, jnp.roll(log_p, 1, -1), kernel=kernel,
                          cfg=dcfg(uniform_estimator=estimator))
      assert np.isfinite(float(out["gen_loss"])), (kernel.kind, estimator, out)
      assert np.isfinite(float(out["aux_loss"])), (kernel.kind, estimator, out)


# ------------------------------------------------------------------------------------------------
# Part 2: beyond single tokens — the copy task through the real training path.

COPY_TEACHER = {"data.vocab_size": 2, "train.batch_size": 64, "train.learning_rate": 3e-3,
                "train.ema_decay": 0.99, **_helpers.quiet_schedule("train", 600, log_every=100)}
COPY_STUDENT = {"distill.student_steps": 1, "distill.batch_size": 64,
                "distill.learning_rate": 3e-4, "distill.aux_learning_rate": 1e-3}
NUM_SAMPLES = 4000


@pytest.fixture(scope="module")
def copy_data(tmp_path_factory):
  return _helpers.copy_task_tokens(tmp_path_factory.mktemp("copy_data") / "copy.npy")


def copy_config(data_path, kind="masked", **overrides):
  return _helpers.make_config("npy_tokens", **{
      "data.path": data_path, "kernel.kind": kind, **COPY_TEACHER, **COPY_STUDENT, **overrides})


@pytest.fixture(scope="module")
def copy_teachers(copy_data, tmp_path_factory):
  """Trains (once per module, on first use) the 600-step copy-task teacher of a kernel."""
  done = {}

  def get(kind):
    if kind not in done:
      workdir = str(tmp_path_factory.mktemp(f"copy_teacher_{kind}"))
      teacher_run.train_teacher(copy_config(copy_data, kind), workdir)
      done[kind] = workdir
    return done[kind]

  return get


def distil_copy_task(copy_data, teacher, workdir, kind, num_steps, **overrides):
  config = copy_config(copy_data, kind, **{
      "distill.teacher_workdir": teacher,
      **_helpers.quiet_schedule("distill", num_steps, log_every=100), **overrides})
  assert dmmd_run.distill_student(config, workdir) == {"step": num_steps}
  return trained_model.load(workdir).sample(NUM_SAMPLES, seed=1)


def describe(name, tokens):
  freqs = [np.bincount(tokens[:, i], minlength=2) / len(tokens) for i in range(2)]
  line = (f"{name}: agree {_helpers.agreement(tokens):.3f}, value frequencies pos1 "
          f"{np.round(freqs[0], 3).tolist()} pos2 {np.round(freqs[1], 3).tolist()}")
  print(line)
  return freqs


def check_teacher(teacher):
  model = trained_model.load(teacher)
  one_step = model.sample(NUM_SAMPLES, steps=1, seed=1)
  many_steps = model.sample(NUM_SAMPLES, steps=64, seed=1)
  describe("teacher 1 step", one_step)
  describe("teacher 64 steps", many_steps)
  assert abs(_helpers.agreement(one_step) - 0.5) < 0.06  # independent guesses
  assert _helpers.agreement(many_steps) > 0.95  # the teacher did learn the copy


# Tuned through config overrides (not the library) so that the masked student converges reliably
# within the test. Measured here (two teachers, several seeds): with noise_init_scale = 3 and
# lr 3e-4 the student collapsed to a single value in 3 of 4 runs (seed- and teacher-dependent);
# noise_init_scale = 10 with lr 3e-4 never collapsed (5 runs) but reached only 0.93–0.98
# agreement after 1500 updates; noise_init_scale = 10 with lr 6e-4 reached 0.96–0.99 after 1500
# updates in all 3 runs.
MASKED_STUDENT = {"distill.noise_init_scale": 10.0, "distill.learning_rate": 6e-4}
MASKED_STEPS = 1500


@pytest.mark.slow
def test_copy_task_masked_student_learns_the_correlation(copy_data, copy_teachers, tmp_path):
  """Masked kernel, k = 1: the student agrees ≥ 95% while both values keep frequency in
  [0.35, 0.65] (the 1-step teacher agrees only ≈ 1/2)."""
  teacher = copy_teachers("masked")
  check_teacher(teacher)
  tokens = distil_copy_task(copy_data, teacher, str(tmp_path / "student"), "masked",
                            MASKED_STEPS, **MASKED_STUDENT)
  freqs = describe(f"masked student ({MASKED_STEPS} updates)", tokens)
  assert _helpers.agreement(tokens) >= 0.95
  assert all(0.35 <= f <= 0.65 for pos in freqs for f in pos)


UNIFORM_STUDENT = {"distill.uniform_noise": True, "distill.noise_init_scale": 3.0}


@pytest.mark.slow
def test_copy_task_uniform_student_learns_the_correlation(copy_data, copy_teachers, tmp_path):
  """Uniform kernel, k = 1, with the student's noise input (distill.uniform_noise): the student
  agrees ≥ 95% while both values keep frequency in [0.35, 0.65] (measured: 0.968, 0.48 / 0.52;
  noise init 10 and lr 6e-4: 0.984, 0.54 / 0.46)."""
  teacher = copy_teachers("uniform")
  check_teacher(teacher)
  tokens = distil_copy_task(copy_data, teacher, str(tmp_path / "student"), "uniform", 1500,
                            **UNIFORM_STUDENT)
  freqs = describe("uniform student with noise input (1500 updates)", tokens)
  assert _helpers.agreement(tokens) >= 0.95
  assert all(0.35 <= f <= 0.65 for pos in freqs for f in pos)


@pytest.mark.slow
def test_copy_task_uniform_student_without_noise_is_unbalanced(copy_data, copy_teachers,
                                                               tmp_path):
  """Finding: the paper's uniform student (no noise input; the randomness comes only from z_1)
  agrees far more often than the 1-step teacher but keeps the values unbalanced. In every run
  tried (lr 3e-4 … 1e-3, 1500–3000 updates, samples_per_z 1 or 4, four teacher seeds) it settled
  on a map z_1 → x that sends z_1 = 01 and z_1 = 10 to the same value (an OR / AND of the two
  noise tokens): frequencies ≈ 1/4 : 3/4 (measured 0.961 agreement, 0.26 / 0.74). The network is
  nearly mirror-symmetric in the two positions and the balanced symmetric map (x = [z_0 = z_1])
  is not what the expected gradient finds."""
  teacher = copy_teachers("uniform")
  workdir = str(tmp_path / "student")
  tokens = distil_copy_task(copy_data, teacher, workdir, "uniform", 1500)
  freqs = describe("uniform student without noise (1500 updates)", tokens)
  model = trained_model.load(workdir)
  z_1 = jnp.array([[0, 0], [0, 1], [1, 0], [1, 1]], jnp.int32)
  p_one = jax.nn.softmax(model.setup.apply_fn(model.params, z_1, jnp.ones(4)), -1)[..., 1]
  print("uniform student P(x_i = 1 | z_1) for z_1 = 00, 01, 10, 11:",
        np.round(np.asarray(p_one), 3).tolist())
  assert _helpers.agreement(tokens) >= 0.85
  assert all(0.15 <= f <= 0.85 for pos in freqs for f in pos)
  assert max(abs(f - 0.5) for pos in freqs for f in pos) > 0.15


@pytest.mark.slow
def test_copy_task_zero_noise_init_collapses(copy_data, copy_teachers, tmp_path):
  """Finding (documented, reproducible here): with the paper's zero-initialised noise projection
  (noise_init_scale = 0) the expected gradient on the projection is zero at the start, and the
  masked student collapses to a single value (agreement ≈ 1 but one value ≈ always) before it
  learns to use its noise."""
  teacher = copy_teachers("masked")
  tokens = distil_copy_task(copy_data, teacher, str(tmp_path / "student"), "masked", 800,
                            **{"distill.noise_init_scale": 0.0})
  freqs = describe("masked student, noise_init_scale=0 (800 updates)", tokens)
  assert _helpers.agreement(tokens) > 0.95
  assert max(freqs[0]) > 0.95 and max(freqs[1]) > 0.95


# ------------------------------------------------------------------------------------------------
# Part 3: resume exactness and errors, on the canonical fast digits run (_helpers.FAST).


@pytest.fixture(scope="module")
def small_teacher(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("small_teacher"))
  teacher_run.train_teacher(_helpers.fast_digits(), workdir)
  return workdir


def student_config(teacher, **overrides):
  return _helpers.fast_digits(**{"distill.teacher_workdir": teacher, **overrides})


def test_distill_resume_is_exact(small_teacher, tmp_path, monkeypatch):
  """8 updates in one go vs. killed right after the step-4 checkpoint and restarted with the same
  call: identical metrics rows (all steps) and identical final student / auxiliary parameters."""
  overrides = _helpers.quiet_schedule("distill", 8, log_every=1, checkpoint_every=4)
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  dmmd_run.distill_student(student_config(small_teacher, **overrides), straight)

  save = checkpoints.save_checkpoint

  def save_then_die(manager, step, state, data_state):
    save(manager, step, state, data_state)
    manager.wait_until_finished()
    raise _helpers.Interrupted(step)

  monkeypatch.setattr(checkpoints, "save_checkpoint", save_then_die)
  with pytest.raises(_helpers.Interrupted):
    dmmd_run.distill_student(student_config(small_teacher, **overrides), resumed)
  monkeypatch.setattr(checkpoints, "save_checkpoint", save)
  assert [r["step"] for r in _helpers.read_metrics(resumed)] == [1, 2, 3, 4]
  assert dmmd_run.distill_student(student_config(small_teacher, **overrides),
                                  resumed) == {"step": 8}

  rows_a = _helpers.timing_free(_helpers.read_metrics(straight))
  rows_b = _helpers.timing_free(_helpers.read_metrics(resumed))
  assert [r["step"] for r in rows_b] == list(range(1, 9))
  assert rows_a == rows_b
  assert {"gen_loss", "aux_loss"} <= set(rows_a[-1])
  for name in ("student", "aux", "student_ema"):
    a, b = checkpoints.load_params(straight, name), checkpoints.load_params(resumed, name)
    assert _helpers.tree_max_abs_diff(a, b) <= 1e-6, name
  # The student really moved away from the teacher (so equal parameters mean something).
  teacher = checkpoints.load_params(small_teacher, "ema_params")
  student = checkpoints.load_params(straight, "student")
  shared = [k for k in teacher if k != "noise_proj"]
  assert _helpers.tree_max_abs_diff({k: student[k] for k in shared},
                                    {k: teacher[k] for k in shared}) > 1e-4


def test_distill_logs_per_bucket_diagnostics_at_eval(small_teacher, tmp_path):
  """At every eval step metrics.jsonl holds moment_mismatch/b{b} ∈ [0, 2] and
  student_entropy/b{b} ∈ [0, log K] for each of distill.diagnostic_buckets buckets of s."""
  workdir = tmp_path / "student"
  config = student_config(small_teacher, **{
      **_helpers.quiet_schedule("distill", 4, log_every=2), "distill.eval_every": 2,
      "distill.diagnostic_buckets": 3})
  dmmd_run.distill_student(config, str(workdir))
  rows = [r for r in _helpers.read_metrics(workdir) if "mmd2_to_data" in r]
  assert [r["step"] for r in rows] == [2, 4]
  vocab = workdir_lib.load_run_info(str(workdir))["data_info"].vocab_size
  for row in rows:
    for b in range(3):
      assert 0.0 <= row[f"moment_mismatch/b{b}"] <= 2.0
      assert 0.0 <= row[f"student_entropy/b{b}"] <= math.log(vocab) + 1e-5
    assert "moment_mismatch/b3" not in row
  assert any(row[f"moment_mismatch/b{b}"] > 0 for row in rows for b in range(3))


@pytest.mark.parametrize("teacher_dir, message", [
    ("", "teacher_workdir is empty"),
    ("missing", "has no config.json"),
])
def test_distill_refuses_a_missing_teacher(tmp_path, teacher_dir, message):
  teacher = str(tmp_path / teacher_dir) if teacher_dir else ""
  workdir = tmp_path / "student"
  with pytest.raises(dmmd_run.DistillError, match=message):
    dmmd_run.distill_student(student_config(teacher), str(workdir))
  assert not workdir.exists()


@pytest.mark.parametrize("override, key", [
    ({"data.levels": 8}, "data.levels"),
    ({"kernel.kind": "uniform"}, "kernel.kind"),
    ({"model.width": 32}, "model.width"),
    ({"model.num_layers": 1}, "model.num_layers"),
])
def test_distill_refuses_a_teacher_of_another_architecture(small_teacher, tmp_path, override,
                                                           key):
  """A different vocabulary (8 grey levels instead of 17), kernel, width or depth: a DistillError
  naming the key, before the student workdir is created."""
  workdir = tmp_path / "student"
  with pytest.raises(dmmd_run.DistillError, match=key.replace(".", r"\.")) as info:
    dmmd_run.distill_student(student_config(small_teacher, **override), str(workdir))
  assert "\n" not in str(info.value)
  assert not workdir.exists()


@pytest.mark.parametrize("steps", [0, -2])
def test_distill_refuses_non_positive_student_steps(small_teacher, tmp_path, steps):
  config = student_config(small_teacher, **{"distill.student_steps": steps})
  with pytest.raises(config_lib.ConfigError, match="distill.student_steps"):
    dmmd_run.distill_student(config, str(tmp_path / "student"))
  assert not (tmp_path / "student").exists()


def _biggest_state_files(workdir):
  """The largest array file of every checkpoint step (damaging only the newest would not stop a
  consumer: it falls back to the previous step, tests/infra/test_faults.py)."""
  steps = [p for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
  return [max((p for p in (step / "state").rglob("*") if p.is_file()),
              key=lambda p: p.stat().st_size) for step in steps]


@pytest.mark.parametrize("damage", ["delete_data", "garble_data", "delete_metadata",
                                    "no_checkpoints"])
def test_distill_reports_a_corrupt_teacher_checkpoint(small_teacher, tmp_path, damage):
  """Teacher checkpoints with a deleted or overwritten data file, no _METADATA, or no checkpoint
  at all: one-line WorkdirError naming the teacher's checkpoint path."""
  teacher = tmp_path / "teacher"
  shutil.copytree(small_teacher, teacher)
  if damage == "delete_data":
    for path in _biggest_state_files(teacher):
      path.unlink()
  elif damage == "garble_data":
    for path in _biggest_state_files(teacher):
      path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))
  elif damage == "delete_metadata":
    for path in (teacher / "checkpoints").glob("*/state/_METADATA"):
      path.unlink()
  else:
    shutil.rmtree(teacher / "checkpoints")
  message = "has no checkpoint" if damage == "no_checkpoints" else "no readable checkpoint"
  with pytest.raises(workdir_lib.WorkdirError, match=message) as info:
    dmmd_run.distill_student(student_config(str(teacher)), str(tmp_path / "student"))
  assert str(teacher) in str(info.value)
  assert "\n" not in str(info.value)


def _check_nan_stop(workdir, info, loss_names):
  message = str(info.value)
  print("distill NaN:", message)
  name, step = message.split(" became nan at step ")
  assert name in loss_names
  bad_step = int(step.split(";")[0])
  # Checked at once: the checkpoint of the step before was written asynchronously, and it must be
  # complete when the error reaches the caller (a CLI process exits right after it).
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps and steps[-1] == bad_step - 1, (bad_step, os.listdir(workdir / "checkpoints"))
  params = checkpoints.load_params(str(workdir), "student")
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))
  assert all(r["step"] < bad_step for r in _helpers.read_metrics(workdir))
  return bad_step


def test_distill_stops_on_a_nan_loss_and_keeps_the_last_good_checkpoint(small_teacher, tmp_path,
                                                                        monkeypatch):
  """An auxiliary loss that turns NaN at update 6 (injected into the compiled update's metrics):
  TrainingError naming aux_loss and step 6; checkpoint 5 is on disk and loads."""
  compile_updates = dmmd_run.compile_updates

  def poisoned(*args, **kwargs):
    calls = [0]

    def wrap(update):
      def run(state, teacher, batch):
        state, metrics = update(state, teacher, batch)
        calls[0] += 1
        if calls[0] == 6:
          metrics = dict(metrics, aux_loss=jnp.float32(jnp.nan))
        return state, metrics
      return run

    return tuple(map(wrap, compile_updates(*args, **kwargs)))

  monkeypatch.setattr(dmmd_run, "compile_updates", poisoned)
  workdir = tmp_path / "student"
  config = student_config(small_teacher, **_helpers.quiet_schedule("distill", 8, log_every=1,
                                                                   checkpoint_every=1))
  with pytest.raises(loop.TrainingError, match="aux_loss became nan at step 6") as info:
    dmmd_run.distill_student(config, str(workdir))
  assert _check_nan_stop(workdir, info, ["aux_loss"]) == 6


@pytest.mark.slow
def test_distill_diverging_learning_rate_stops_with_a_nan_loss(small_teacher, tmp_path):
  """learning_rate = 1e30 (a real divergence, not an injected NaN)."""
  workdir = tmp_path / "student"
  config = student_config(small_teacher, **{
      "distill.learning_rate": 1e30, "distill.aux_learning_rate": 1e30,
      "distill.warmup_steps": 0,
      **_helpers.quiet_schedule("distill", 20, log_every=1, checkpoint_every=1)})
  with pytest.raises(loop.TrainingError, match=r"(gen|aux)_loss became nan at step \d+") as info:
    dmmd_run.distill_student(config, str(workdir))
  _check_nan_stop(workdir, info, ["gen_loss", "aux_loss"])


@pytest.mark.slow
def test_student_may_choose_its_own_noise_input(small_teacher, tmp_path):
  """The noise input is the student's own: a noise size other than the teacher's is allowed, and
  its projection starts random (noise_init_scale) while everything else copies the teacher."""
  config = student_config(small_teacher, **{"model.noise_dim": 3,
                                            **_helpers.quiet_schedule("distill", 2)})
  assert dmmd_run.distill_student(config, str(tmp_path / "student")) == {"step": 2}
  student = checkpoints.load_params(str(tmp_path / "student"), "student")
  assert student["noise_proj"]["kernel"].shape == (3, 64)
