"""Tests for `dmmd_jax.sampling`: statistics of the ancestral sampler and its options.

The "denoisers" here are tiny hand-written `apply_fn(params, tokens, t, noise)` functions (module
level, so hashable jit static arguments); some record what the sampler feeds them through
`jax.debug.callback`, which runs only when the network is really called (also inside `lax.cond`).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmmd_jax.diffusion import forward_process, sampling, schedules
from dmmd_jax.diffusion.sampling import SamplerConfig

# ------------------------------------------------------------------------------------------------
# Denoisers and recorders.

_CALLS = []  # (t, tokens, noise) of every network call, appended by the debug callbacks


def _record(tokens, t, noise=None):
  # Callers cast floats to float32 inside the trace: the sampler runs with x64 enabled, and a
  # debug callback that runs after `sample` has left the x64 context receives float32 or float64
  # depending on timing, so uncast recordings would not be comparable between runs.
  _CALLS.append((float(np.asarray(t)[0]), np.asarray(tokens),
                 None if noise is None else np.asarray(noise)))


def recorded_calls():
  """The recorded calls, in sampling order (t decreasing), then clears the record."""
  jax.effects_barrier()
  calls = sorted(_CALLS, key=lambda c: -c[0])
  _CALLS.clear()
  return calls


def const_apply(params, tokens, t, noise):
  """Returns the given logits (`[K]` or `[length, K]`) for every sequence of the batch."""
  del t, noise
  return jnp.broadcast_to(params, tokens.shape + params.shape[-1:]).astype(jnp.float32)


def recording_apply(params, tokens, t, noise):
  """Token-dependent logits (own and left neighbour's embedding); records every call."""
  del noise
  jax.debug.callback(_record, tokens, t.astype(jnp.float32))
  emb = params[tokens]  # params: [input_vocab, K]
  return (emb + jnp.roll(emb, 1, axis=1)).astype(jnp.float32)


def uniform_posterior_apply(params, tokens, t, noise):
  """Exact E[x_i | z_t] of product data, log p_i = params `[length, K]`, uniform kernel (linear):
  x̂_i(c) ∝ p_i(c) (α_t δ_{c z_i} + (1 − α_t) / K)."""
  del noise
  k = params.shape[-1]
  alpha = (1.0 - t)[:, None, None]
  lik = alpha * jax.nn.one_hot(tokens, k) + (1.0 - alpha) / k
  return (params[None] + jnp.log(lik)).astype(jnp.float32)


def masked_posterior_apply(params, tokens, t, noise):
  """Exact E[x_i | z_t] of product data, masked kernel: p_i at MASK, else a copy of the token."""
  del t, noise
  k = params.shape[-1]
  copied = forward_process.log_one_hot(jnp.minimum(tokens, k - 1), k)
  return jnp.where((tokens == k)[..., None], params[None], copied).astype(jnp.float32)


def noise_fn(key, batch_size):
  return jax.random.normal(key, (batch_size, 6))


def noise_apply(params, tokens, t, noise):
  """Logits that depend on the student noise `[batch, length]`; records every call."""
  jax.debug.callback(_record, tokens, t.astype(jnp.float32), noise.astype(jnp.float32))
  k = params.shape[-1]
  return (params + 3.0 * noise[..., None] * jnp.arange(k)).astype(jnp.float32)


def counts_of(tokens, num_classes):
  return np.bincount(np.asarray(tokens).ravel(), minlength=num_classes)


def assert_binomial(counts, probs, n, z_max=5.0):
  """Per-token binomial z-tests and a chi-square test of counts against probs."""
  probs = np.asarray(probs, np.float64)
  assert counts.sum() == n
  expected = n * probs
  z = (counts - expected) / np.sqrt(np.maximum(expected * (1 - probs), 1e-12))
  assert np.all(np.abs(z[probs > 0]) < z_max), (counts, expected, z)
  assert np.all(counts[probs == 0] == 0), counts
  support = probs > 0
  chi2 = np.sum((counts[support] - expected[support])**2 / expected[support])
  df = support.sum() - 1
  assert chi2 < df + 6 * math.sqrt(2 * df) + 10, (chi2, df)


# ------------------------------------------------------------------------------------------------
# Statistics of the categorical draws.


RARE_DRAWS = (1000, 200)  # batch, length: 2e5 draws


def test_one_step_sampler_matches_softmax_including_rare_tokens():
  probs = np.array([1e-4, 0.15, 0.25, 0.6 - 1e-4])
  kernel = forward_process.ForwardProcess("masked", 4)
  cfg = SamplerConfig(steps=1, float64=True)
  out = sampling.sample(jax.random.key(0), const_apply, jnp.log(jnp.asarray(probs, jnp.float32)),
                        kernel, cfg, *RARE_DRAWS)
  assert out.shape == RARE_DRAWS and out.dtype == jnp.int32
  counts = counts_of(out, kernel.input_vocab_size)
  n = out.size
  assert_binomial(counts, np.append(probs, [0.0] * (kernel.input_vocab_size - 4)), n)
  # The rare token: expected n · 1e-4 = 20; Poisson(20) is in [5, 40] with prob 1 − 4e-5.
  assert 5 <= counts[0] <= 40, counts


@pytest.mark.parametrize("float64", [True, False])
def test_one_step_sampler_unbiased_for_moderate_probabilities(float64):
  probs = np.array([0.1, 0.2, 0.3, 0.4])
  kernel = forward_process.ForwardProcess("masked", 4)
  cfg = SamplerConfig(steps=1, float64=float64)
  out = sampling.sample(jax.random.key(1), const_apply, jnp.log(jnp.asarray(probs, jnp.float32)),
                        kernel, cfg, *RARE_DRAWS)  # same shapes as above: one compile fewer
  assert_binomial(counts_of(out, 5), np.append(probs, 0.0), out.size)


def test_one_step_sampler_applies_temperature_then_top_p():
  probs = np.array([0.1, 0.2, 0.3, 0.4])
  logits = jnp.log(jnp.asarray(probs, jnp.float32))
  kernel = forward_process.ForwardProcess("uniform", 4)
  # Temperature 2: softmax(logits / 2) ∝ sqrt(p) ≈ [0.16, 0.23, 0.28, 0.33]. Top-p 0.65 of that
  # keeps the top three (0.28 + 0.33 < 0.65); applied before the temperature it would keep two
  # (0.3 + 0.4 ≥ 0.65). Kept tokens are renormalised.
  cfg = SamplerConfig(steps=1, temperature=2.0, top_p=0.65)
  out = sampling.sample(jax.random.key(2), const_apply, logits, kernel, cfg, 400, 100)
  tempered = np.sqrt(probs) * np.array([0, 1, 1, 1])
  assert_binomial(counts_of(out, 4), tempered / tempered.sum(), out.size)


# ------------------------------------------------------------------------------------------------
# Top-p and logit adjustments (jitted: eager fori_loop recompiles its body at every call).

top_p_keep = jax.jit(sampling.top_p_keep)
# Temperature stays a traced argument; top_p, mode and Δ select code paths (static).
adjust_logits = jax.jit(sampling.adjust_logits, static_argnums=(2, 3, 4))


def brute_force_nucleus(logits, top_p):
  """Sort-based nucleus per row; also returns rows whose cut is numerically ambiguous."""
  probs = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1), np.float64)
  keep = np.zeros(probs.shape, bool)
  ambiguous = np.zeros(probs.shape[0], bool)
  for r, p in enumerate(probs):
    order = np.argsort(-p, kind="stable")
    cum = np.cumsum(p[order])
    m = int(np.argmax(cum >= top_p)) if cum[-1] >= top_p else len(p) - 1
    keep[r] = p >= p[order[m]]
    ambiguous[r] = abs(cum[m] - top_p) < 2e-6 or (m > 0 and abs(cum[m - 1] - top_p) < 2e-6)
  return keep, ambiguous, probs


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.85, 0.95, 0.999])
def test_top_p_keep_matches_sort_based_nucleus(top_p):
  logits = 2.0 * np.random.default_rng(0).normal(size=(300, 40)).astype(np.float32)
  keep = np.asarray(top_p_keep(jnp.asarray(logits), top_p))
  want, ambiguous, probs = brute_force_nucleus(logits, top_p)
  assert ambiguous.mean() < 0.05
  np.testing.assert_array_equal(keep[~ambiguous], want[~ambiguous])
  # Smallest set with mass ≥ top_p: dropping its least likely member goes below top_p.
  mass = np.where(keep, probs, 0.0).sum(-1)
  smallest = np.where(keep, probs, np.inf).min(-1)
  ok = ~ambiguous
  assert np.all(mass[ok] >= top_p) and np.all(mass[ok] - smallest[ok] < top_p)


