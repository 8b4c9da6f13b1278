"""Tests for `dmmd_jax.losses`: the ELBOs of tiny problems, enumerated exactly.

Everything here is a sequence of length L = 2 over K = 3 data tokens, so every latent state z_t
(K^L uniform states, (K + 1)^L masked ones) and every sampling trajectory can be enumerated. A
"model" is any denoiser x̂(z_t, t) written as a lookup table or as the Bayes posterior of a product
data distribution; no network is involved.

- The uniform / masked T-step model likelihood p(x) is computed by chaining the exact reverse
  transition matrices (the mixture step of `kernels.posterior_log_probs`), and the T-step negative
  ELBO by summing `discrete_elbo` over all z_t weighted by q(z_t | x) (no Monte Carlo).
- For the masked continuous-time ELBO with a time-independent denoiser, the model is an any-order
  autoregressive model: p(x) = ½ Σ_{orders} Π p(x_σ(i) | revealed); the ELBO (a Gauss–Legendre
  quadrature over t, exact for these smooth integrands) equals the order-averaged −log p.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmmd_jax.diffusion import elbo, forward_process

K = 3  # data tokens
L = 2  # sequence length
T = 4  # steps of the discrete-time ELBO
# Product data distribution: one categorical per position.
P_DATA = np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
KIND_SCHEDULES = [(k, s) for k in ("uniform", "masked") for s in ("linear", "cosine")]

# Jitted library functions (one compile per kernel and shape instead of eager op-by-op dispatch).
posterior_log_probs = jax.jit(forward_process.posterior_log_probs, static_argnums=0)
discrete_elbo = jax.jit(elbo.discrete_elbo, static_argnums=(0, 5))
masked_elbo = jax.jit(elbo.masked_elbo, static_argnums=0)


# ------------------------------------------------------------------------------------------------
# Independent numpy reference of the forward process and the tiny problem.


def np_alpha(t, schedule):
  return 1.0 - t if schedule == "linear" else np.cos(0.5 * np.pi * t)


def all_states(num_ids):
  """Every sequence of length L over `num_ids` ids, `[num_ids**L, L]`, row-major."""
  return np.array(list(itertools.product(range(num_ids), repeat=L)), np.int32)


def state_index(z, num_ids):
  """Row of `z` (`[..., L]`) in `all_states(num_ids)`; works on numpy and jax arrays."""
  return z[..., 0] * num_ids + z[..., 1]


DATA = all_states(K)  # every clean sequence x, [K**L, L]


def prior(kernel):
  v = kernel.input_vocab_size
  return np.eye(v)[kernel.mask_id] if kernel.is_masked else np.full(v, 1.0 / v)


def q_marginal(kernel, x, t):
  """q(z_t = z | x) for every z in `all_states(input_vocab)`, from α_t x + (1 − α_t) π."""
  v = kernel.input_vocab_size
  a = np_alpha(t, kernel.schedule)
  per_pos = a * np.eye(v)[x] + (1.0 - a) * prior(kernel)  # [L, v]
  return np.prod(per_pos[np.arange(L), all_states(v)], axis=1)


def log_softmax(logits):
  return np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1))


def table_denoiser(table, num_ids, time_dependent):
  """x̂(z, t) read from a logits table `[T + 1, states, L, K]` (or `[states, L, K]`)."""

  def denoise(z, t):
    logits = table[int(round(t * T)), state_index(z, num_ids)] if time_dependent else \
        table[state_index(z, num_ids)]
    return log_softmax(logits)

  return denoise


def bayes_denoiser(kernel):
  """Exact E[x_i | z_t] for product data: x̂_i(c) ∝ p_i(c) q(z_t,i | x_i = c), per position."""
  pi = prior(kernel)

  def denoise(z, t):
    a = np_alpha(t, kernel.schedule)
    lik = a * (z[..., None] == np.arange(K)) + (1.0 - a) * pi[z][..., None]  # [S, L, K]
    post = P_DATA * lik
    norm = post.sum(-1, keepdims=True)
    post = np.where(norm > 0, post / np.maximum(norm, 1e-300), 1.0 / K)
    return np.where(post > 0, np.log(np.maximum(post, 1e-300)),
                    forward_process.NEG_INF).astype(np.float32)

  return denoise


def log_p_data(x):
  return float(np.sum(np.log(P_DATA[np.arange(L), x])))


# ------------------------------------------------------------------------------------------------
# Exact T-step model likelihood and negative ELBO.


def model_probs_discrete(kernel, denoise, num_steps):
  """p(x) of the T-step ancestral sampler for every x in DATA, by chaining reverse transitions.

  Returns (p over DATA, total mass the model puts on all states at t = 0).
  """
  v = kernel.input_vocab_size
  z = all_states(v)
  s_idx = np.arange(len(z))
  p = q_marginal(kernel, np.zeros(L, np.int32), 1.0)  # the prior: q(z_1 | x) ignores x
  for i in range(num_steps, 0, -1):
    t, s = i / num_steps, (i - 1) / num_steps
    log_x = jnp.asarray(denoise(z, t), jnp.float32)
    step = np.exp(np.asarray(posterior_log_probs(kernel, jnp.asarray(z), log_x, s, t),
                             np.float64))  # [S, L, v]: p(z_s,l = j | z_t)
    # trans[a, b] = Π_l step[a, l, z_b,l] (the reverse step is factorised over positions).
    trans = np.prod(step[s_idx[:, None, None], np.arange(L)[None, None], z[None]], axis=-1)
    p = p @ trans
  return p[state_index(DATA, v)], p.sum()


def neg_elbo_discrete(kernel, denoise, x, num_steps):
  """Σ_i Σ_{z_{t_i}} q(z_{t_i} | x) KL(q(z_{t_{i−1}} | z_{t_i}, x) ‖ p(z_{t_{i−1}} | z_{t_i}))."""
  z = all_states(kernel.input_vocab_size)
  total = 0.0
  for i in range(1, num_steps + 1):
    t = i / num_steps
    qz = q_marginal(kernel, x, t)
    n = len(z)
    terms = np.asarray(discrete_elbo(
        kernel, jnp.asarray(denoise(z, t), jnp.float32), jnp.asarray(np.tile(x, (n, 1))),
        jnp.asarray(z), jnp.full((n,), i, jnp.int32), num_steps), np.float64)
    assert np.all(np.isfinite(terms[qz > 0]))
    # discrete_elbo returns T · KL_i (an estimator from one uniformly drawn i): divide by T.
    total += float(np.sum(np.where(qz > 0, qz * terms, 0.0))) / num_steps
  return total


@pytest.mark.parametrize("kind,schedule", KIND_SCHEDULES)
def test_discrete_elbo_bounds_exact_likelihood_of_random_denoiser(kind, schedule):
  kernel = forward_process.ForwardProcess(kind, K, schedule)
  v = kernel.input_vocab_size
  rng = np.random.default_rng(0)
  table = 2.0 * rng.normal(size=(T + 1, v**L, L, K))
  denoise = table_denoiser(table, v, time_dependent=True)
  p_model, total = model_probs_discrete(kernel, denoise, T)
  np.testing.assert_allclose(total, 1.0, atol=1e-5)  # the sampler never ends on MASK
  np.testing.assert_allclose(p_model.sum(), 1.0, atol=1e-5)
  gaps = []
  for x, px in zip(DATA, p_model, strict=True):
    gap = neg_elbo_discrete(kernel, denoise, x, T) - (-math.log(px))
    assert gap >= -1e-5, (x, gap)
    gaps.append(gap)
  assert max(gaps) > 1e-2  # a random time-dependent model is far from tight


@pytest.mark.parametrize("kind,schedule", KIND_SCHEDULES)
def test_discrete_elbo_is_tight_for_exact_posterior_of_product_data(kind, schedule):
  kernel = forward_process.ForwardProcess(kind, K, schedule)
  denoise = bayes_denoiser(kernel)
  p_model, _ = model_probs_discrete(kernel, denoise, T)
  np.testing.assert_allclose(p_model, np.prod(P_DATA[np.arange(L), DATA], axis=1), atol=1e-6)
  for x in DATA:
    np.testing.assert_allclose(neg_elbo_discrete(kernel, denoise, x, T), -log_p_data(x),
                               atol=1e-5, err_msg=str(x))


def test_discrete_elbo_first_step_is_reconstruction():
  """At t_index = 1 the posterior is x itself, so T · KL = T · Σ_i −log x̂_i[x_i]."""
  kernel = forward_process.ForwardProcess("uniform", K)
  rng = np.random.default_rng(1)
  log_x = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(5, L, K)), jnp.float32))
  x = jnp.asarray(rng.integers(0, K, (5, L)), jnp.int32)
  z = jnp.asarray(rng.integers(0, K, (5, L)), jnp.int32)
  got = discrete_elbo(kernel, log_x, x, z, jnp.ones((5,), jnp.int32), T)
  want = -T * np.take_along_axis(np.asarray(log_x), np.asarray(x)[..., None], -1)[..., 0].sum(-1)
  np.testing.assert_allclose(got, want, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Masked continuous-time ELBO with a time-independent denoiser = any-order autoregressive model.


def neg_elbo_masked_continuous(kernel, denoise, x, num_nodes=48):
  """∫_0^1 E_{z_t ~ q(·|x)}[masked_elbo] dt by Gauss–Legendre quadrature over t and exact z_t."""
  nodes, weights = np.polynomial.legendre.leggauss(num_nodes)
  ts, ws = 0.5 * (nodes + 1.0), 0.5 * weights
  z = all_states(K + 1)
  n = len(z)
  q = np.stack([q_marginal(kernel, x, t) for t in ts])  # [nodes, S]
  log_x = jnp.asarray(np.tile(denoise(z, None), (num_nodes, 1, 1)), jnp.float32)
  vals = masked_elbo(kernel, log_x, jnp.asarray(np.tile(x, (num_nodes * n, 1))),
                            jnp.asarray(np.tile(z, (num_nodes, 1))),
                            jnp.asarray(np.repeat(ts, n), jnp.float32))
  vals = np.asarray(vals, np.float64).reshape(num_nodes, n)
  vals = np.where(q > 0, vals, 0.0)
  return float(np.sum(ws[:, None] * q * vals))


def any_order_log_probs(denoise, x):
  """(log p(x), order-averaged log p) of the any-order AR model defined by a masked denoiser."""
  m = K  # MASK id
  both = denoise(np.array([[m, m]]), None)[0]
  second_given_first = denoise(np.array([[x[0], m]]), None)[0, 1, x[1]]
  first_given_second = denoise(np.array([[m, x[1]]]), None)[0, 0, x[0]]
  order_01 = both[0, x[0]] + second_given_first
  order_10 = both[1, x[1]] + first_given_second
  return np.logaddexp(order_01, order_10) - math.log(2.0), 0.5 * (order_01 + order_10)


def random_masked_denoiser(seed):
  table = 2.0 * np.random.default_rng(seed).normal(size=((K + 1)**L, L, K))
  return table_denoiser(table, K + 1, time_dependent=False)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_masked_continuous_elbo_is_order_averaged_nll_and_bounds_likelihood(schedule):
  kernel = forward_process.ForwardProcess("masked", K, schedule)
  denoise = random_masked_denoiser(2)
  probs, gaps = [], []
  for x in DATA:
    log_p, avg_log_p = any_order_log_probs(denoise, x)
    neg_elbo = neg_elbo_masked_continuous(kernel, denoise, x)
    np.testing.assert_allclose(neg_elbo, -avg_log_p, rtol=2e-6, atol=2e-5, err_msg=str(x))
    assert neg_elbo >= -log_p - 1e-5
    probs.append(math.exp(log_p))
    gaps.append(neg_elbo + log_p)
  np.testing.assert_allclose(sum(probs), 1.0, atol=1e-5)  # p is a distribution over DATA
  assert max(gaps) > 1e-2


def test_masked_continuous_elbo_is_schedule_invariant():
  denoise = random_masked_denoiser(3)
  for x in DATA[::2]:
    lin = neg_elbo_masked_continuous(forward_process.ForwardProcess("masked", K, "linear"),
                                     denoise, x)
    cos = neg_elbo_masked_continuous(forward_process.ForwardProcess("masked", K, "cosine"),
                                     denoise, x)
    np.testing.assert_allclose(lin, cos, rtol=1e-5)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_masked_continuous_elbo_is_tight_for_exact_posterior(schedule):
  kernel = forward_process.ForwardProcess("masked", K, schedule)
  bayes = bayes_denoiser(kernel)
  denoise = lambda z, t: bayes(z, 0.5)  # for masked product data E[x_i | z_t] ignores t
  for x in DATA:
    log_p, _ = any_order_log_probs(denoise, x)
    np.testing.assert_allclose(log_p, log_p_data(x), atol=1e-5)
    np.testing.assert_allclose(neg_elbo_masked_continuous(kernel, denoise, x), -log_p_data(x),
                               atol=1e-5, err_msg=str(x))


# ------------------------------------------------------------------------------------------------
# diffusion_loss: its Monte Carlo mean is the exact ELBO.


def masked_table_apply(params, tokens, t):
  del t  # time-independent
  return params[state_index(tokens, K + 1)]


def uniform_table_apply(params, tokens, t):
  t_index = jnp.round(t * T).astype(jnp.int32)
  return params[t_index, state_index(tokens, K)]


@pytest.mark.parametrize("kind,schedule", [
    ("uniform", "linear"),
    ("masked", "cosine"),
    pytest.param("uniform", "cosine", marks=pytest.mark.slow),
    pytest.param("masked", "linear", marks=pytest.mark.slow),
])
def test_diffusion_loss_monte_carlo_mean_matches_exact_elbo(kind, schedule):
  kernel = forward_process.ForwardProcess(kind, K, schedule)
  rng = np.random.default_rng(4)
  if kernel.is_masked:
    table = 1.5 * rng.normal(size=((K + 1)**L, L, K))
    apply_fn = masked_table_apply
    denoise = table_denoiser(table, K + 1, time_dependent=False)
    exact = np.array([neg_elbo_masked_continuous(kernel, denoise, x) for x in DATA])
  else:
    table = 1.5 * rng.normal(size=(T + 1, K**L, L, K))
    apply_fn = uniform_table_apply
    denoise = table_denoiser(table, K, time_dependent=True)
    exact = np.array([neg_elbo_discrete(kernel, denoise, x, T) for x in DATA])

  repeats, num_keys = 16, 400
  xb = jnp.asarray(np.tile(DATA, (repeats, 1)))  # every x, repeated; row r is DATA[r % 9]
  params = jnp.asarray(table, jnp.float32)
  loss = jax.jit(jax.vmap(lambda k: elbo.diffusion_loss(k, params, apply_fn, kernel, xb, T)))
  vals = np.asarray(loss(jax.random.split(jax.random.key(0), num_keys)), np.float64)
  assert vals.shape == (num_keys, repeats * len(DATA)) and np.all(np.isfinite(vals))
  # Per key, average the repeats of each x (they share the antithetic offset, not i.i.d.).
  per_key = vals.reshape(num_keys, repeats, len(DATA)).mean(1)
  mean, se = per_key.mean(0), per_key.std(0, ddof=1) / math.sqrt(num_keys)
  assert np.all(se < 0.05 * exact)  # the comparison has power
  z = (mean - exact) / se
  assert np.all(np.abs(z) < 4.5), (mean, exact, z)
  batch_mean = per_key.mean(1)
  z_all = (batch_mean.mean() - exact.mean()) / (batch_mean.std(ddof=1) / math.sqrt(num_keys))
  assert abs(z_all) < 4.5


# ------------------------------------------------------------------------------------------------
# Small helpers.


def test_antithetic_times_are_stratified_in_unit_interval():
  b = 7
  times = np.asarray(jax.vmap(lambda k: elbo.antithetic_times(k, b))(
      jax.random.split(jax.random.key(5), 4000)))
  assert times.shape == (4000, b)
  assert np.all(times >= 0.0) and np.all(times < 1.0)
  # One time in every stratum [i / b, (i + 1) / b), all with the same offset.
  strata = np.sort(np.floor(times * b).astype(int), axis=1)
  np.testing.assert_array_equal(strata, np.tile(np.arange(b), (4000, 1)))
  offsets = np.sort(times, axis=1) - np.arange(b) / b
  np.testing.assert_allclose(offsets, offsets[:, :1].repeat(b, 1), atol=1e-6)
  # The offset is uniform on [0, 1 / b): marginally t ~ U(0, 1).
  assert abs(times.mean() - 0.5) < 0.01
  hist = np.histogram(offsets[:, 0] * b, bins=10, range=(0, 1))[0]
  assert np.all(np.abs(hist - 400) < 5 * math.sqrt(400))


def test_bits_per_token():
  np.testing.assert_allclose(elbo.bits_per_token(jnp.float32(3.0 * 8 * math.log(2.0)), 8), 3.0,
                             rtol=1e-6)
  np.testing.assert_allclose(elbo.bits_per_token(jnp.array([1.0, 2.0]) * 10, 10),
                             np.array([1.0, 2.0]) / math.log(2.0), rtol=1e-6)
