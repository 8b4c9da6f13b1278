"""Block-autoregressive models (`dmmd_jax/models/blocks.py`): masks, the two-stream forward, the
block ELBO against brute force, and the cached block sampler.

The networks are tiny real denoisers with random (not zero-initialised) parameters, so every
output depends on every input it may see; "must not see" is then checked exactly (==).
"""

import functools
import itertools
import json

import _helpers
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmmd_jax import config_lib
from dmmd_jax.diffusion import elbo, forward_process, sampling
from dmmd_jax.models import blocks, denoiser
from dmmd_jax.training import setup as setup_lib

V, L, BS = 3, 8, 2  # data tokens, length, block size


def model_cfg(kind="masked", block_size=BS, seq_len=L, vocab=V, **overrides):
  kernel = forward_process.ForwardProcess(kind, vocab)
  options = dict(vocab_size=vocab, input_vocab_size=kernel.input_vocab_size, seq_len=seq_len,
                 num_layers=2, width=32, num_heads=2, cond_dim=16,
                 mask_id=kernel.mask_id if kernel.is_masked else -1, noise_kind="projection",
                 noise_dim=4, block_size=block_size)
  return kernel, denoiser.DenoiserConfig(**{**options, **overrides})


def random_params(cfg, seed=0, scale=0.3):
  """Every parameter random (the init's zero adaLN gates would make the blocks identities)."""
  params = flax.linen.unbox(denoiser.init_params(jax.random.key(seed), cfg))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [scale * jax.random.normal(k, x.shape)
                                   for k, x in zip(keys, leaves, strict=True)])


def data_and_noisy(kernel, batch=2, length=L, seed=0):
  """Clean x and noisy z, int32 numpy `[batch, length]` (masked: 70% MASK)."""
  rng = np.random.default_rng(seed)
  x = rng.integers(0, kernel.vocab_size, (batch, length))
  noise = np.full_like(x, kernel.mask_id) if kernel.is_masked else rng.integers(
      0, kernel.vocab_size, (batch, length))
  z = np.where(rng.random((batch, length)) < 0.7, noise, x)
  return x.astype(np.int32), z.astype(np.int32)


def test_two_stream_mask_is_the_block_pattern():
  """L = 4, blocks of 2: rows/columns are (noisy 0..3 ‖ clean 0..3)."""
  n = [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]  # noisy ↔ noisy: same block
  nc = [[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]]  # noisy → clean: earlier blocks
  cc = [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]  # clean: block-causal
  want = np.block([[np.array(n), np.array(nc)], [np.zeros((4, 4)), np.array(cc)]]).astype(bool)
  np.testing.assert_array_equal(blocks.two_stream_mask(4, 2), want)


@pytest.mark.parametrize("kind", ["masked", "uniform"])
def test_no_output_sees_what_it_must_not(kind):
  """Changing the clean token at position p changes no logit of blocks ≤ block(p) (exactly) but
  some of a later block; changing a noisy token or the noise input at p changes no logit outside
  block(p) (exactly) but some inside it; clean keys/values of blocks < block(p) never change."""
  kernel, cfg = model_cfg(kind)
  params = random_params(cfg)
  x, z = data_and_noisy(kernel)
  t = jnp.array([0.3, 0.8])
  noise = np.random.default_rng(3).normal(size=(2, L, cfg.noise_dim)).astype(np.float32)
  fn = jax.jit(lambda z, noise, x: blocks.apply(params, z, t, noise, x, cfg=cfg))
  kv_fn = jax.jit(lambda x: blocks.context_kv(params, x, cfg=cfg))
  base, base_kv = np.asarray(fn(z, noise, x)), kv_fn(x)
  block = np.arange(L) // BS
  for p in range(L):
    b = p // BS
    x2 = x.copy()
    x2[:, p] = (x[:, p] + 1) % V
    out = np.asarray(fn(z, noise, x2))
    np.testing.assert_array_equal(out[:, block <= b], base[:, block <= b])
    if b < block[-1]:
      assert np.any(out[:, block > b] != base[:, block > b])
    for (k, v), (k2, v2) in zip(base_kv, kv_fn(x2), strict=True):
      np.testing.assert_array_equal(k[:, block < b], k2[:, block < b])
      np.testing.assert_array_equal(v[:, block < b], v2[:, block < b])

    z2, noise2 = z.copy(), noise.copy()
    z2[:, p] = (z[:, p] + 1) % kernel.input_vocab_size
    noise2[:, p] += 1.0
    for out in (np.asarray(fn(z2, noise, x)), np.asarray(fn(z, noise2, x))):
      np.testing.assert_array_equal(out[:, block != b], base[:, block != b])
      assert np.any(out[:, block == b] != base[:, block == b])