def test_top_p_keep_edge_cases():
  logits = jnp.array([[1.0, 1.0, 1.0, 0.0], [5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
  keep = np.asarray(top_p_keep(logits, 0.5))
  np.testing.assert_array_equal(keep[0], [True, True, True, False])  # ties at the cut all kept
  np.testing.assert_array_equal(keep[1], [True, False, False, False])  # top token alone ≥ p
  np.testing.assert_array_equal(keep[2], [True] * 4)
  np.testing.assert_array_equal(top_p_keep(logits, 1.0), np.ones((3, 4), bool))


def test_adjust_logits_temperature_and_hard_soft_top_p():
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(50, 12)), jnp.float32)
  np.testing.assert_allclose(adjust_logits(logits, 0.5), logits / 0.5, rtol=1e-6)
  np.testing.assert_array_equal(adjust_logits(logits), logits)
  for temperature in (1.0, 0.7):
    tempered = logits / temperature
    keep = np.asarray(top_p_keep(tempered, 0.8))  # top-p acts on the tempered distribution
    assert keep.any(-1).all() and not keep.all()
    hard = np.asarray(adjust_logits(logits, temperature, 0.8, "hard"))
    np.testing.assert_allclose(hard[keep], np.asarray(tempered)[keep], rtol=1e-6)
    assert np.all(hard[~keep] == forward_process.NEG_INF)
    for delta in (2.0, 3.5):
      soft = np.asarray(adjust_logits(logits, temperature, 0.8, "soft", delta))
      np.testing.assert_allclose(soft[keep], np.asarray(tempered)[keep], rtol=1e-6)
      np.testing.assert_allclose(soft[~keep], np.asarray(tempered)[~keep] - delta, rtol=1e-6,
                                 atol=1e-6)
  with pytest.raises(ValueError, match="top_p_mode"):
    sampling.adjust_logits(logits, 1.0, 0.5, "medium")


@pytest.mark.parametrize("cfg,match", [
    (SamplerConfig(steps=0), "steps"),
    (SamplerConfig(steps=2, temperature=0.0), "temperature"),
    (SamplerConfig(steps=2, top_p=0.0), "top_p"),
    (SamplerConfig(steps=2, top_p=1.5), "top_p"),
    (SamplerConfig(steps=2, grid="log"), "grid"),
])
def test_sampler_config_validation(cfg, match):
  with pytest.raises(ValueError, match=match):
    sampling.sample(jax.random.key(0), const_apply, jnp.zeros(3),
                    forward_process.ForwardProcess("masked", 3),
                    cfg, 1, 2)


# ------------------------------------------------------------------------------------------------
# Masked / uniform trajectories, determinism, compilation.


# Shared settings (shared jit compiles): a masked run with many small steps on few positions, so
# that some steps change nothing (for the cache), and a uniform run on the cosine grid.
MASKED_K, MASKED_STEPS, MASKED_SHAPE = 4, 16, (2, 6)
UNIFORM_K, UNIFORM_STEPS, UNIFORM_SHAPE = 5, 5, (16, 12)


def sample_masked(seed, cache=False):
  kernel = forward_process.ForwardProcess("masked", MASKED_K)
  params = jnp.asarray(np.random.default_rng(2).normal(size=(MASKED_K + 1, MASKED_K)), jnp.float32)
  out = sampling.sample(jax.random.key(seed), recording_apply, params, kernel,
                        SamplerConfig(steps=MASKED_STEPS, cache=cache), *MASKED_SHAPE)
  return np.asarray(out)


def sample_uniform(seed):
  kernel = forward_process.ForwardProcess("uniform", UNIFORM_K, "cosine")
  params = jnp.asarray(np.random.default_rng(3).normal(size=(UNIFORM_K, UNIFORM_K)), jnp.float32)
  out = sampling.sample(jax.random.key(seed), recording_apply, params, kernel,
                        SamplerConfig(steps=UNIFORM_STEPS, grid="cosine"), *UNIFORM_SHAPE)
  return np.asarray(out)


def test_masked_sampler_never_changes_unmasked_positions_and_ends_unmasked():
  mask_id = MASKED_K
  recorded_calls()
  out = sample_masked(4)
  calls = recorded_calls()
  ts = np.array([c[0] for c in calls])
  np.testing.assert_allclose(ts, np.asarray(schedules.time_grid(MASKED_STEPS))[:-1], atol=1e-6)
  traj = [c[1] for c in calls] + [out]
  assert np.all(traj[0] == mask_id)  # starts from the prior
  for prev, nxt in zip(traj[:-1], traj[1:], strict=True):
    unmasked = prev != mask_id
    np.testing.assert_array_equal(nxt[unmasked], prev[unmasked])
  middle = traj[MASKED_STEPS // 2]
  assert 0 < np.mean(middle == mask_id) < 1  # the trajectory is not trivial
  assert out.min() >= 0 and out.max() < MASKED_K  # no MASK left


def test_unmasking_order_is_the_step_that_revealed_each_position():
  kernel = forward_process.ForwardProcess("masked", MASKED_K)
  params = jnp.asarray(np.random.default_rng(2).normal(size=(MASKED_K + 1, MASKED_K)), jnp.float32)
  cfg = SamplerConfig(steps=MASKED_STEPS)
  recorded_calls()
  out, order = sampling.sample(jax.random.key(4), recording_apply, params, kernel, cfg,
                               *MASKED_SHAPE, return_order=True)
  traj = [c[1] for c in recorded_calls()] + [np.asarray(out)]
  # Brute force from the trajectory: step i maps traj[i] to traj[i + 1].
  revealed = np.stack([(a == MASKED_K) & (b != MASKED_K)
                       for a, b in zip(traj[:-1], traj[1:], strict=True)])
  assert np.all(revealed.sum(axis=0) == 1)  # every position is revealed exactly once
  np.testing.assert_array_equal(order, np.argmax(revealed, axis=0))
  assert len(np.unique(order)) > 2  # a real spread over the steps
  np.testing.assert_array_equal(out, sample_masked(4))  # the order changes no token
  recorded_calls()


def test_unmasking_order_frequencies_follow_the_schedule_and_prompts_are_minus_one():
  """P(position revealed in step i) = α(t_{i+1}) − α(t_i) for a masked kernel, any denoiser."""
  kernel = forward_process.ForwardProcess("masked", 3, "cosine")
  steps, batch, length = 4, 4000, 8
  fixed = jnp.zeros((1, length), bool).at[0, 0].set(True)
  _, order = sampling.sample(jax.random.key(5), const_apply, jnp.zeros(3), kernel,
                             SamplerConfig(steps=steps), batch, length, fixed=fixed,
                             fixed_tokens=jnp.zeros((batch, length), jnp.int32),
                             return_order=True)
  order = np.asarray(order)
  assert np.all(order[:, 0] == -1)
  alpha = np.asarray(schedules.alpha(schedules.time_grid(steps), "cosine"), np.float64)
  assert_binomial(np.bincount(order[:, 1:].ravel(), minlength=steps), np.diff(alpha),
                  batch * (length - 1))


def test_unmasking_order_needs_a_masked_kernel():
  kernel = forward_process.ForwardProcess("uniform", 3)
  with pytest.raises(ValueError, match="masked kernel"):
    sampling.sample(jax.random.key(0), const_apply, jnp.zeros(3), kernel, SamplerConfig(steps=2),
                    2, 4, return_order=True)


def test_uniform_sampler_ids_in_range_and_grid():
  recorded_calls()
  out = sample_uniform(5)
  calls = recorded_calls()
  np.testing.assert_allclose([c[0] for c in calls],
                             np.asarray(schedules.time_grid(UNIFORM_STEPS, "cosine"))[:-1],
                             atol=1e-6)
  assert len(np.unique(calls[0][1])) == UNIFORM_K  # uniform prior noise, not all one token
  assert out.dtype == np.int32 and out.min() >= 0 and out.max() < UNIFORM_K
  assert len(np.unique(out)) > 1


@pytest.mark.parametrize("draw", [sample_masked, sample_uniform])
def test_sampler_is_deterministic_per_key(draw):
  a, b, c = draw(6), draw(6), draw(7)
  recorded_calls()
  np.testing.assert_array_equal(a, b)
  assert np.mean(a != c) > 0.3


def test_sampler_compiles_once_per_configuration():
  if not hasattr(sampling._jitted_sampler, "_cache_size"):
    pytest.skip("jit cache size not exposed by this JAX version")
  cache_size = sampling._jitted_sampler._cache_size
  before = cache_size()
  sample_masked(0)
  after_first = cache_size()
  assert after_first <= before + 1  # + 0 if an earlier test compiled this configuration
  sample_masked(1)
  sample_masked(2)
  recorded_calls()
  assert cache_size() == after_first  # new keys reuse the compile


@pytest.mark.parametrize("kind", ["masked", "uniform"])
def test_multi_step_sampler_with_exact_posterior_reproduces_product_data(kind):
  p_data = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.05, 0.5, 0.45]])
  k = p_data.shape[1]
  kernel = forward_process.ForwardProcess(kind, k)
  apply_fn = masked_posterior_apply if kind == "masked" else uniform_posterior_apply
  out = np.asarray(sampling.sample(jax.random.key(8), apply_fn,
                                   jnp.log(jnp.asarray(p_data, jnp.float32)), kernel,
                                   SamplerConfig(steps=4), 4000, 3))
  for pos in range(3):
    assert_binomial(counts_of(out[:, pos], kernel.input_vocab_size),
                    np.append(p_data[pos], [0.0] * (kernel.input_vocab_size - k)), len(out))
  # The exact reverse process of product data keeps positions independent.
  joint = np.bincount(out[:, 0] * k + out[:, 1], minlength=k * k)
  assert_binomial(joint, np.outer(p_data[0], p_data[1]).ravel(), len(out))


