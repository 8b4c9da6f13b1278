"""Tests for `dmmd_jax.denoiser`: shapes, masked parametrisation, noise input, conditioning.

The network uses adaLN-Zero: at initialisation every block's gates and the final modulation are
zero, so each block is the identity and the output depends only on each position's own token
(and noise). Tests that need attention or time conditioning therefore perturb the `adaln`
parameters first.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dmmd_jax.diffusion import forward_process, sampling
from dmmd_jax.models import denoiser

K = 5  # data tokens; MASK = K for the masked configs
LENGTH = 8
BATCH = 3
BASE = dict(vocab_size=K, input_vocab_size=K + 1, seq_len=LENGTH, num_layers=2, width=32,
            num_heads=2, mlp_ratio=2, mask_id=K, noise_kind="projection", noise_dim=6)
MASKED = denoiser.DenoiserConfig(**BASE)
# The same network without the masked parametrisation: raw logits everywhere. It shares MASKED's
# parameter tree, so one (costly) init compile serves every test.
RAW = dataclasses.replace(MASKED, mask_id=-1)
UNIFORM = denoiser.DenoiserConfig(**{**BASE, "input_vocab_size": K, "mask_id": -1,
                                     "noise_kind": "none", "noise_dim": 0})

# Jitted entry points: eager op-by-op Flax init/apply is far slower than one compile each.
apply = jax.jit(denoiser.apply, static_argnames="cfg")
init_params = jax.jit(denoiser.init_params, static_argnums=1)
sample_noise = jax.jit(denoiser.sample_noise, static_argnums=(1, 2))


@functools.lru_cache
def boxed_params(cfg, seed=0):
  return init_params(jax.random.key(seed), cfg)


def unboxed_params(cfg, seed=0):
  return nn.unbox(boxed_params(cfg, seed))


def perturb(params, name_part, seed, scale=0.5):
  """Adds N(0, scale²) noise to every parameter whose path contains `name_part`."""
  rng = np.random.default_rng(seed)
  hits = []

  def add(path, leaf):
    if name_part not in jax.tree_util.keystr(path):
      return leaf
    hits.append(path)
    return leaf + jnp.asarray(scale * rng.normal(size=leaf.shape), leaf.dtype)

  out = jax.tree_util.tree_map_with_path(add, params)
  assert hits, name_part
  return out


def live_params(cfg, seed=0):
  """Initial parameters with non-zero adaLN (attention, MLP and time conditioning active)."""
  return perturb(unboxed_params(cfg, seed), "adaln", seed + 100)


def random_tokens(seed, cfg, mask_frac=0.0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, cfg.vocab_size, (BATCH, cfg.seq_len))
  if mask_frac:
    tokens = np.where(rng.random(tokens.shape) < mask_frac, cfg.mask_id, tokens)
  return jnp.asarray(tokens, jnp.int32)


def times(*values):
  return jnp.asarray(values, jnp.float32)


def test_masked_parametrisation_shapes_copy_through_and_network_positions():
  params = live_params(MASKED)
  tokens = random_tokens(0, MASKED, mask_frac=0.5)
  is_mask = np.asarray(tokens == K)
  assert is_mask.any() and (~is_mask).any()
  t = times(0.3, 0.6, 0.9)
  logits = apply(params, tokens, t, None, cfg=MASKED)
  assert logits.shape == (BATCH, LENGTH, K) and logits.dtype == jnp.float32  # no MASK class
  log_probs = np.asarray(jax.nn.log_softmax(logits, -1))
  # Unmasked positions: a one-hot copy of the input token.
  own = np.take_along_axis(log_probs, np.asarray(tokens)[..., None] % K, -1)[..., 0]
  np.testing.assert_allclose(own[~is_mask], 0.0, atol=1e-6)
  others = log_probs[~is_mask] < -1e20
  assert others.sum(-1).tolist() == [K - 1] * int((~is_mask).sum())
  # Masked positions: the network's logits, a proper non-degenerate distribution.
  raw = apply(params, tokens, t, None, cfg=RAW)
  np.testing.assert_allclose(np.asarray(logits)[is_mask], np.asarray(raw)[is_mask], atol=1e-5)
  assert np.all(np.isfinite(log_probs[is_mask])) and np.all(log_probs[is_mask] > -30)
  # ... which change with the network's parameters, while copies do not.
  other = apply(perturb(params, "logits", 7), tokens, t, None, cfg=MASKED)
  assert np.all(np.abs(np.asarray(other - logits))[is_mask].max(-1) > 1e-3)
  np.testing.assert_array_equal(np.asarray(other)[~is_mask], np.asarray(logits)[~is_mask])


def test_uniform_parametrisation_has_no_copy_through():
  # Shapes of a real uniform-kernel config (K input ids, no noise input), traced only.
  shapes = nn.unbox(jax.eval_shape(functools.partial(denoiser.init_params, cfg=UNIFORM),
                                   jax.random.key(0)))
  assert "noise_proj" not in shapes and shapes["embed"]["embedding"].shape == (K, UNIFORM.width)
  out = jax.eval_shape(functools.partial(denoiser.apply, cfg=UNIFORM), shapes,
                       jnp.zeros((BATCH, LENGTH), jnp.int32), jnp.zeros((BATCH,)))
  assert out.shape == (BATCH, LENGTH, K) and out.dtype == jnp.float32
  # Without the masked parametrisation every position is predicted by the network.
  params = live_params(MASKED)
  tokens = random_tokens(1, RAW)
  log_probs = np.asarray(jax.nn.log_softmax(apply(params, tokens, times(0.1, 0.5, 0.9), None,
                                                  cfg=RAW), -1))
  assert np.all(log_probs > -30)
  own = np.take_along_axis(log_probs, np.asarray(tokens)[..., None], -1)[..., 0]
  assert np.all(own < -1e-3)  # not a copy of the input


def test_noise_projection_is_zero_at_init_and_active_once_trained():
  params = live_params(MASKED)
  assert np.all(np.asarray(params["noise_proj"]["kernel"]) == 0)
  tokens = random_tokens(2, MASKED, mask_frac=0.7)
  t = times(0.5, 0.5, 0.5)
  noise = jax.random.normal(jax.random.key(3), (BATCH, LENGTH, MASKED.noise_dim))
  without = apply(params, tokens, t, None, cfg=MASKED)
  np.testing.assert_allclose(apply(params, tokens, t, noise, cfg=MASKED), without, atol=1e-6)
  trained = perturb(params, "noise_proj", 4)
  a = np.asarray(apply(trained, tokens, t, noise, cfg=MASKED))
  b = np.asarray(apply(trained, tokens, t, -noise, cfg=MASKED))
  is_mask = np.asarray(tokens == K)
  assert np.all(np.abs(a - b)[is_mask].max(-1) > 1e-3)  # every masked position sees the noise
  np.testing.assert_array_equal(a[~is_mask], b[~is_mask])  # copies stay copies


def test_attention_is_bidirectional_once_blocks_are_active():
  tokens = random_tokens(3, RAW)
  changed = tokens.at[:, -1].set((tokens[:, -1] + 1) % K)
  t = times(0.5, 0.5, 0.5)
  # adaLN-Zero: at init every block is the identity, so positions do not interact yet.
  init = unboxed_params(MASKED)
  np.testing.assert_allclose(apply(init, tokens, t, None, cfg=RAW)[:, :-1],
                             apply(init, changed, t, None, cfg=RAW)[:, :-1], atol=1e-6)
  params = live_params(MASKED)
  a = np.asarray(apply(params, tokens, t, None, cfg=RAW))
  b = np.asarray(apply(params, changed, t, None, cfg=RAW))
  assert np.all(np.abs(a - b)[:, 0].max(-1) > 1e-4)  # the first position sees the last token
  assert np.all(np.abs(a - b)[:, -1].max(-1) > 1e-4)


def test_time_conditioning():
  tokens = random_tokens(4, RAW)
  early, late = times(0.1, 0.1, 0.1), times(0.8, 0.8, 0.8)
  init = unboxed_params(MASKED)
  np.testing.assert_allclose(apply(init, tokens, early, None, cfg=RAW),
                             apply(init, tokens, late, None, cfg=RAW), atol=1e-6)
  params = live_params(MASKED)
  a = np.asarray(apply(params, tokens, early, None, cfg=RAW))
  b = np.asarray(apply(params, tokens, late, None, cfg=RAW))
  assert np.abs(a - b).max() > 1e-2
  # Per-sequence times: each row follows its own t.
  mixed = np.asarray(apply(params, tokens, times(0.1, 0.8, 0.1), None, cfg=RAW))
  np.testing.assert_allclose(mixed[[0, 2]], a[[0, 2]], atol=1e-5)
  np.testing.assert_allclose(mixed[1], b[1], atol=1e-5)
  # time_conditioning=False: same parameter tree, output independent of t.
  frozen = dataclasses.replace(RAW, time_conditioning=False)
  np.testing.assert_array_equal(apply(params, tokens, early, None, cfg=frozen),
                                apply(params, tokens, late, None, cfg=frozen))


def test_bfloat16_compute_is_close_to_float32():
  bf16 = dataclasses.replace(MASKED, dtype="bfloat16")
  shapes = nn.unbox(jax.eval_shape(functools.partial(denoiser.init_params, cfg=bf16),
                                   jax.random.key(0)))
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(shapes))
  # Same parameter tree as the float32 model: run both on one float32 pytree.
  params = perturb(live_params(MASKED), "noise_proj", 5)
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(shapes)
  tokens = random_tokens(5, MASKED, mask_frac=0.6)
  t = times(0.2, 0.5, 0.9)
  noise = jax.random.normal(jax.random.key(6), (BATCH, LENGTH, MASKED.noise_dim))
  ref = np.asarray(apply(params, tokens, t, noise, cfg=MASKED))
  low = apply(params, tokens, t, noise, cfg=bf16)
  assert low.dtype == jnp.float32
  low = np.asarray(low)
  is_mask = np.asarray(tokens == K)
  err = np.abs(low - ref)[is_mask]
  assert err.max() < 0.1 * np.abs(ref[is_mask]).max() + 0.05, err.max()
  assert np.corrcoef(low[is_mask].ravel(), ref[is_mask].ravel())[0, 1] > 0.999
  assert err.max() > 0  # bf16 really was used
  np.testing.assert_array_equal(low[~is_mask], ref[~is_mask])


# ------------------------------------------------------------------------------------------------
# Student noise.

IMAGE = (4, 6, 3)  # H, W, C
# A masked image student; same parameter tree as MASKED (parameters do not depend on seq_len).
PYRAMID = dataclasses.replace(MASKED, seq_len=4 * 6 * 3, noise_kind="pyramid",
                              image_shape=IMAGE, pyramid_levels=3)


def test_sample_noise_shapes_and_statistics():
  assert denoiser.sample_noise(jax.random.key(0), UNIFORM, 2) is None
  proj = np.asarray(sample_noise(jax.random.key(0), MASKED, 256))
  assert proj.shape == (256, LENGTH, MASKED.noise_dim)
  assert abs(proj.mean()) < 0.05 and abs(proj.std() - 1.0) < 0.05
  assert abs(np.mean(proj[:, :-1] * proj[:, 1:])) < 0.05  # i.i.d. across positions
  odd = dataclasses.replace(PYRAMID, image_shape=(5, 3, 1), seq_len=15)
  odd_noise = jax.eval_shape(functools.partial(denoiser.sample_noise, cfg=odd, batch_size=2),
                             jax.random.key(0))
  assert odd_noise.shape == (2, 15, 6)


def test_pyramid_noise_is_shared_by_neighbours_and_feeds_the_network():
  h, w, c = IMAGE
  per_level = PYRAMID.noise_dim // PYRAMID.pyramid_levels
  noise = sample_noise(jax.random.key(1), PYRAMID, 512)
  assert noise.shape == (512, PYRAMID.seq_len, PYRAMID.noise_dim)
  img = np.asarray(noise).reshape(512, h, w, c, PYRAMID.noise_dim)
  assert abs(img.mean()) < 0.05 and abs(img.std() - 1.0) < 0.05
  # Level l is constant on 2^l × 2^l blocks (row-major flattening of H, W, C).
  for level in range(PYRAMID.pyramid_levels):
    f = 2**level
    feats = img[..., level * per_level:(level + 1) * per_level]
    for y in range(h):
      for x in range(w):
        np.testing.assert_array_equal(feats[:, y, x], feats[:, y - y % f, x - x % f])
  # Adjacent pixels are positively correlated overall; level 0 alone is independent.
  right = np.mean(img[:, :, :-1] * img[:, :, 1:])
  down = np.mean(img[:, :-1] * img[:, 1:])
  assert right > 0.2 and down > 0.2
  fine = img[..., :per_level]
  assert abs(np.mean(fine[:, :, :-1] * fine[:, :, 1:])) < 0.05
  # The noise reaches the network through the (trained) projection.
  params = perturb(unboxed_params(MASKED), "noise_proj", 1)
  tokens = jnp.full((4, PYRAMID.seq_len), PYRAMID.mask_id, jnp.int32)
  t = jnp.full((4,), 0.5)
  out = apply(params, tokens, t, noise[:4], cfg=PYRAMID)
  assert out.shape == (4, PYRAMID.seq_len, K)
  assert np.abs(np.asarray(out - apply(params, tokens, t, noise[4:8], cfg=PYRAMID))).max() > 1e-3


def test_sequence_pyramid_shares_level_l_over_runs_of_two_to_the_l_positions():
  """A sequence is an L × 1 × 1 image: level l is constant on runs of 2^l positions, a level
  with 2^l ≥ L is one vector for the whole sequence, and level 0 is independent per position."""
  length, levels, per_level = 12, 5, 2  # 2^4 = 16 ≥ 12: the last level is global
  cfg = dataclasses.replace(MASKED, seq_len=length, noise_kind="pyramid", image_shape=(),
                            pyramid_levels=levels, noise_dim=levels * per_level)
  denoiser.validate_config(cfg)
  noise = np.asarray(sample_noise(jax.random.key(2), cfg, 2048))
  assert noise.shape == (2048, length, levels * per_level)
  assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1.0) < 0.05
  for level in range(levels):
    feats = noise[..., level * per_level:(level + 1) * per_level]
    run = 2**level
    for i in range(length):
      np.testing.assert_array_equal(feats[:, i], feats[:, i - i % run])
    end = min(run, length) - 1
    if end:  # the first run's start and end differ at the finer levels only
      assert not np.array_equal(noise[:, 0, :level * per_level],
                                noise[:, end, :level * per_level])
  np.testing.assert_array_equal(noise[:, 0, -per_level:], noise[:, -1, -per_level:])
  fine = noise[..., :per_level]
  assert abs(np.mean(fine[:, :-1] * fine[:, 1:])) < 0.05
  # The last level ties the two ends of the sequence; level 3 (runs of 8) does not.
  level3 = noise[..., 3 * per_level:4 * per_level]
  assert abs(np.mean(level3[:, 0] * level3[:, -1])) < 0.1


# ------------------------------------------------------------------------------------------------
# Configuration and partitioning metadata.


def test_validate_config_accepts_valid_configs():
  for cfg in (MASKED, UNIFORM, PYRAMID):
    denoiser.validate_config(cfg)


@pytest.mark.parametrize("change,match", [
    (dict(num_layers=0), "num_layers"),
    (dict(width=0), "width"),
    (dict(width=30, num_heads=4), "multiple"),
    (dict(num_heads=0), "num_heads"),
    (dict(width=6, num_heads=2), "even"),
    (dict(seq_len=0), "sequence length"),
    (dict(noise_kind="gaussian"), "noise_kind"),
    (dict(noise_dim=0), "noise_dim"),
    (dict(noise_kind="pyramid", image_shape=(2, 4)), "image"),
    (dict(noise_kind="pyramid", image_shape=(2, 2, 2), noise_dim=4, pyramid_levels=3),
     "pyramid_levels"),
    (dict(dtype="float16"), "dtype"),
    (dict(attention_impl="flash"), "attention_impl"),
    (dict(vocab_multiple=0), "vocab_multiple"),
])
def test_validate_config_errors(change, match):
  with pytest.raises(ValueError, match=match):
    denoiser.validate_config(dataclasses.replace(MASKED, **change))


@pytest.mark.parametrize("change", [
    # Pyramid noise has H·W·C rows; any other seq_len fails at apply with a broadcasting error.
    dict(noise_kind="pyramid", image_shape=(2, 2, 1), noise_dim=3, pyramid_levels=3),
    # pyramid_levels = 0 divides by zero in sample_noise (noise_dim % max(levels, 1) passes).
    dict(noise_kind="pyramid", image_shape=(2, 4, 1), noise_dim=3, pyramid_levels=0),
    # mlp_ratio = 0 makes a zero-width MLP (xavier init divides by zero).
    dict(mlp_ratio=0),
])
def test_validate_config_rejects_settings_that_fail_later(change):
  """Settings that pass validation today but crash in init/apply/sample_noise (LENGTH = 8)."""
  with pytest.raises(ValueError):
    denoiser.validate_config(dataclasses.replace(MASKED, **change))


def test_parameters_carry_logical_partitioning():
  boxed = boxed_params(MASKED)
  specs = nn.get_partition_spec(boxed)
  params = nn.unbox(boxed)
  spec_leaves = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, P))
  param_leaves = jax.tree_util.tree_leaves(params)
  assert len(spec_leaves) == len(param_leaves) > 10
  allowed = {None, "embed", "mlp", "heads", "kv", "vocab", "cond", "noise"}
  for spec, leaf in zip(spec_leaves, param_leaves, strict=True):
    assert isinstance(spec, P)
    assert len(spec) == leaf.ndim and set(spec) <= allowed, spec
  assert specs["embed"]["embedding"] == P("vocab", "embed")
  assert specs["logits"]["kernel"] == P("embed", "vocab")
  assert specs["noise_proj"]["kernel"] == P("noise", "embed")
  block = specs["block_0"]
  assert block["qkv"]["kernel"] == P("embed", None, "heads", "kv")
  assert block["attn_out"]["kernel"] == P("heads", "kv", "embed")
  assert block["mlp_in"]["kernel"] == P("embed", "mlp")
  assert block["mlp_out"]["kernel"] == P("mlp", "embed")
  assert sum("embed" in s for s in spec_leaves) > len(spec_leaves) // 2


PADDED = dataclasses.replace(MASKED, vocab_multiple=4)  # K = 5 logits → 8, 6 embedding rows → 8


def test_vocabulary_padding_leaves_the_real_classes_unchanged():
  """model.vocab_multiple pads the embedding table and the output layer (so a tensor axis splits
  them evenly) and slices the padded classes off the logits: a padded network whose real rows
  and columns are copied into an unpadded one gives the same log-probabilities over the K
  classes, whatever its padded weights, and the sampler never draws a padded id."""
  padded = unboxed_params(PADDED)
  assert padded["embed"]["embedding"].shape == (8, 32)
  assert padded["logits"]["kernel"].shape == (32, 8)
  padded = perturb(live_params(PADDED), "logits", 3)
  padded["logits"]["bias"] = padded["logits"]["bias"].at[K:].set(1e4)  # huge padded logits
  plain = dict(padded, embed={"embedding": padded["embed"]["embedding"][:K + 1]},
               logits={"kernel": padded["logits"]["kernel"][:, :K],
                       "bias": padded["logits"]["bias"][:K]})
  tokens, t = random_tokens(0, MASKED, mask_frac=0.7), times(0.2, 0.5, 0.9)
  noise = sample_noise(jax.random.key(1), MASKED, BATCH)
  got = apply(padded, tokens, t, noise, cfg=PADDED)
  want = apply(plain, tokens, t, noise, cfg=MASKED)
  assert got.shape == (BATCH, LENGTH, K)
  np.testing.assert_allclose(jax.nn.log_softmax(got), jax.nn.log_softmax(want), atol=1e-6)

  kernel = forward_process.ForwardProcess("masked", K)
  samples = sampling.sample(jax.random.key(2), functools.partial(denoiser.apply, cfg=PADDED),
                            padded, kernel, sampling.SamplerConfig(steps=4, float64=False), 64,
                            LENGTH)
  assert samples.shape == (64, LENGTH) and 0 <= int(samples.min()) and int(samples.max()) < K


ABSOLUTE = dataclasses.replace(MASKED, absolute_positions=True)


def test_absolute_positions_add_a_learned_table_to_the_input():
  """model.absolute_positions adds one learned `[seq_len, width]` row per position to the token
  embeddings and changes nothing else: with the table zeroed the network is the plain one (same
  remaining parameters, same logits); with a non-zero table the logits of identical inputs
  (all MASK) differ between positions the plain network treats alike; and row i reaches position
  i, at full weight. (Checked: fails with the table dropped, reversed or halved.)"""
  params = live_params(ABSOLUTE)
  table = params.pop("position_embed")
  assert table.shape == (LENGTH, 32)
  assert jax.tree.structure(params) == jax.tree.structure(unboxed_params(MASKED))
  tokens, t = random_tokens(0, MASKED, mask_frac=0.7), times(0.2, 0.5, 0.9)
  noise = sample_noise(jax.random.key(1), MASKED, BATCH)
  np.testing.assert_allclose(
      apply({**params, "position_embed": jnp.zeros_like(table)}, tokens, t, noise, cfg=ABSOLUTE),
      apply(params, tokens, t, noise, cfg=MASKED), atol=1e-6)

  masks = jnp.full((1, LENGTH), K, jnp.int32)
  plain = apply(params, masks, times(0.5), cfg=MASKED)[0]
  spread = {**params, "position_embed": jnp.asarray(
      np.random.default_rng(0).normal(size=table.shape), jnp.float32)}
  moved = apply(spread, masks, times(0.5), cfg=ABSOLUTE)[0]
  # Positions 3 and 4 sit symmetrically in the sequence: only the table tells them apart here.
  assert float(jnp.abs(moved[3] - moved[4]).max()) > 10 * float(jnp.abs(plain[3] - plain[4]).max())

  # Row i goes to position i: with the blocks still the identity (adaLN-Zero at init) each
  # position's logits depend on its own input only, so all-MASK input plus the rows
  # emb[token_i] − emb[MASK] gives the logits of the tokens themselves.
  init = unboxed_params(ABSOLUTE)
  emb = init["embed"]["embedding"]
  tokens = random_tokens(1, MASKED)[:1]
  shifted = {**init, "position_embed": emb[tokens[0]] - emb[K]}
  np.testing.assert_allclose(
      apply(shifted, masks, times(0.5), cfg=dataclasses.replace(ABSOLUTE, mask_id=-1)),
      apply({k: v for k, v in init.items() if k != "position_embed"}, tokens, times(0.5),
            cfg=RAW), atol=1e-5)
