"""Block-autoregressive diffusion: p(x) = Π_b p(x_b | x_<b), discrete diffusion inside each block.

A sequence of length L is cut into blocks of `block_size` tokens (B | L). Inside block b the
denoiser sees the noisy block bidirectionally and the clean earlier blocks x_<b.

Training (one forward per batch, as in BD3-LM): the noisy sequence z_t and the clean sequence x
go side by side through the network, `[batch, 2L]`, with rotary positions 0..L−1 in both streams
and the attention pattern of `two_stream_mask` (computed block-sparsely, `block_attention.py`):

    noisy block b → noisy block b (bidirectional) and clean blocks < b
    clean block b → clean blocks ≤ b (block-causal; the clean stream never sees the noisy one)

Noisy tokens are conditioned on their time t, clean tokens on t = 0, so the clean stream's keys
and values do not depend on t and can be cached while a block is denoised. The noise input of a
student covers the noisy stream only. The logits of the noisy stream are the L per-position
predictions of every block given its clean context, so the existing losses, summed over
positions, are the sum of the per-block ELBOs (one t per sequence, shared by its blocks: an
unbiased estimate of Σ_b ELBO_b). With block_size = L the model equals the whole-sequence one.

Sampling (`sample`): block by block, k ancestral steps per block. Per block the clean context's
keys and values are computed once (`context_kv`, block-causal as in training) and each of the k
steps runs the network on the noisy block only (`cached_block_logits`); `kv_cache=False` runs the
full two-stream forward every step instead (the reference the cache is tested against). Any
number of blocks can be generated: beyond the trained length L the context is a sliding window of
the last L − block_size tokens, re-positioned to 0..L − block_size − 1 (so the window's first
block sees no earlier context, unlike in training: an approximation).
"""


import jax
import jax.numpy as jnp

from dmmd_jax.diffusion import forward_process, sampling, schedules
from dmmd_jax.models import denoiser


def block_ids(length: int, block_size: int):
  """Block index of every position, int `[length]`."""
  return jnp.arange(length) // block_size


def block_causal_mask(length: int, block_size: int):
  """Clean stream: position i attends to j iff block(j) ≤ block(i); bool `[length, length]`."""
  ids = block_ids(length, block_size)
  return ids[:, None] >= ids[None, :]


def two_stream_mask(length: int, block_size: int):
  """bool `[2L, 2L]` over (noisy ‖ clean): see the module docstring."""
  ids = block_ids(length, block_size)
  noisy = jnp.concatenate([ids[:, None] == ids[None, :], ids[:, None] > ids[None, :]], axis=1)
  clean = jnp.concatenate([jnp.zeros((length, length), bool), block_causal_mask(
      length, block_size)], axis=1)
  return jnp.concatenate([noisy, clean], axis=0)


def apply(params, tokens, t, noise=None, clean=None, *, cfg: denoiser.DenoiserConfig):
  """Block-model logits `[batch, L, K]` of the noisy tokens given the clean context.

  tokens: noisy int `[batch, L]`; t: `[batch]`; noise: `[batch, L, noise_dim]` or None; clean:
  int `[batch, L]` clean tokens (data in training; only blocks before each noisy block are read).
  The masked parametrisation (copy-through) applies to the noisy tokens.
  """
  length = tokens.shape[1]
  positions = jnp.arange(length)
  logits = denoiser.Transformer(cfg).apply(
      {"params": params}, jnp.concatenate([tokens, clean], axis=1),
      jnp.stack([t, jnp.zeros_like(t)], axis=-1), noise,
      jnp.concatenate([positions, positions]), two_stream_block=cfg.block_size)
  return denoiser.copy_through(logits, tokens, cfg)


def context_kv(params, clean, *, cfg: denoiser.DenoiserConfig):
  """Per-layer keys/values of the clean stream, each `[batch, L, heads, head_dim]` (t = 0)."""
  length = clean.shape[1]
  return denoiser.Transformer(cfg).apply(
      {"params": params}, clean, jnp.zeros(clean.shape[:1]), None, jnp.arange(length),
      block_causal_mask(length, cfg.block_size), kv_only=True)


def cached_block_logits(params, z_block, t, noise, kv, block_index, *,
                        cfg: denoiser.DenoiserConfig):
  """Logits `[batch, block, K]` of noisy block `block_index` (int scalar, may be traced).

  z_block: int `[batch, block]`; t: `[batch]`; noise: `[batch, block, noise_dim]` or None;
  kv: `context_kv` of a clean window whose blocks < block_index are the context.
  """
  bs, length = cfg.block_size, kv[0][0].shape[1]
  context_valid = block_ids(length, bs) < block_index
  mask = jnp.concatenate([jnp.broadcast_to(context_valid, (bs, length)),
                          jnp.ones((bs, bs), bool)], axis=1)
  logits = denoiser.Transformer(cfg).apply(
      {"params": params}, z_block, t, noise, block_index * bs + jnp.arange(bs), mask, kv)
  return denoiser.copy_through(logits, z_block, cfg)


def uncached_block_logits(params, z_block, t, noise, clean, block_index, *,
                          cfg: denoiser.DenoiserConfig):
  """The same logits from the full two-stream forward; clean: the window `[batch, L]`, noise:
  `[batch, L, noise_dim]` or None (the block's own slice is used)."""
  bs = cfg.block_size
  noisy = jax.lax.dynamic_update_slice_in_dim(clean, z_block, block_index * bs, axis=1)
  logits = apply(params, noisy, t, noise, clean, cfg=cfg)
  return jax.lax.dynamic_slice_in_dim(logits, block_index * bs, bs, axis=1)