def posterior_apply_in_t_dtype(params, tokens, t, noise):
  """`uniform_posterior_apply` without the final float32 cast: logits follow t's dtype."""
  del noise
  k = params.shape[-1]
  alpha = (1.0 - t)[:, None, None]
  return params[None] + jnp.log(alpha * jax.nn.one_hot(tokens, k, dtype=t.dtype) + (1 - alpha) / k)


def test_sampler_accepts_logits_in_the_dtype_of_t():
  """With float64=True the sampler hands apply_fn a float64 t; logits computed from it are
  float64, which the sampler must accept (the teacher's Bayes denoiser of product data)."""
  kernel = forward_process.ForwardProcess("uniform", 3)
  log_p = jnp.log(jnp.asarray([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]], jnp.float32))
  out = sampling.sample(jax.random.key(12), posterior_apply_in_t_dtype, log_p, kernel,
                        SamplerConfig(steps=2), 4, 2)
  assert out.shape == (4, 2) and out.min() >= 0 and out.max() < 3


# ------------------------------------------------------------------------------------------------
# Cache and student noise.


def test_cache_gives_identical_output_with_fewer_network_calls():
  recorded_calls()
  plain = sample_masked(9, cache=False)
  plain_calls = recorded_calls()
  cached = sample_masked(9, cache=True)
  cached_calls = recorded_calls()
  np.testing.assert_array_equal(plain, cached)
  assert len(plain_calls) == MASKED_STEPS
  # The network is needed at the first step and whenever z changed since the previous step.
  states = [c[1] for c in plain_calls]
  distinct = [states[0]] + [b for a, b in zip(states[:-1], states[1:], strict=True)
                            if not np.array_equal(a, b)]
  assert len(cached_calls) == len(distinct) < MASKED_STEPS
  # ... and it is called on exactly those states.
  for got, want in zip([c[1] for c in cached_calls], distinct, strict=True):
    np.testing.assert_array_equal(got, want)