@pytest.mark.parametrize("kind", ["masked", "uniform"])
def test_one_block_equals_the_whole_sequence_model(kind):
  """block_size = L: the two-stream forward gives today's logits and loss (same parameters)."""
  kernel, cfg = model_cfg(kind, block_size=L)
  _, whole = model_cfg(kind, block_size=0)
  params = random_params(cfg)
  x, z = data_and_noisy(kernel, batch=4)
  t = np.array([0.1, 0.4, 0.6, 0.9], np.float32)
  noise = np.random.default_rng(3).normal(size=(4, L, cfg.noise_dim)).astype(np.float32)
  np.testing.assert_allclose(
      jax.jit(functools.partial(blocks.apply, cfg=cfg))(params, z, t, noise, x),
      jax.jit(functools.partial(denoiser.apply, cfg=whole))(params, z, t, noise), rtol=1e-5,
      atol=1e-5)
  key = jax.random.key(7)
  loss = jax.jit(elbo.diffusion_loss, static_argnums=(2, 3, 5, 6))
  block_loss = loss(key, params, functools.partial(blocks.apply, cfg=cfg), kernel, x, 16, True)
  whole_loss = loss(key, params, functools.partial(denoiser.apply, cfg=whole), kernel, x, 16)
  np.testing.assert_allclose(block_loss, whole_loss, rtol=1e-5)
  assert np.sum(np.asarray(whole_loss)) > 1.0


def test_block_size_equal_to_the_length_is_the_whole_sequence_model():
  config = config_lib.base_config()
  config.model.block_size = 128
  kernel = forward_process.ForwardProcess("masked", 5)
  assert setup_lib.denoiser_config_of(config, kernel, 128).block_size == 0
  assert setup_lib.denoiser_config_of(config, kernel, 256).block_size == 128
  with pytest.raises(ValueError, match="must divide the sequence length"):
    denoiser.validate_config(setup_lib.denoiser_config_of(config, kernel, 200))


# ------------------------------------------------------------------------------------------------
# The block ELBO against brute force: exact expectations over every z_t (V = 2, L = 4, blocks
# of 2) of the one-forward loss, against per-block quantities from the cached single-block path.

V2, L2 = 2, 4


def all_sequences(num_ids, length):
  return np.array(list(itertools.product(range(num_ids), repeat=length)), np.int32)