def window(num_generated, seq_len: int, block_size: int):
  """(start, block_index): the clean window `[start, start + L)` of the buffer that block number
  `num_generated // block_size` sees, and its index inside the window (sliding past L)."""
  start = jnp.maximum(0, num_generated - (seq_len - block_size))
  return start, (num_generated - start) // block_size


def _sample_blocks(key, params, kernel, scfg: sampling.SamplerConfig,
                   cfg: denoiser.DenoiserConfig, batch_size: int, length: int, noise_fn,
                   kv_cache: bool, fixed, fixed_tokens):
  bs, seq_len = cfg.block_size, cfg.seq_len
  buffer_len = max(length, seq_len)
  grid = schedules.time_grid(scfg.steps, scfg.grid)
  pad = [(0, 0), (0, buffer_len - length)]
  if fixed is None:
    fixed, fixed_tokens = jnp.zeros((batch_size, length), bool), jnp.zeros((1, length), jnp.int32)
  fixed = jnp.pad(jnp.broadcast_to(fixed, (batch_size, length)), pad)
  fixed_tokens = jnp.pad(jnp.broadcast_to(fixed_tokens, (batch_size, length)), pad)

  def one_block(buffer, b):
    block_key = jax.random.fold_in(key, b)
    start, index = window(b * bs, seq_len, bs)
    clean = jax.lax.dynamic_slice_in_dim(buffer, start, seq_len, axis=1)
    keep = jax.lax.dynamic_slice_in_dim(fixed, b * bs, bs, axis=1)
    keep_tokens = jax.lax.dynamic_slice_in_dim(fixed_tokens, b * bs, bs, axis=1)
    kv = context_kv(params, clean, cfg=cfg) if kv_cache else None

    def network(z, t, noise_key):
      t = jnp.full((batch_size,), t)
      noise = None if noise_fn is None else noise_fn(noise_key, batch_size)
      if kv_cache:
        noise = None if noise is None else jax.lax.dynamic_slice_in_dim(
            noise, index * bs, bs, axis=1)
        return cached_block_logits(params, z, t, noise, kv, index, cfg=cfg)
      return uncached_block_logits(params, z, t, noise, clean, index, cfg=cfg)

    def step(z, i):
      noise_key, draw_key = jax.random.split(jax.random.fold_in(block_key, i))
      logits = network(z, grid[i], noise_key).astype(jnp.float32)
      z_s = sampling.reverse_step(draw_key, kernel, scfg, z, logits, grid[i + 1], grid[i])
      return sampling.clamp(z_s, keep, keep_tokens), None

    prior_key, block_key = jax.random.split(block_key)
    z = sampling.clamp(forward_process.sample_prior(prior_key, kernel, (batch_size, bs)), keep,
                       keep_tokens)
    z, _ = jax.lax.scan(step, z, jnp.arange(scfg.steps))
    return jax.lax.dynamic_update_slice_in_dim(buffer, z, b * bs, axis=1), None

  buffer = jnp.zeros((batch_size, buffer_len), jnp.int32)
  buffer, _ = jax.lax.scan(one_block, buffer, jnp.arange(length // bs))
  return buffer[:, :length]


_jitted = jax.jit(_sample_blocks, static_argnums=(2, 3, 4, 5, 6, 7, 8))


def sample(key, params, kernel: forward_process.ForwardProcess, scfg: sampling.SamplerConfig,
           cfg: denoiser.DenoiserConfig, batch_size: int, length: int, noise_fn=None,
           kv_cache: bool = True, fixed=None, fixed_tokens=None):
  """Draw `[batch_size, length]` int32 tokens block by block, `scfg.steps` steps per block.

  length: any positive multiple of cfg.block_size (beyond cfg.seq_len: sliding context).
  noise_fn(key, batch) → `[batch, L, noise_dim]` student noise (fresh each step) or None; fixed,
  fixed_tokens: `[batch, length]` prompt / template as in `sampling.sample`. `scfg.cache` (the
  skip-unchanged cache of whole-sequence masked models) is not used here.
  """
  scfg.validate()
  if length <= 0 or length % cfg.block_size:
    raise ValueError(f"the sample length ({length}) must be a positive multiple of "
                     f"model.block_size ({cfg.block_size}).")
  args = (key, params, kernel, scfg, cfg, batch_size, length, noise_fn, kv_cache, fixed,
          fixed_tokens)
  if scfg.float64:
    with jax.enable_x64(True):
      return _jitted(*args)
  return _jitted(*args)


def sample_model(key, apply_fn, params, kernel: forward_process.ForwardProcess,
                 scfg: sampling.SamplerConfig,
                 cfg: denoiser.DenoiserConfig, batch_size: int, length: int, noise_fn=None,
                 fixed=None, fixed_tokens=None):
  """`[batch_size, length]` tokens from any model: block by block (cached) for block models,
  else `sampling.sample` with apply_fn (length must then be the model's own)."""
  if cfg.block_size:
    return sample(key, params, kernel, scfg, cfg, batch_size, length, noise_fn, True, fixed,
                  fixed_tokens)
  if length != cfg.seq_len:
    raise ValueError(f"a whole-sequence model generates exactly {cfg.seq_len} tokens, not "
                     f"{length}; other lengths need a block model (model.block_size).")
  return sampling.sample(key, apply_fn, params, kernel, scfg, batch_size, length, noise_fn, fixed,
                         fixed_tokens)
