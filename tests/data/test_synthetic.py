"""Tests of the exact-likelihood mirror source: normalisation, sampling, copy rate, exact NLL."""

import importlib.util
import itertools
import json
import pathlib

import numpy as np
import pytest

from dmmd_jax import config_lib
from dmmd_jax.data import sources, synthetic
from dmmd_jax.data import types as data_types

ROOT = pathlib.Path(__file__).resolve().parents[2]
SOURCE = synthetic.SyntheticSource(vocab_size=3, seq_len=6, seed=2, concentration=0.5)


def _all_sequences(vocab, length):
  return np.array(list(itertools.product(range(vocab), repeat=length)), np.int32)


@pytest.mark.parametrize("initial", synthetic.INITIALS)
def test_likelihood_sums_to_one_over_all_sequences(initial):
  source = synthetic.SyntheticSource(3, 6, seed=2, concentration=0.5, initial=initial)
  logp = synthetic.log_likelihood(source, _all_sequences(3, 6))
  assert np.isclose(np.exp(logp).sum(), 1.0, rtol=0, atol=1e-12)
  # Exactly the 3³ palindromes have positive probability.
  assert np.isfinite(logp).sum() == 27
  np.testing.assert_array_equal(np.isfinite(logp), synthetic.is_mirrored(_all_sequences(3, 6)))


def test_samples_follow_the_exact_likelihood():
  source = synthetic.SyntheticSource(3, 4, seed=5, concentration=0.3, initial="dirichlet")
  samples = synthetic.sample(source, 40_000, seed=0)
  assert samples.dtype == np.int32 and synthetic.is_mirrored(samples).all()
  support = _all_sequences(3, 4)
  support = support[synthetic.is_mirrored(support)]
  probs = np.exp(synthetic.log_likelihood(source, support))
  counts = np.array([(samples == row).all(axis=1).sum() for row in support])
  stderr = np.sqrt(probs * (1 - probs) / len(samples))
  assert np.all(np.abs(counts / len(samples) - probs) < 5 * stderr + 1e-4)


def test_entropy_is_the_mean_negative_log_likelihood():
  samples = synthetic.sample(SOURCE, 20_000, seed=1)
  nll = -synthetic.log_likelihood(SOURCE, samples)
  stderr = nll.std() / np.sqrt(len(nll))
  assert abs(nll.mean() - synthetic.entropy(SOURCE)) < 4 * stderr
  # Exact: H = −Σ p log p over the support.
  logp = synthetic.log_likelihood(SOURCE, _all_sequences(3, 6))
  logp = logp[np.isfinite(logp)]
  assert np.isclose(synthetic.entropy(SOURCE), -np.sum(np.exp(logp) * logp), rtol=1e-12)


def test_sampling_is_deterministic_per_seed():
  np.testing.assert_array_equal(synthetic.sample(SOURCE, 50, 3), synthetic.sample(SOURCE, 50, 3))
  assert not np.array_equal(synthetic.sample(SOURCE, 50, 3), synthetic.sample(SOURCE, 50, 4))


def test_copy_rate_of_true_and_broken_samples():
  source = synthetic.SyntheticSource(8, 16, seed=0)
  samples = synthetic.sample(source, 2000, seed=0)
  assert synthetic.copy_rate(samples) == (1.0, 1.0)
  rng = np.random.default_rng(0)
  shuffled = np.stack([row[rng.permutation(16)] for row in samples])
  result = synthetic.copy_rate(shuffled)
  assert result.rate < 0.05 and result.position_agreement < 0.6
  one_wrong = samples.copy()
  one_wrong[:, -1] = (one_wrong[:, -1] + 1) % 8
  assert synthetic.copy_rate(one_wrong) == (0.0, pytest.approx(7 / 8))


