"""Tests for `dmmd_jax.kernels` against dense D3PM transition matrices built in float64 numpy.

Conventions of the reference: states are the module's input ids (masked: K data tokens + MASK = K;
uniform: K tokens); matrices have rows = from-state, so q(z_t | x) = Q̄_t[x] and
Q̄_t = Q_{t_1|t_0} Q_{t_2|t_1} ⋯ Q_{t_n|t_{n−1}} over a grid 0 = t_0 < … < t_n = t.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmmd_jax.diffusion import forward_process

KINDS = ("masked", "uniform")
SCHEDULES = ("linear", "cosine")
COMBOS = list(itertools.product(KINDS, SCHEDULES))
COMBO_IDS = [f"{k}-{s}" for k, s in COMBOS]

# (s, t) pairs for the brute-force posterior: s = 0, t = 1, generic, and 1e-4 apart.
PAIRS = [
  (0.0, 0.3), (0.0, 1.0), (0.15, 0.5), (0.5, 0.9), (0.7, 1.0),
  (0.2, 0.2001), (0.4, 0.4001), (0.9999, 1.0),
]
ATOL, RTOL = 2e-5, 1e-3


# ---------------------------------------------------------------- float64 reference (numpy)


def ref_alpha(t, schedule):
  t = float(t)
  if schedule == "linear":
    return 1.0 - t
  return 0.0 if t >= 1.0 else float(np.cos(0.5 * np.pi * t))


def n_states(kind, k):
  return k + 1 if kind == "masked" else k


def ref_prior(kind, k):
  if kind == "masked":
    return np.eye(k + 1)[k]
  return np.full(k, 1.0 / k)


def one_step(kind, k, alpha_ts):
  """Q_{t|s} = α_{t|s} I + (1 − α_{t|s}) 1 πᵀ."""
  v = n_states(kind, k)
  return alpha_ts * np.eye(v) + (1.0 - alpha_ts) * np.outer(np.ones(v), ref_prior(kind, k))


def transition(kind, k, schedule, s, t):
  """Q_{t|s} for s ≤ t (identity when s = t)."""
  if s == t:
    return np.eye(n_states(kind, k))
  return one_step(kind, k, ref_alpha(t, schedule) / ref_alpha(s, schedule))


def marginal_matrix(kind, k, schedule, t, n=40):
  """Q̄_t as a product of one-step matrices over a non-uniform grid 0 = t_0 < … < t_n = t."""
  grid = float(t) * np.linspace(0.0, 1.0, n + 1) ** 1.5
  q = np.eye(n_states(kind, k))
  for a, b in zip(grid[:-1], grid[1:], strict=True):
    q = q @ transition(kind, k, schedule, a, b)
  return q


def ref_posterior(kind, k, schedule, s, t):
  """post[x, z_t, z_s] = Q̄_s[x, z_s] Q_{t|s}[z_s, z_t] / Q̄_t[x, z_t]; NaN where q(z_t | x) = 0."""
  qs = marginal_matrix(kind, k, schedule, s)[:k]
  qt = marginal_matrix(kind, k, schedule, t)[:k]
  qts = transition(kind, k, schedule, s, t)
  joint = qs[:, None, :] * qts.T[None, :, :]  # [x, z_t, z_s]
  with np.errstate(invalid="ignore", divide="ignore"):
    post = joint / qt[:, :, None]
  post[qt == 0] = np.nan
  return post


def f32(*ts):
  """Times as the float32 values the module sees (the reference then uses exactly those)."""
  return [float(np.float32(t)) for t in ts]


def random_simplex(rng, shape, k):
  p = rng.dirichlet(np.ones(k), size=shape).astype(np.float32)
  return p / p.sum(-1, keepdims=True)


# One jitted posterior, compiled once per (kernel, shape); eager == jit is tested separately.
_posterior_jit = jax.jit(forward_process.posterior_log_probs, static_argnums=0)
_marginal_jit = jax.jit(forward_process.marginal_probs, static_argnums=0)
M = 6  # columns of the standard layout: soft x̂ samples, or hard x = arange(M) % K


def posterior(kernel, z_t, log_x, s, t):
  return np.asarray(jnp.exp(_posterior_jit(
    kernel, jnp.asarray(z_t), jnp.asarray(log_x, jnp.float32), jnp.asarray(s, jnp.float32),
    jnp.asarray(t, jnp.float32))), np.float64)


def posterior_all_zt(kernel, log_x, s, t):
  """Posterior for every z_t (rows) and each of the M clean-token log-probs `[M, K]`.

  Returns `[z_t, M, z_s]`.
  """
  v = kernel.input_vocab_size
  z_t = np.broadcast_to(np.arange(v)[:, None], (v, M))
  return posterior(kernel, z_t, np.broadcast_to(np.asarray(log_x), (v, M, kernel.vocab_size)),
                   s, t)


def hard_x(k):
  """The hard clean tokens of the standard layout (all K values appear for K ≤ M)."""
  return np.arange(M) % k


def all_hard_posteriors(kernel, s, t):
  """Module posterior for every (x, z_t): `[x, z_t, z_s]`."""
  k = kernel.vocab_size
  got = posterior_all_zt(kernel, forward_process.log_one_hot(jnp.asarray(hard_x(k)), k), s, t)
  return got[:, :k].transpose(1, 0, 2)


def soft_x(seed, k):
  return random_simplex(np.random.default_rng(seed), (M,), k)


# ---------------------------------------------------------------- construction and prior


def test_kernel_properties():
  m = forward_process.ForwardProcess("masked", 5)
  assert (m.is_masked, m.mask_id, m.input_vocab_size, m.schedule) == (True, 5, 6, "linear")
  u = forward_process.ForwardProcess("uniform", 5, "cosine")
  assert (u.is_masked, u.input_vocab_size, u.schedule) == (False, 5, "cosine")
  np.testing.assert_allclose(np.asarray(u.alpha(jnp.array([0.0, 0.5, 1.0]))),
                             [1.0, np.cos(np.pi / 4), 0.0], atol=1e-6)


@pytest.mark.parametrize("args, match", [
  (("absorbing", 4), "Unknown kernel"),
  (("masked", 1), "at least 2"),
  (("uniform", 0), "at least 2"),
  (("uniform", 4, "sqrt"), "Unknown schedule"),
])
def test_kernel_construction_errors(args, match):
  with pytest.raises(ValueError, match=match):
    forward_process.ForwardProcess(*args)


def test_log_one_hot_and_safe_log():
  lo = np.asarray(forward_process.log_one_hot(jnp.array([[0, 2]]), 3))
  assert lo.shape == (1, 2, 3)
  np.testing.assert_array_equal(np.exp(lo), [[[1, 0, 0], [0, 0, 1]]])
  assert np.all(np.isfinite(lo))
  sl = np.asarray(forward_process.safe_log(jnp.array([0.0, 1.0, 0.5])))
  np.testing.assert_allclose(sl, [forward_process.NEG_INF, 0.0, np.log(0.5)], rtol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_prior_probs(kind):
  kernel = forward_process.ForwardProcess(kind, 4)
  np.testing.assert_allclose(np.asarray(forward_process.prior_probs(kernel)), ref_prior(kind, 4))


PRIOR_SHAPE = (4, 50_000)


def test_sample_prior_masked_is_all_mask():
  kernel = forward_process.ForwardProcess("masked", 3)
  z = forward_process.sample_prior(jax.random.key(0), kernel, PRIOR_SHAPE)
  assert z.shape == PRIOR_SHAPE and z.dtype == jnp.int32
  assert np.all(np.asarray(z) == kernel.mask_id)


def test_sample_prior_uniform_frequencies():
  k, n = 5, PRIOR_SHAPE[0] * PRIOR_SHAPE[1]
  z = forward_process.sample_prior(jax.random.key(1), forward_process.ForwardProcess("uniform", k),
                                   PRIOR_SHAPE)
  assert z.shape == PRIOR_SHAPE and z.dtype == jnp.int32
  z = np.asarray(z).ravel()
  assert z.min() >= 0 and z.max() < k
  freq = np.bincount(z, minlength=k) / n
  se = np.sqrt((1 / k) * (1 - 1 / k) / n)
  np.testing.assert_array_less(np.abs(freq - 1 / k), 5 * se)


# ---------------------------------------------------------------- marginals


@pytest.mark.parametrize("kind, schedule", COMBOS, ids=COMBO_IDS)
@pytest.mark.parametrize("k", [2, 4])
def test_marginal_probs_vs_product_of_transitions(kind, schedule, k):
  kernel = forward_process.ForwardProcess(kind, k, schedule)
  times = f32(0.0, 1e-3, 0.2, 0.5, 0.77, 1.0)
  ref = np.stack([marginal_matrix(kind, k, schedule, t)[:k] for t in times])  # [T, x, z]
  # Sanity of the reference itself: rows are distributions and the closed form holds.
  np.testing.assert_allclose(ref.sum(-1), 1.0, atol=1e-12)
  for t, q in zip(times, ref, strict=True):
    a = ref_alpha(t, schedule)
    np.testing.assert_allclose(q, a * np.eye(n_states(kind, k))[:k]
                               + (1 - a) * ref_prior(kind, k), atol=1e-12)
  # x_probs [T, K + 3, K]: the K one-hot rows (hard x), then 3 soft x̂; t [T, 1] per row.
  xh = random_simplex(np.random.default_rng(k), (len(times), 3), k)
  x_probs = np.concatenate([np.broadcast_to(np.eye(k, dtype=np.float32), (len(times), k, k)),
                            xh], axis=1)
  got = np.asarray(forward_process.marginal_probs(kernel, jnp.asarray(x_probs),
                                          jnp.array(times)[:, None]))
  assert got.shape == (len(times), k + 3, n_states(kind, k))
  np.testing.assert_allclose(got[:, :k], ref, atol=1e-6)
  # Soft x: q(z_t | x̂) = x̂ᵀ Q̄_t.
  np.testing.assert_allclose(got[:, k:], np.einsum("tmc,tcz->tmz", xh.astype(np.float64), ref),
                             atol=1e-6)
  np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-6)


@pytest.mark.parametrize("kind, schedule", COMBOS, ids=COMBO_IDS)
def test_sample_marginal_frequencies(kind, schedule):
  k, per_token = 3, 40_000
  kernel = forward_process.ForwardProcess(kind, k, schedule)
  times = f32(0.0, 0.25, 0.6, 0.9, 1.0)
  b, length = len(times), k * per_token
  x = np.tile(np.arange(k, dtype=np.int32), (b, per_token))  # every row holds each token equally
  z = forward_process.sample_marginal(jax.random.key(7), kernel, jnp.asarray(x), jnp.array(times))
  assert z.shape == (b, length) and z.dtype == jnp.int32
  z = np.asarray(z)
  v = n_states(kind, k)
  for row, t in enumerate(times):
    counts = np.zeros((k, v))
    np.add.at(counts, (x[row], z[row]), 1)
    freq = counts / per_token
    p = np.clip(marginal_matrix(kind, k, schedule, t)[:k], 0.0, 1.0)
    se = np.sqrt(p * (1 - p) / per_token)
    # Exact where the reference probability is 0 or 1 (within rounding), 5 SE elsewhere.
    tol = np.where(se > 0, 5 * se, 1e-12)
    assert np.all(np.abs(freq - p) <= tol), (t, freq, p)


# ---------------------------------------------------------------- posterior: brute force


@pytest.mark.parametrize("kind, schedule", COMBOS, ids=COMBO_IDS)
@pytest.mark.parametrize("k", [2, 4])
def test_posterior_hard_x_vs_dense_matrices(kind, schedule, k):
  kernel = forward_process.ForwardProcess(kind, k, schedule)
  for s, t in PAIRS:
    s, t = f32(s, t)
    ref = ref_posterior(kind, k, schedule, s, t)
    got = all_hard_posteriors(kernel, s, t)  # [x, z_t, z_s]
    assert not np.any(np.isnan(got))
    valid = ~np.isnan(ref[..., 0])
    if kind == "masked":  # impossible (x, z_t): z_t is neither x nor MASK
      assert not np.any(valid[:, :k] & ~np.eye(k, dtype=bool)) and np.all(valid[:, k])
    else:
      assert np.all(valid)
    np.testing.assert_allclose(got[valid], ref[valid], atol=ATOL, rtol=RTOL,
                               err_msg=f"{kind} {schedule} s={s} t={t}")
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
    # The reference is consistent with the Markov property: Q̄_s Q_{t|s} = Q̄_t.
    np.testing.assert_allclose(
      marginal_matrix(kind, k, schedule, s) @ transition(kind, k, schedule, s, t),
      marginal_matrix(kind, k, schedule, t), atol=1e-12)


@pytest.mark.parametrize("kind, schedule", COMBOS, ids=COMBO_IDS)
@pytest.mark.parametrize("k", [2, 4])
def test_posterior_soft_x_is_mixture_of_hard_posteriors(kind, schedule, k):
  kernel = forward_process.ForwardProcess(kind, k, schedule)
  v = n_states(kind, k)
  xh = soft_x(100 + k, k)  # [M, K]
  for s, t in PAIRS:
    s, t = f32(s, t)
    ref = ref_posterior(kind, k, schedule, s, t)  # [c, z_t, z_s]
    got = posterior_all_zt(kernel, np.log(xh), s, t)  # [z_t, M, z_s]
    assert not np.any(np.isnan(got))
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
    mix = np.einsum("mc,czs->zms", xh.astype(np.float64), ref)
    if kind == "masked":
      # Only z_t = MASK is reachable from every clean token; unmasked z_t stay put.
      np.testing.assert_allclose(got[k], mix[k], atol=ATOL, rtol=RTOL)
      np.testing.assert_allclose(got[:k], np.broadcast_to(np.eye(v)[:k, None], (k, M, v)),
                                 atol=1e-6)
    else:
      np.testing.assert_allclose(got, mix, atol=ATOL, rtol=RTOL)


def plug_in(kind, k, schedule, xh, s, t):
  """normalise(Q_{t|s}[:, z_t] ⊙ x̂ᵀ Q̄_s) for every z_t: `[z_t, m, z_s]`."""
  qs = marginal_matrix(kind, k, schedule, s)[:k]
  qts = transition(kind, k, schedule, s, t)
  un = qts.T[:, None, :] * (xh.astype(np.float64) @ qs)[None]
  return un / un.sum(-1, keepdims=True)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_masked_mixture_equals_plug_in(schedule):
  k = 4
  kernel = forward_process.ForwardProcess("masked", k, schedule)
  xh = soft_x(3, k)
  for s, t in [(0.1, 0.35), (0.5, 0.9), (0.0, 0.6), (0.3, 0.97)]:
    s, t = f32(s, t)
    got = posterior_all_zt(kernel, np.log(xh), s, t)
    np.testing.assert_allclose(got, plug_in("masked", k, schedule, xh, s, t), atol=ATOL)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_uniform_mixture_differs_from_plug_in(schedule):
  k = 4
  kernel = forward_process.ForwardProcess("uniform", k, schedule)
  xh = soft_x(4, k)
  s, t = f32(0.3, 0.7)
  got = posterior_all_zt(kernel, np.log(xh), s, t)
  mix = np.einsum("mc,czs->zms", xh.astype(np.float64), ref_posterior("uniform", k, schedule, s, t))
  np.testing.assert_allclose(got, mix, atol=ATOL, rtol=RTOL)
  # The documented nonlinearity: the normaliser depends on x̂, so the plug-in formula differs.
  assert np.abs(got - plug_in("uniform", k, schedule, xh, s, t)).max() > 1e-2
  # ... but both agree for a hard x (where the plug-in is the exact posterior).
  got_h = posterior_all_zt(kernel, forward_process.log_one_hot(jnp.asarray(hard_x(k)), k), s, t)
  hard = np.eye(k)[hard_x(k)]
  np.testing.assert_allclose(got_h, plug_in("uniform", k, schedule, hard, s, t), atol=ATOL)


# ---------------------------------------------------------------- posterior: edge cases


def _reachable(kind, k, schedule, t):
  """[x, z_t] mask of q(z_t | x) > 0."""
  return marginal_matrix(kind, k, schedule, t)[:k] > 0


# s = t = 1 is left out for the uniform kernel: there α_{t|s} = 0/0 and the posterior jumps
# (for every s < 1 it is q(z_s | x), whose limit is π, while Q_{1|1} = I gives δ_{z_t}).
S_EQ_T = [(kind, schedule, t) for kind, schedule in COMBOS for t in (0.0, 0.37, 0.999, 1.0)
          if not (kind == "uniform" and t == 1.0)]


@pytest.mark.parametrize("kind, schedule, t", S_EQ_T)
def test_posterior_s_equals_t_hard_x_is_identity(kind, schedule, t):
  k = 4
  kernel = forward_process.ForwardProcess(kind, k, schedule)
  got = all_hard_posteriors(kernel, t, t)
  valid = _reachable(kind, k, schedule, t)
  delta = np.broadcast_to(np.eye(n_states(kind, k)), got.shape)  # δ_{z_t}
  np.testing.assert_allclose(got[valid], delta[valid], atol=1e-6)


@pytest.mark.parametrize("kind, schedule, t", S_EQ_T)
def test_posterior_s_equals_t_soft_x_is_identity(kind, schedule, t):
  k = 4
  kernel = forward_process.ForwardProcess(kind, k, schedule)
  v = n_states(kind, k)
  got = posterior_all_zt(kernel, np.log(soft_x(5, k)), t, t)
  np.testing.assert_allclose(got, np.broadcast_to(np.eye(v)[:, None], (v, M, v)), atol=1e-6)


@pytest.mark.parametrize("kind, schedule", COMBOS, ids=COMBO_IDS)
@pytest.mark.parametrize("t", [0.3, 0.8])
def test_posterior_tends_to_identity_as_s_tends_to_t(kind, schedule, t):
  k = 4
  kernel = forward_process.ForwardProcess(kind, k, schedule)
  v = n_states(kind, k)
  log_x = np.log(soft_x(6, k))
  leave = []  # 1 − P(z_s = z_t), [gap, z_t, M]
  for gap in [1e-1, 1e-2, 1e-3, 1e-4]:
    got = posterior_all_zt(kernel, log_x, t - gap, t)
    leave.append(1.0 - got[np.arange(v), :, np.arange(v)])
  leave = np.stack(leave)
  assert np.all(np.diff(leave, axis=0) <= 1e-6)
  assert leave[0].max() > 1e-2  # a posterior that ignored s would fail here
  assert leave[-1].max() < 2e-3
  assert leave[-1].max() < 0.2 * leave[-2].max()  # vanishes linearly in the gap


@pytest.mark.parametrize("kind, schedule", COMBOS, ids=COMBO_IDS)
@pytest.mark.parametrize("t", [0.05, 0.5, 1.0])
def test_posterior_at_s0_recovers_x(kind, schedule, t):
  k = 4
  kernel = forward_process.ForwardProcess(kind, k, schedule)
  v = n_states(kind, k)
  # Hard x: z_0 = x for every reachable z_t.
  got = all_hard_posteriors(kernel, 0.0, t)
  valid = _reachable(kind, k, schedule, t)
  expected = np.broadcast_to(np.eye(v)[:k, None, :], got.shape)  # δ_x
  np.testing.assert_allclose(got[valid], expected[valid], atol=1e-6)
  # Soft x̂: the mixture is x̂ itself (no mass on MASK) wherever every clean token reaches z_t.
  xh = soft_x(7, k)
  got = posterior_all_zt(kernel, np.log(xh), 0.0, t)
  xh_in = np.concatenate([xh, np.zeros((M, v - k), np.float32)], -1)
  if kind == "masked":
    np.testing.assert_allclose(got[k], xh_in, atol=1e-6)
    np.testing.assert_allclose(got[:k], np.broadcast_to(np.eye(v)[:k, None], (k, M, v)),
                               atol=1e-6)
  else:
    np.testing.assert_allclose(got, np.broadcast_to(xh_in, (v, M, v)), atol=1e-5)


@pytest.mark.parametrize("kind, schedule", COMBOS, ids=COMBO_IDS)
@pytest.mark.parametrize("s", [0.0, 0.4, 0.9])
def test_posterior_at_t1_is_marginal_at_s(kind, schedule, s):
  # z_1 carries no information about x, so q(z_s | z_1, x) = q(z_s | x) (linear in x̂).
  k = 4
  kernel = forward_process.ForwardProcess(kind, k, schedule)
  xh = soft_x(8, k)
  expected = np.asarray(forward_process.marginal_probs(kernel, jnp.asarray(xh), s))
  np.testing.assert_allclose(expected, xh @ marginal_matrix(kind, k, schedule, s)[:k],
                             atol=1e-6)
  got = posterior_all_zt(kernel, np.log(xh), s, 1.0)
  reachable = [k] if kind == "masked" else range(k)  # the possible z_1
  for z in reachable:
    np.testing.assert_allclose(got[z], expected, atol=1e-5)


EDGE_PAIRS = [(0.0, 0.0), (0.3, 0.3), (1.0, 1.0), (0.0, 1.0), (0.0, 1e-4), (0.5, 0.5001),
              (0.9999, 1.0), (1e-4, 2e-4)]


@pytest.mark.parametrize("kind, schedule", COMBOS, ids=COMBO_IDS)
@pytest.mark.parametrize("s, t", EDGE_PAIRS)
def test_posterior_is_normalised_and_finite(kind, schedule, s, t):
  k = 4
  kernel = forward_process.ForwardProcess(kind, k, schedule)
  v = n_states(kind, k)
  z_t = np.broadcast_to(np.arange(v)[:, None], (v, M))
  log_x = np.broadcast_to(np.log(soft_x(9, k)), (v, M, k))
  log_p = np.asarray(_posterior_jit(kernel, jnp.asarray(z_t), jnp.asarray(log_x), jnp.float32(s),
                                    jnp.float32(t)))
  assert not np.any(np.isnan(log_p))
  # 1e-4: float32 cancellation in 1 − α near t = 0 costs a few 1e-5 (e.g. s, t = 1e-4, 2e-4).
  np.testing.assert_allclose(np.exp(log_p).sum(-1), 1.0, atol=1e-4)
  hard = all_hard_posteriors(kernel, s, t)
  valid = _reachable(kind, k, schedule, t)
  assert not np.any(np.isnan(hard))
  np.testing.assert_allclose(hard.sum(-1)[valid], 1.0, atol=1e-4)
  if kind == "masked":  # unmasked tokens never change
    np.testing.assert_array_equal(np.exp(log_p[:k]), np.broadcast_to(np.eye(v)[:k, None],
                                                                      (k, M, v)))


@pytest.mark.parametrize("kind, schedule", COMBOS, ids=COMBO_IDS)
def test_bayes_identity_with_module_functions(kind, schedule):
  # Σ_{z_t} q(z_t | x) q(z_s | z_t, x) = q(z_s | x).
  k = 4
  kernel = forward_process.ForwardProcess(kind, k, schedule)
  xs = [np.eye(k, dtype=np.float32)[hard_x(k)]]
  if kind == "masked":  # the masked posterior is linear in x, so soft x̂ satisfies it too
    xs.append(soft_x(10, k))
  for x in xs:
    with np.errstate(divide="ignore"):
      log_x = np.log(x)
    for s, t in [(0.0, 0.5), (0.2, 0.6), (0.45, 0.4501), (0.7, 1.0)]:
      q_t = np.asarray(forward_process.marginal_probs(kernel, jnp.asarray(x), t),
                       np.float64)  # [M, z_t]
      post = posterior_all_zt(kernel, np.maximum(log_x, forward_process.NEG_INF), s,
                              t)  # [z_t, M, z_s]
      lhs = np.einsum("mz,zms->ms", q_t, post)
      q_s = np.asarray(forward_process.marginal_probs(kernel, jnp.asarray(x), s))
      np.testing.assert_allclose(lhs, q_s, atol=2e-6)


# ---------------------------------------------------------------- batching, jit and vmap


def _batch_inputs(kind, k, seed=11, b=3, length=7):
  rng = np.random.default_rng(seed)
  v = n_states(kind, k)
  z_t = rng.integers(0, v, size=(b, length)).astype(np.int32)
  if kind == "masked":
    z_t[:, ::2] = k  # make sure every row has MASK positions
  log_x = np.log(random_simplex(rng, (b, length), k))
  s = np.array([[0.1], [0.45], [0.0]], np.float32)
  t = np.array([[0.3], [0.9], [1.0]], np.float32)
  return z_t, log_x, s, t


@pytest.mark.parametrize("kind, schedule", COMBOS, ids=COMBO_IDS)
def test_per_row_times_broadcast(kind, schedule):
  k = 4
  kernel = forward_process.ForwardProcess(kind, k, schedule)
  z_t, log_x, s, t = _batch_inputs(kind, k)
  out = np.asarray(_posterior_jit(kernel, jnp.asarray(z_t), jnp.asarray(log_x), jnp.asarray(s),
                                  jnp.asarray(t)))
  assert out.shape == z_t.shape + (kernel.input_vocab_size,)
  # Each row matches the dense reference at that row's own times.
  v = n_states(kind, k)
  for row in range(z_t.shape[0]):
    post = ref_posterior(kind, k, schedule, float(s[row, 0]), float(t[row, 0]))
    xh = np.exp(log_x[row]).astype(np.float64)
    for i, z in enumerate(z_t[row]):
      expected = np.eye(v)[z] if z < k and kind == "masked" else xh[i] @ post[:, z]
      np.testing.assert_allclose(np.exp(out[row, i]), expected, atol=ATOL)
  # Per-row times in marginal_probs: x_probs [B, L, K], t [B, 1].
  xh = np.exp(log_x)
  marg = np.asarray(_marginal_jit(kernel, jnp.asarray(xh), jnp.asarray(t)))
  for row in range(z_t.shape[0]):
    q = marginal_matrix(kind, k, schedule, float(t[row, 0]))[:k]
    np.testing.assert_allclose(marg[row], xh[row] @ q, atol=1e-6)


@pytest.mark.parametrize("kind, schedule", [("masked", "linear"), ("uniform", "cosine")])
def test_posterior_and_marginal_under_jit_and_vmap(kind, schedule):
  k = 4
  kernel = forward_process.ForwardProcess(kind, k, schedule)
  z_t, log_x, s, t = map(jnp.asarray, _batch_inputs(kind, k))
  eager = forward_process.posterior_log_probs(kernel, z_t, log_x, s, t)
  jitted = _posterior_jit(kernel, z_t, log_x, s, t)
  vmapped = jax.jit(jax.vmap(
    lambda z, lx, s_, t_: forward_process.posterior_log_probs(kernel, z, lx, s_, t_)))(
      z_t, log_x, s[:, 0], t[:, 0])
  np.testing.assert_allclose(np.exp(jitted), np.exp(eager), atol=1e-6)
  np.testing.assert_allclose(np.exp(vmapped), np.exp(eager), atol=1e-6)

  # marginal_probs: vmap over rows with scalar t == the batched call with t [B, 1].
  xh = jnp.exp(log_x)
  m_vmap = jax.jit(jax.vmap(lambda x_,
                            t_: forward_process.marginal_probs(kernel, x_, t_)))(xh, t[:, 0])
  np.testing.assert_allclose(m_vmap, _marginal_jit(kernel, xh, t), atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_sampling_keys_jit_and_vmap(kind):
  k = 4
  kernel = forward_process.ForwardProcess(kind, k)
  x = jnp.asarray(np.random.default_rng(12).integers(0, k, (3, 400)), jnp.int32)
  tt = jnp.array([0.2, 0.5, 0.5])
  keys = jax.random.split(jax.random.key(3), 3)
  z = [np.asarray(forward_process.sample_marginal(kk, kernel, x, tt)) for kk in keys]
  first = forward_process.sample_marginal(keys[0], kernel, x, tt)
  np.testing.assert_array_equal(np.asarray(first), z[0])
  assert np.any(z[0] != z[1])
  # Rows with the same t and the same x use independent randomness.
  z2 = np.asarray(forward_process.sample_marginal(keys[0], kernel, jnp.broadcast_to(x[2], x.shape),
                                                  tt))
  assert np.any(z2[1] != z2[2])
  # jit(vmap over keys) reproduces the eager draws key by key.
  zs = jax.jit(jax.vmap(lambda kk: forward_process.sample_marginal(kk, kernel, x, tt)))(keys)
  assert zs.shape == (3,) + x.shape and zs.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(zs), np.stack(z))
  prior = jax.jit(forward_process.sample_prior, static_argnums=(1, 2))
  np.testing.assert_array_equal(prior(keys[0], kernel, PRIOR_SHAPE),
                                forward_process.sample_prior(keys[0], kernel, PRIOR_SHAPE))
