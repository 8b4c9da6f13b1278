"""Tests of the reference causal LM: shapes, causality, rotary positions, training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmmd_jax.models import reference_lm
from dmmd_jax.training import reference_lm_run

TINY = dict(num_layers=1, width=32, num_heads=2)


def _config(**overrides):
  return reference_lm.ReferenceLMConfig(**({"vocab_size": 11, "max_len": 16} | TINY | overrides))


# Tests share these two configurations and one token shape, so each function compiles once.
CONFIGS = {"learned-tied": _config(), "rotary-untied": _config(positions="rotary",
                                                               tie_embeddings=False)}


def _tokens(seed=1):
  return jax.random.randint(jax.random.PRNGKey(seed), (2, 16), 0, 11)


@pytest.mark.parametrize("name", CONFIGS)
def test_shapes(name):
  config = CONFIGS[name]
  params = reference_lm.init_params(jax.random.PRNGKey(0), config)
  tokens = _tokens()
  logits = reference_lm.next_token_logits(params, tokens, config=config)
  log_probs = reference_lm.token_log_probs(params, tokens, config=config)
  loglik = reference_lm.sequence_log_likelihood(params, tokens, config=config)
  assert logits.shape == (2, 16, 11)
  assert log_probs.shape == (2, 15) and loglik.shape == (2,)
  assert bool(jnp.all(log_probs <= 0.0))
  np.testing.assert_allclose(loglik, log_probs.mean(axis=1), rtol=1e-6)
  np.testing.assert_allclose(
      log_probs, jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None],
                                     axis=-1)[..., 0], rtol=1e-5, atol=1e-6)
  assert ("unembed" in params) == (not config.tie_embeddings)
  assert ("position_embedding" in params) == (config.positions == "learned")


@pytest.mark.parametrize("name", CONFIGS)
def test_causality(name):
  config = CONFIGS[name]
  params = reference_lm.init_params(jax.random.PRNGKey(0), config)
  tokens = _tokens()
  apply = lambda t: reference_lm.next_token_logits(params, t, config=config)
  for j in (0, 5, 15):
    changed = tokens.at[:, j].set((tokens[:, j] + 1) % config.vocab_size)
    # logits[:, i] read tokens[:, :i + 1]; log_probs[:, i] scores tokens[:, i + 1].
    np.testing.assert_array_equal(apply(tokens)[:, :j], apply(changed)[:, :j])
    lp, lp_changed = (reference_lm.token_log_probs(params, t,
                                                   config=config) for t in (tokens, changed))
    np.testing.assert_array_equal(lp[:, :max(j - 1, 0)], lp_changed[:, :max(j - 1, 0)])
    assert not np.allclose(apply(tokens)[:, j:], apply(changed)[:, j:])


def test_rotary_is_relative_and_norm_preserving():
  q = jax.random.normal(jax.random.PRNGKey(0), (1, 1, 1, 8))
  k = jax.random.normal(jax.random.PRNGKey(1), (1, 1, 1, 8))
  score = lambda i, j: jnp.sum(reference_lm.rotary(q, jnp.array([i]))
                               * reference_lm.rotary(k, jnp.array([j])))
  np.testing.assert_allclose(score(3, 1), score(9, 7), rtol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(reference_lm.rotary(q, jnp.array([5]))),
                             jnp.linalg.norm(q),
                             rtol=1e-6)


def test_config_validation():
  with pytest.raises(ValueError):
    _config(positions="sinusoidal")
  with pytest.raises(ValueError):
    _config(width=30, num_heads=4)
  with pytest.raises(ValueError):
    _config(width=6, num_heads=2, positions="rotary")
  with pytest.raises(ValueError):
    reference_lm.token_log_probs(reference_lm.init_params(jax.random.PRNGKey(0), _config()),
                       jnp.zeros((1, 17), jnp.int32), config=_config())


def _cyclic_pattern(num, length, seed=0):
  """Cyclic shifts of a fixed permutation pattern: every token after the first is determined."""
  pattern = np.array([3, 0, 6, 1, 5])
  starts = np.random.default_rng(seed).integers(0, len(pattern), num)
  return pattern[(starts[:, None] + np.arange(length)[None, :]) % len(pattern)].astype(np.int32)


def test_training_learns_a_predictable_source_and_is_deterministic():
  config = reference_lm.ReferenceLMConfig(vocab_size=8, max_len=16, **TINY)
  tokens, eval_tokens = _cyclic_pattern(256, 16), _cyclic_pattern(64, 16, seed=1)
  kwargs = dict(num_steps=150, batch_size=16, lr=1e-2, seed=3, eval_tokens=eval_tokens,
                log_every=50)
  params, history = reference_lm_run.train_reference_lm(tokens, config, **kwargs)
  assert history["step"] == [50, 100, 150]
  assert history["train_nll"][0] > history["train_nll"][-1]
  assert history["eval_nll"][-1] < 0.05
  assert reference_lm_run.evaluate_nll(params, eval_tokens, config=config) == pytest.approx(
      history["eval_nll"][-1])
  np.testing.assert_allclose(
      history["eval_nll"][-1],
      -np.mean(np.asarray(reference_lm.token_log_probs(params, eval_tokens, config=config),
                          np.float64)),
      rtol=1e-5, atol=1e-8)
  params_again, history_again = reference_lm_run.train_reference_lm(tokens, config, **kwargs)
  assert history_again == history
  jax.tree.map(np.testing.assert_array_equal, params, params_again)