def test_mirror_errors_by_step_against_a_loop_over_pairs():
  rng = np.random.default_rng(3)
  n, length, steps = 300, 8, 3
  tokens = rng.integers(0, 2, (n, length))
  order = rng.integers(-1, steps, (n, length))
  want = np.zeros((4, steps), int)  # together, together wrong, after, after wrong
  for row, when in zip(tokens, order, strict=True):
    for i in range(length // 2):
      a, b, wrong = when[i], when[length - 1 - i], row[i] != row[length - 1 - i]
      if max(a, b) < 0:
        continue  # both given from the start: completed by no step
      kind = 0 if a == b else 2
      want[kind, max(a, b)] += 1
      want[kind + 1, max(a, b)] += wrong
  got = synthetic.mirror_errors_by_step(tokens, order, steps)
  np.testing.assert_array_equal(np.stack(got), want)
  assert want[0].sum() > 0 and want[3].sum() > 0
  with pytest.raises(synthetic.SyntheticError, match="one \\[n, L\\] shape"):
    synthetic.mirror_errors_by_step(tokens, order[:, 1:], steps)


def test_exact_nll_counts_only_valid_samples():
  samples = synthetic.sample(SOURCE, 4000, seed=7)
  result = synthetic.exact_nll(SOURCE, samples)
  assert result.valid_fraction == 1.0
  assert abs(result.nll - synthetic.entropy(SOURCE)) < 0.1
  broken = samples.copy()
  broken[::2, 0] = (broken[::2, 0] + 1) % 3
  mixed = synthetic.exact_nll(SOURCE, broken)
  assert mixed.valid_fraction == 0.5
  assert mixed.nll == pytest.approx(-synthetic.log_likelihood(SOURCE, samples[1::2]).mean())
  assert np.isnan(synthetic.exact_nll(SOURCE, broken[::2]).nll)


@pytest.mark.parametrize("bad", [np.full((2, 6), 3), np.zeros((2, 5), int), np.zeros(6, int)])
def test_bad_tokens_are_rejected(bad):
  with pytest.raises(data_types.DataError):
    synthetic.log_likelihood(SOURCE, bad)


@pytest.mark.parametrize("fields", [dict(vocab_size=1, seq_len=4), dict(vocab_size=3, seq_len=5),
                                    dict(vocab_size=3, seq_len=4, initial="peaked"),
                                    dict(vocab_size=3, seq_len=4, concentration=0.0)])
def test_bad_sources_are_rejected(fields):
  with pytest.raises(synthetic.SyntheticError):
    synthetic.SyntheticSource(**fields)


def test_dataset_file_round_trip(tmp_path):
  path = synthetic.write_dataset(SOURCE, 200, tmp_path / "mirror.npy")
  side = json.loads(synthetic.sidecar_path(path).read_text())
  assert side["source"] == SOURCE.to_json() and side["num_examples"] == 200
  cfg = dict(source="npy", path=str(path), vocab_size=3, seq_len=0, eval_fraction=0.1)
  train, evals, info = sources.load_dataset(cfg)
  assert (len(train), len(evals), info.vocab_size, info.seq_len) == (180, 20, 3, 6)
  assert synthetic.copy_rate(np.concatenate([train, evals])).rate == 1.0
  assert synthetic.source_for_data_config(cfg) == SOURCE
  np.save(tmp_path / "plain.npy", train)
  assert synthetic.source_for_data_config(dict(cfg, path=str(tmp_path / "plain.npy"))) is None
  assert synthetic.source_for_data_config(dict(source="digits")) is None


def test_data_source_synthetic_samples_the_configured_source():
  cfg = dict(source="synthetic", vocab_size=5, seq_len=8, max_examples=100, eval_fraction=0.2,
             synthetic_seed=3)
  train, evals, info = sources.load_dataset(cfg)
  assert train.shape == (80, 8) and evals.shape == (20, 8) and info.vocab_size == 5
  assert synthetic.source_for_data_config(cfg) == synthetic.SyntheticSource(5, 8, seed=3)
  with pytest.raises(data_types.DataError):
    synthetic.load_dataset(dict(cfg, seq_len=7))


def test_config_with_data_source_synthetic_is_checked_before_sampling():
  config = config_lib.base_config()
  config.data.update(source="synthetic", vocab_size=6, seq_len=12, synthetic_seed=2)
  config_lib.validate(config)
  config.data.seq_len = 11
  with pytest.raises(data_types.DataError, match="synthetic source: seq_len must be even"):
    sources.load_dataset(config.data)
  config.data.source = "mirror"
  with pytest.raises(config_lib.ConfigError, match="data.source"):
    config_lib.validate(config)


def _config_module():
  spec = importlib.util.spec_from_file_location("synthetic_config", ROOT / "configs/synthetic.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_config_writes_its_data_and_accepts_options(tmp_path, monkeypatch):
  monkeypatch.setenv("DMMD_JAX_CACHE", str(tmp_path))
  config = _config_module().get_config("tiny,vocab=5,length=10,examples=300")
  assert config.data.source == "npy" and config.data.path.startswith(str(tmp_path))
  train, evals, info = sources.load_dataset(config.data)
  assert (info.vocab_size, info.seq_len, len(train) + len(evals)) == (5, 10, 300)
  assert synthetic.source_for_data_config(config.data) == synthetic.SyntheticSource(5, 10)
  config_lib.validate(config)
  with pytest.raises(config_lib.ConfigError):
    _config_module().get_config("tiny,colour=3")
  with pytest.raises(config_lib.ConfigError):
    _config_module().get_config("tiny,length=9")