def test_student_noise_is_fresh_at_every_step():
  kernel = forward_process.ForwardProcess("masked", 4)
  params = jnp.zeros((4,), jnp.float32)
  steps = 3
  recorded_calls()
  # cache=True must be ignored with noise: every step sees new noise, so the input changed.
  cfg = SamplerConfig(steps=steps, cache=True)
  out_a = sampling.sample(jax.random.key(10), noise_apply, params, kernel, cfg, 8, 6,
                          noise_fn=noise_fn)
  calls_a = recorded_calls()
  noise_a = [c[2] for c in calls_a]
  out_b = sampling.sample(jax.random.key(10), noise_apply, params, kernel, cfg, 8, 6,
                          noise_fn=noise_fn)
  noise_b = [c[2] for c in recorded_calls()]
  sampling.sample(jax.random.key(11), noise_apply, params, kernel, cfg, 8, 6, noise_fn=noise_fn)
  noise_c = [c[2] for c in recorded_calls()]
  assert len(noise_a) == steps
  for n in noise_a:
    assert n.shape == (8, 6) and 0.3 < n.std() < 3.0
  for i in range(steps):
    for j in range(i + 1, steps):
      assert not np.allclose(noise_a[i], noise_a[j])  # fresh per step
    assert not np.allclose(noise_a[i][0], noise_a[i][1])  # and per sequence
    np.testing.assert_array_equal(noise_a[i], noise_b[i])  # deterministic per key
    assert not np.allclose(noise_a[i], noise_c[i])
  np.testing.assert_array_equal(out_a, out_b)
  # The output follows the noise of the step that unmasked each position: with logits 3 · ε · c,
  # ε > 1 favours the last id and ε < −1 the first.
  traj = np.stack([c[1] for c in calls_a] + [np.asarray(out_a)])  # [steps + 1, batch, length]
  is_mask = traj == kernel.mask_id
  step_of = np.argmax(is_mask[:-1] & ~is_mask[1:], axis=0)  # [batch, length]
  assert np.all((is_mask[:-1] & ~is_mask[1:]).sum(0) == 1)
  eps = np.take_along_axis(np.stack(noise_a), step_of[None], axis=0)[0]
  out_a = np.asarray(out_a)
  assert np.sum(eps > 1.0) > 3 and np.sum(eps < -1.0) > 3
  assert np.mean(out_a[eps > 1.0] == 3) > 0.8
  assert np.mean(out_a[eps < -1.0] == 0) > 0.8