def test_masked_block_elbo_is_the_sum_of_per_block_any_order_nlls():
  """Time-independent masked block model: the exact negative ELBO of the one-forward loss
  (Gauss–Legendre over t, every mask pattern) is Σ_b of the block's order-averaged NLL given the
  clean earlier blocks (linear schedule, 2-token blocks: ½ Σ over the two orders)."""
  kernel, cfg = model_cfg("masked", seq_len=L2, vocab=V2, time_conditioning=False)
  params = random_params(cfg, seed=4, scale=0.5)
  two_stream = jax.jit(functools.partial(blocks.apply, cfg=cfg))
  single = jax.jit(functools.partial(blocks.cached_block_logits, cfg=cfg))
  patterns = all_sequences(2, L2).astype(bool)  # True = masked
  nodes, weights = np.polynomial.legendre.leggauss(6)
  ts, ws = 0.5 * (nodes + 1.0), 0.5 * weights
  for x in all_sequences(V2, L2)[::3]:
    xb = np.tile(x, (len(patterns), 1))
    z = jnp.asarray(np.where(patterns, kernel.mask_id, xb), jnp.int32)
    exact = 0.0
    for t, w in zip(ts, ws, strict=True):
      tb = jnp.full((len(patterns),), t, jnp.float32)
      log_x = jax.nn.log_softmax(two_stream(params, z, tb, None, jnp.asarray(xb)))
      terms = np.asarray(elbo.masked_elbo(kernel, log_x, jnp.asarray(xb), z, tb), np.float64)
      prob = np.prod(np.where(patterns, t, 1.0 - t), axis=1)
      exact += w * np.sum(prob * terms)

    kv = blocks.context_kv(params, jnp.asarray(x[None]), cfg=cfg)
    m = kernel.mask_id
    reference = 0.0
    for b in range(L2 // BS):
      a, c = x[BS * b:BS * b + 2]

      def nll(block, position, token, b=b, kv=kv):
        logits = single(params, jnp.asarray([block], jnp.int32), jnp.zeros(1), None, kv, b)
        return -float(jax.nn.log_softmax(logits)[0, position, token])

      reference += 0.5 * (nll([m, m], 0, a) + nll([a, m], 1, c))
      reference += 0.5 * (nll([m, m], 1, c) + nll([m, c], 0, a))
    np.testing.assert_allclose(exact, reference, rtol=1e-5, err_msg=str(x))


def test_uniform_block_elbo_is_the_sum_of_per_block_elbos():
  """Uniform T-step ELBO: Σ_i Σ_{z ∈ V^L} q(z | x) KL_i of the one-forward loss equals
  Σ_b Σ_i Σ_{z_b ∈ V^B} q(z_b | x_b) KL_i(block b), the block's own ELBO given x_<b."""
  kernel, cfg = model_cfg("uniform", seq_len=L2, vocab=V2)
  params = random_params(cfg, seed=5, scale=0.5)
  steps = 3
  states = all_sequences(V2, L2)
  block_states = all_sequences(V2, BS)

  def q(z, x, t):
    a = 1.0 - t
    return np.prod(np.where(z == x, a + (1 - a) / V2, (1 - a) / V2), axis=-1)

  two_stream = jax.jit(functools.partial(blocks.apply, cfg=cfg))
  single = jax.jit(functools.partial(blocks.cached_block_logits, cfg=cfg))
  x = np.array([1, 0, 0, 1], np.int32)
  kv = blocks.context_kv(params, jnp.asarray(x[None]), cfg=cfg)
  exact = reference = 0.0
  for i in range(1, steps + 1):
    t, s = i / steps, (i - 1) / steps
    n = len(states)
    xb = jnp.asarray(np.tile(x, (n, 1)))
    log_x = jax.nn.log_softmax(two_stream(params, jnp.asarray(states), jnp.full((n,), t), None,
                                          xb))
    kl = elbo.posterior_kl(kernel, log_x, xb, jnp.asarray(states), jnp.full((n,), s),
                             jnp.full((n,), t))
    exact += float(np.sum(q(states, x, t) * np.asarray(kl, np.float64)))
    for b in range(L2 // BS):
      m = len(block_states)
      xs = jnp.asarray(np.tile(x[BS * b:BS * b + BS], (m, 1)))
      kv_b = jax.tree.map(lambda a: np.repeat(a, len(block_states), axis=0), kv)
      log_xb = jax.nn.log_softmax(single(params, jnp.asarray(block_states), jnp.full((m,), t),
                                         None, kv_b, b))
      kl_b = elbo.posterior_kl(kernel, log_xb, xs, jnp.asarray(block_states),
                                 jnp.full((m,), s), jnp.full((m,), t))
      reference += float(np.sum(q(block_states, x[BS * b:BS * b + BS], t)
                                * np.asarray(kl_b, np.float64)))
  assert exact > 0.1
  np.testing.assert_allclose(exact, reference, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Block sampling.


@pytest.mark.parametrize("kind", ["masked", pytest.param("uniform", marks=pytest.mark.slow)])
def test_cached_sampler_equals_uncached(kind):
  """Same key: the cached sampler draws the same tokens as the full two-stream forward per step,
  within the trained length and beyond it (sliding context), with student noise."""
  kernel, cfg = model_cfg(kind)
  params = random_params(cfg)
  scfg = sampling.SamplerConfig(steps=3, float64=False)
  noise = lambda key, batch: jax.random.normal(key, (batch, L, cfg.noise_dim))
  for length in (L, 2 * L + BS):
    cached = blocks.sample(jax.random.key(1), params, kernel, scfg, cfg, 16, length, noise, True)
    uncached = blocks.sample(jax.random.key(1), params, kernel, scfg, cfg, 16, length, noise,
                             False)
    assert cached.shape == (16, length)
    np.testing.assert_array_equal(cached, uncached)
    assert len(np.unique(np.asarray(cached))) > 1


def test_cached_block_logits_equal_the_two_stream_logits():
  kernel, cfg = model_cfg("masked")
  params = random_params(cfg)
  x, z = data_and_noisy(kernel)
  t = jnp.array([0.3, 0.8])
  full = jax.jit(functools.partial(blocks.apply, cfg=cfg))(params, z, t, None, x)
  kv = jax.jit(functools.partial(blocks.context_kv, cfg=cfg))(params, x)
  single = jax.jit(functools.partial(blocks.cached_block_logits, cfg=cfg))
  for b in range(L // BS):
    got = single(params, z[:, BS * b:BS * (b + 1)], t, None, kv, b)
    np.testing.assert_allclose(got, full[:, BS * b:BS * (b + 1)], rtol=1e-5, atol=1e-5)


def test_sliding_window():
  """Within L the window starts at 0; beyond, it holds the last L − B tokens."""
  assert [tuple(map(int, blocks.window(n, 8, 2))) for n in (0, 2, 6, 8, 10)] == [
      (0, 0), (0, 1), (0, 3), (2, 3), (4, 3)]


@pytest.mark.parametrize("kind", ["masked", "uniform"])
def test_block_prompts_are_kept(kind):
  kernel, cfg = model_cfg(kind)
  params = random_params(cfg)
  length = 3 * L
  rng = np.random.default_rng(0)
  fixed = rng.random((8, length)) < 0.4
  tokens = rng.integers(0, V, (8, length))
  out = np.asarray(blocks.sample(jax.random.key(2), params, kernel,
                                 sampling.SamplerConfig(steps=4), cfg, 8, length, None, True,
                                 fixed, tokens))
  np.testing.assert_array_equal(out[fixed], tokens[fixed])
  assert out.min() >= 0 and out.max() < V


def test_bfloat16_two_stream_forward_is_close_to_float32():
  kernel, cfg = model_cfg("uniform")
  _, cfg16 = model_cfg("uniform", dtype="bfloat16")
  params = random_params(cfg)
  x, z = data_and_noisy(kernel)
  t = np.array([0.3, 0.8], np.float32)
  f32 = jax.jit(functools.partial(blocks.apply, cfg=cfg))(params, z, t, None, x)
  bf16 = jax.jit(functools.partial(blocks.apply, cfg=cfg16))(params, z, t, None, x)
  assert bf16.dtype == jnp.float32
  assert np.max(np.abs(bf16 - f32)) < 0.05 * np.max(np.abs(f32))  # bf16 rounding, not a bug


_SHARDED_WORKER = r"""
import dataclasses, json, sys
import jax, numpy as np
sys.path.insert(0, sys.argv[1])
import _helpers
from dmmd_jax.infra import sharding
from dmmd_jax.training import setup as setup_lib
from dmmd_jax.training import teacher_run
config = _helpers.make_config("shakespeare_char", "block_tiny", **{
    "train.warmup_steps": 0, "model.num_layers": 1, "model.width": 32})
base = setup_lib.build_setup(config, 8)
rows = np.asarray(base.train_tokens[:8])
out = []
for shape in ((1, 1, 1), (2, 4, 1)):
  mesh = sharding.make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)),
                            devices=jax.devices()[:shape[0] * shape[1]])
  setup = dataclasses.replace(base, mesh=mesh)
  optimizer = teacher_run.teacher_optimizer(config)
  state, shardings = teacher_run.init_teacher_state(setup, optimizer)
  step = teacher_run.compile_teacher_step(setup, optimizer, shardings)
  state, metrics = step(state, sharding.global_batch(rows, mesh))
  out.append((jax.device_get(state.params), float(metrics["loss_bpt"])))
diff = max(float(np.max(np.abs(a - b))) for a, b in
           zip(jax.tree.leaves(out[0][0]), jax.tree.leaves(out[1][0]), strict=True))
print(json.dumps({"param_diff": diff, "losses": [out[0][1], out[1][1]]}))
"""


@pytest.mark.slow
def test_block_teacher_step_sharded_matches_one_device(tmp_path):
  """The block teacher step on a (data 2, fsdp 4) mesh of 8 CPU devices equals one device."""
  script = tmp_path / "worker.py"
  script.write_text(_SHARDED_WORKER)
  env = _helpers.cache_env({"XLA_FLAGS": "--xla_force_host_platform_device_count=8",
                            "JAX_PLATFORMS": "cpu"})
  proc = _helpers.run_python([script, _helpers.REPO / "tests"], env=env, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report["param_diff"] < 1e-5, report
  np.testing.assert_allclose(*report["losses"], rtol=1e-5)
