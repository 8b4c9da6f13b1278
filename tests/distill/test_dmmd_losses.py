"""The D-MMD losses (`dmmd_jax.distill.dmmd`): the claims of docs/dmmd-method.md §4, enumerated.

Problems small enough to enumerate: K = 3 tokens, length L = 2, one z_t, every student sample x
and every z_s ~ q(z_s | z_t, x) weighted by its exact probability (no Monte Carlo unless the claim
is about Monte Carlo). The forward posterior used for the enumeration is an independent numpy
transcription of the formula in the method doc, and everything runs in float64 so that "zero"
means zero. (The expected loss and gradient against enumeration: test_dmmd_enumeration.py.)
"""

import functools
import itertools
import math

import _helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmmd_jax import config_lib
from dmmd_jax.diffusion import forward_process, schedules
from dmmd_jax.distill import dmmd
from dmmd_jax.training import setup

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


@pytest.mark.parametrize("grid", ["uniform", "cosine"])
def test_grid_times_are_the_students_sampler_times_and_spans(grid):
  """time_sampling="grid": t is one of the k times the sampler calls the student at, each with
  frequency 1/k, and s is uniform over the span that step covers, (t_{i−1}, t_i)."""
  k, n = 4, 40_000
  times = np.asarray(schedules.time_grid(k, grid))  # 1 = t_k > … > t_0 = 0
  s, t = map(np.asarray, dmmd.sample_times(jax.random.key(0), n, k, grid))
  index = np.argmin(np.abs(t[:, None] - times[None, :k]), axis=1)
  np.testing.assert_allclose(t, times[index], atol=1e-7)
  np.testing.assert_allclose(np.bincount(index, minlength=k) / n, 1 / k, atol=0.01)
  lower = times[index + 1]
  u = (s - lower) / (t - lower)
  assert u.min() >= 0 and u.max() <= 1
  np.testing.assert_allclose(np.histogram(u, bins=5, range=(0, 1))[0] / n, 0.2, atol=0.01)


def test_continuous_times_cover_the_unit_interval():
  s, t = map(np.asarray, dmmd.sample_times(jax.random.key(0), 40_000, 4))
  assert np.all(t - s <= 0.25 + 1e-7) and np.all(t >= s)
  np.testing.assert_allclose(np.histogram(s, bins=4, range=(0, 1))[0] / s.size, 0.25, atol=0.01)
  np.testing.assert_allclose(np.mean(t == 1.0), 1 / 8, atol=0.01)  # E[δ] of clipped s + δ


def test_config_maps_time_sampling_to_the_sampler_grid():
  config = config_lib.typed(config_lib.finish(config_lib.base_config(), "tiny"))
  grid = config_lib.replace(config, distill={"time_sampling": "grid"}, sample={"grid": "cosine"})
  assert setup.estimator_config_of(grid).time_grid == "cosine"
  assert setup.estimator_config_of(config).time_grid == ""
  with pytest.raises(config_lib.ConfigError, match="time_sampling"):
    config_lib.validate(config_lib.replace(config, distill={"time_sampling": "grids"}))
