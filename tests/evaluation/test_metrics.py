"""Tests of the evaluation metrics against brute force and known distributions."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.stats
from jax.flatten_util import ravel_pytree

from dmmd_jax.evaluation import metrics as metrics_lib
from dmmd_jax.models import reference_lm
from dmmd_jax.training import reference_lm_run

KERNELS = [
    metrics_lib.SequenceKernel("hamming"),
    metrics_lib.SequenceKernel("ngram", max_ngram=2, num_buckets=64),
    metrics_lib.SequenceKernel("ngram", max_ngram=3, num_buckets=64, feature_kernel="gaussian",
                           sigma=0.7),
]
VOCAB = 8


def markov(rng, num, length, vocab=VOCAB):
  """x_{i+1} = x_i + (1 or 2) mod vocab, x_0 uniform: uniform marginals, correlated neighbours."""
  steps = rng.integers(1, 3, (num, length - 1))
  start = rng.integers(0, vocab, (num, 1))
  return (np.concatenate([start, start + np.cumsum(steps, axis=1)], axis=1) % vocab).astype(
      np.int32)


def iid_uniform(rng, num, length, vocab=VOCAB):
  """Same per-position marginals as `markov`, no correlations."""
  return rng.integers(0, vocab, (num, length)).astype(np.int32)


def dense_mmd2(x, y, kernel):
  n, m = len(x), len(y)
  k = np.asarray(metrics_lib.kernel_matrix(*(np.concatenate([x, y]),) * 2, kernel), np.float64)
  kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
  return ((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
          - 2.0 * kxy.mean())


# --------------------------------------------------------------------------------- kernel MMD²


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: f"{k.kind}-{k.feature_kernel}")
@pytest.mark.parametrize("block_size", [5, 64])
def test_mmd2_blockwise_equals_dense(kernel, block_size):
  rng = np.random.default_rng(0)
  x, y = markov(rng, 23, 12), iid_uniform(rng, 17, 12)
  np.testing.assert_allclose(metrics_lib.mmd2(x, y, kernel, block_size), dense_mmd2(x, y, kernel),
                             atol=1e-5, rtol=1e-5)


def test_hamming_kernel_formula():
  x = np.array([[0, 1, 2, 3], [0, 1, 5, 5]])
  k = metrics_lib.kernel_matrix(x, x, metrics_lib.SequenceKernel("hamming", bandwidth=0.25))
  np.testing.assert_allclose(k, [[1.0, np.exp(-2.0)], [np.exp(-2.0), 1.0]], rtol=1e-6)


def test_ngram_features():
  rng = np.random.default_rng(0)
  x = iid_uniform(rng, 5, 20, vocab=50)
  feats = metrics_lib.ngram_features(x, 3, 128)
  assert feats.shape == (5, 128)
  np.testing.assert_allclose(jnp.linalg.norm(feats, axis=1), 1.0, rtol=1e-6)
  # Unigram profiles ignore order; bigram profiles do not.
  shuffled = x[:, rng.permutation(20)]
  np.testing.assert_allclose(metrics_lib.ngram_features(shuffled, 1, 128),
                             metrics_lib.ngram_features(x, 1, 128), rtol=1e-6)
  assert not np.allclose(metrics_lib.ngram_features(shuffled, 2, 128), feats)


@pytest.mark.parametrize("kernel", KERNELS[:2], ids=lambda k: k.kind)
def test_mmd2_permutation_invariant_and_symmetric(kernel):
  rng = np.random.default_rng(1)
  x, y = markov(rng, 23, 12), iid_uniform(rng, 17, 12)  # Shapes as above: no recompilation.
  value = metrics_lib.mmd2(x, y, kernel, 5)
  np.testing.assert_allclose(metrics_lib.mmd2(x[rng.permutation(23)], y[rng.permutation(17)],
                                          kernel, 5), value, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics_lib.mmd2(y, x, kernel, 5), value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel", KERNELS[:2], ids=lambda k: k.kind)
def test_mmd2_same_vs_different_distribution(kernel):
  rng = np.random.default_rng(2)
  x, x2, y = markov(rng, 200, 16), markov(rng, 200, 16), iid_uniform(rng, 200, 16)
  same, same_se = metrics_lib.mmd2_with_stderr(x, x2, kernel, 64)
  diff, diff_se = metrics_lib.mmd2_with_stderr(x, y, kernel, 64)
  assert abs(same) < 3.0 * same_se
  # The two sources differ only in correlations between positions.
  assert diff > 5.0 * diff_se and diff > 10.0 * abs(same)


def test_mmd2_unbiased_and_stderr_calibrated():
  rng = np.random.default_rng(3)
  num_sets, n = 300, 12
  xs = markov(rng, num_sets * n, 10).reshape(num_sets, n, 10)
  ys = markov(rng, num_sets * n, 10).reshape(num_sets, n, 10)
  values = np.asarray(metrics_lib.mmd2_over_sets(xs, ys, block_size=8), np.float64)
  assert values.shape == (num_sets,)
  assert abs(values.mean()) < 3.0 * values.std() / np.sqrt(num_sets)
  np.testing.assert_allclose(values[:3], [metrics_lib.mmd2(xs[i], ys[i], block_size=8)
                                          for i in range(3)], rtol=1e-5, atol=1e-7)
  # The jackknife standard error is close to the spread across replicas (and not below it).
  stderrs = np.array([metrics_lib.mmd2_with_stderr(xs[i], ys[i],
                                                   block_size=8)[1] for i in range(40)])
  assert 0.9 < stderrs.mean() / values.std() < 2.0


def test_mmd2_input_validation():
  with pytest.raises(ValueError):
    metrics_lib.mmd2(np.zeros((4, 5), np.int32), np.zeros((4, 6), np.int32))
  with pytest.raises(ValueError):
    metrics_lib.SequenceKernel("levenshtein")


# ----------------------------------------------------------------------------- unigram entropy


def test_unigram_entropy():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 30, (6, 50))
  expected = [scipy.stats.entropy(np.bincount(row, minlength=30)) for row in tokens]
  per_seq = metrics_lib.unigram_entropy(tokens, 30, per_sequence=True)
  np.testing.assert_allclose(per_seq, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics_lib.unigram_entropy(tokens, 30), np.mean(expected), rtol=1e-5)
  special = np.array([[4] * 8, list(range(8)), [30, 30, 1, 1, 2, 2, 30, 30], [30] * 8])
  np.testing.assert_allclose(metrics_lib.unigram_entropy(special, 30, per_sequence=True),
                             [0.0, np.log(8), np.log(2), 0.0], atol=1e-6)


# ------------------------------------------------------------------------ generative perplexity


def test_generative_perplexity():
  uniform = lambda t: jnp.full((t.shape[0], t.shape[1] - 1), -np.log(VOCAB))
  tokens = iid_uniform(np.random.default_rng(0), 10, 9)
  result = metrics_lib.generative_perplexity(uniform, tokens, micro_batch=4)
  assert result.num_tokens == 80
  np.testing.assert_allclose(result.perplexity, VOCAB, rtol=1e-6)
  # Token weighting and padding: per-row log-probs equal to the row index.
  by_row = lambda t: jnp.broadcast_to(-jnp.arange(t.shape[0], dtype=jnp.float32)[:, None],
                                      (t.shape[0], t.shape[1] - 1))
  np.testing.assert_allclose(metrics_lib.generative_perplexity(by_row, tokens, 3).nll,
                             np.mean([0, 1, 2] * 3 + [0]), rtol=1e-12)


# ---------------------------------------------------------------------------- gradient moment

LM_CONFIG = reference_lm.ReferenceLMConfig(vocab_size=VOCAB, max_len=24, num_layers=1, width=32,
                                 num_heads=2)
LOGLIK = functools.partial(reference_lm.sequence_log_likelihood, config=LM_CONFIG)
# 500 model and 470 data rows in 2 × 16 halves: 15 + 14 rows per half, in 2 micro-batches of 15
# (one zero-weight padding row), with 20 and 22 rows left out. All GM calls share these shapes
# and compile once.
GM_ARGS = dict(num_pairs=16, micro_batch=16)


@pytest.fixture(scope="module")
def trained_lm():
  """A reference LM trained briefly on `markov` data, and 1,000 fresh data sequences."""
  rng = np.random.default_rng(0)
  params, _ = reference_lm_run.train_reference_lm(markov(rng, 512, 24), LM_CONFIG, num_steps=80,
                                    batch_size=32, lr=1e-2, seed=0)
  return params, markov(rng, 1000, 24)


@pytest.fixture(scope="module")
def data_vs_data(trained_lm):
  params, data = trained_lm
  key = jax.random.PRNGKey(0)
  return key, metrics_lib.gradient_moment(LOGLIK, params, data[:500], data[500:970], key, **GM_ARGS)


def test_gradient_moment_data_vs_data_is_zero(data_vs_data):
  _, result = data_vs_data
  assert result.pair_estimates.shape == (16,)
  assert result.stderr > 0
  assert abs(result.mean) < 3.0 * result.stderr
  assert abs(result.all_halves) < 3.0 * result.stderr


def test_gradient_moment_detects_a_repeated_sequence(trained_lm, data_vs_data):
  params, data = trained_lm
  # The sequence whose NLL is the median of the data's: repeating it keeps perplexity unchanged.
  nll = -np.asarray(LOGLIK(params, data[500:970]))
  typical = data[500:970][np.argsort(nll)[len(nll) // 2]]
  repeated = np.repeat(typical[None], 500, axis=0)
  ppl = lambda t: metrics_lib.generative_perplexity(
      functools.partial(reference_lm.token_log_probs, params, config=LM_CONFIG), t, 128).perplexity
  result = metrics_lib.gradient_moment(LOGLIK, params, repeated, data[:470], jax.random.PRNGKey(1),
                                   **GM_ARGS)
  print(f"\nrepeated sequence vs data (RESULTS.md §5): generative perplexity "
        f"{ppl(repeated):.4f} vs {ppl(data[500:970]):.4f}; gradient moment {result.mean:.3e} ± "
        f"{result.stderr:.1e} ({result.mean / result.stderr:.1f} SE), data vs data "
        f"{data_vs_data[1].mean:.3e} ± {data_vs_data[1].stderr:.1e} "
        f"({data_vs_data[1].mean / data_vs_data[1].stderr:.2f} SE)")
  assert ppl(repeated) == pytest.approx(ppl(data[500:970]), rel=0.05)
  assert result.mean > 10.0 * result.stderr
  assert result.all_halves > 10.0 * result.stderr
  assert result.mean > 10.0 * data_vs_data[1].stderr


def test_gradient_moment_matches_dense_per_example_gradients(trained_lm, data_vs_data):
  """The micro-batched, padded bilinear estimates equal those from per-example gradients."""
  params, data = trained_lm
  key, result = data_vs_data
  model, data = data[:500], data[500:970]
  flat_grad = jax.jit(jax.vmap(lambda t: ravel_pytree(
      jax.grad(lambda p: LOGLIK(p, t[None])[0])(params))[0]))
  grads_model = np.asarray(flat_grad(model), np.float64)
  grads_data = np.asarray(flat_grad(data), np.float64)
  model_key, data_key = jax.random.split(key)
  idx_model = np.asarray(metrics_lib.pair_split_indices(model_key, 500, 16))  # [16, 2, 15]
  idx_data = np.asarray(metrics_lib.pair_split_indices(data_key, 470, 16))  # [16, 2, 14]
  halves = grads_model[idx_model].mean(axis=2) - grads_data[idx_data].mean(axis=2)  # [16, 2, D]
  pairs = np.einsum("pd,pd->p", halves[:, 0], halves[:, 1])
  scale = np.abs(pairs).max()
  np.testing.assert_allclose(result.pair_estimates, pairs, rtol=1e-4, atol=1e-4 * scale)
  np.testing.assert_allclose(result.mean, pairs.mean(), rtol=1e-4, atol=1e-4 * scale)
  flat = halves.reshape(32, -1)
  gram = flat @ flat.T
  u_stat = (gram.sum() - np.trace(gram)) / (32 * 31)
  np.testing.assert_allclose(result.all_halves, u_stat, rtol=1e-4, atol=1e-4 * scale)


def test_pair_split_indices_are_disjoint():
  idx = np.asarray(metrics_lib.pair_split_indices(jax.random.PRNGKey(0), 23, 3))
  assert idx.shape == (3, 2, 3)
  assert len(np.unique(idx)) == idx.size and idx.max() < 23
  with pytest.raises(ValueError):
    metrics_lib.pair_split_indices(jax.random.PRNGKey(0), 5, 3)


# ------------------------------------------------------------ Fréchet distance, precision/recall


def test_unique_fraction_counts_distinct_rows():
  tokens = np.array([[0, 1], [0, 1], [1, 0], [1, 1]])
  assert metrics_lib.unique_fraction(tokens) == 0.75
  assert metrics_lib.unique_fraction(tokens.T) == 1.0


def test_classifier_confidence_against_a_hand_softmax():
  logits = np.array([[0.0, 0.0, 0.0], [np.log(8.0), 0.0, 0.0], [0.0, 0.0, 1e4]])
  confidence, classes = metrics_lib.classifier_confidence(logits)
  assert confidence == pytest.approx((1 / 3 + 0.8 + 1.0) / 3)
  assert classes == 2  # argmax: class 0 (twice, the tie resolves to 0) and class 2


def test_frechet_distance():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(400, 5)) @ rng.normal(size=(5, 5))
  b = rng.normal(size=(300, 5)) * 2.0 + 1.0
  assert metrics_lib.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
  shift = np.array([1.0, -2.0, 0.5, 0.0, 3.0])
  assert metrics_lib.frechet_distance(a, a + shift) == pytest.approx(np.sum(shift**2), rel=1e-8)
  cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  reference = (np.sum((a.mean(0) - b.mean(0))**2) + np.trace(cov_a + cov_b)
               - 2.0 * np.trace(scipy.linalg.sqrtm(cov_a @ cov_b)).real)
  assert metrics_lib.frechet_distance(a, b) == pytest.approx(reference, rel=1e-6)


def test_precision_recall():
  rng = np.random.default_rng(0)
  real = rng.normal(size=(200, 4))
  assert metrics_lib.precision_recall(real, real, k=3) == (1.0, 1.0)
  assert metrics_lib.precision_recall(real, real + 100.0, k=3) == (0.0, 0.0)
  # Fakes collapsed onto a small part of the real manifold: precise but low recall.
  fake = real[np.argsort(np.linalg.norm(real - real[0], axis=1))[:20]] + 1e-3
  precision, recall = metrics_lib.precision_recall(real, fake, k=3, block_size=16)
  assert precision == 1.0 and recall < 0.3
  # Brute force on the same inputs.
  dist = lambda u, v: np.linalg.norm(u[:, None] - v[None], axis=-1)
  radii_real = np.sort(dist(real, real), axis=1)[:, 3]
  radii_fake = np.sort(dist(fake, fake), axis=1)[:, 3]
  assert precision == np.mean(np.any(dist(fake, real) <= radii_real[None], axis=1))
  assert recall == np.mean(np.any(dist(real, fake) <= radii_fake[None], axis=1))
