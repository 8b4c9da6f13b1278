"""The denoiser x̂_θ(z_t, t, ε): a bidirectional Transformer with adaLN time conditioning.

Pre-norm blocks (DiT-style adaLN-Zero: the time embedding produces shift/scale/gate per block),
rotary positions (optionally plus a learned absolute position table), optional bf16 compute with
float32 parameters, and an optional per-position Gaussian noise input ε — the D-MMD student's
extra randomness — added to the token embeddings through a zero-initialised linear projection (so
a student copied from a teacher starts equal to it). For images the noise is a multi-resolution
pyramid (`sample_noise`).

Flax linen, because every network here is used as a pure function of a parameter pytree: teacher,
student and auxiliary are three pytrees over one `apply`. Parameters carry logical axis names
(`embed`, `mlp`, `heads`, `kv`, `vocab`, `cond`) that `sharding.py` maps onto a device mesh.

The embedding table and the output layer may be padded to a multiple of `vocab_multiple` rows /
columns (a tensor axis then splits them evenly); the padded logits are sliced off in
`Transformer`, so nothing downstream ever sees a padded class.

Masked parametrisation (MDLM/MD4) lives in `apply`: the output covers the K data tokens only (MASK
is never predicted) and positions whose input is not MASK copy their token through.

Block-autoregressive models (`block_size` > 0) use the same network with an attention mask, custom
positions, per-segment times and cached context keys/values; `models/blocks.py` builds those inputs.
"""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from dmmd_jax import config_lib
from dmmd_jax.diffusion import forward_process
from dmmd_jax.infra import sharding
from dmmd_jax.models import block_attention

# Activation checkpointing of the Transformer blocks: "block" keeps only each block's input and
# recomputes the rest in the backward pass; the others name a `jax.checkpoint_policies` policy
# (what the block may keep, e.g. every matmul output).
REMAT = {"none": None, "block": "nothing_saveable", "dots_saveable": "dots_saveable",
         "dots_with_no_batch_dims_saveable": "dots_with_no_batch_dims_saveable"}


@dataclasses.dataclass(frozen=True)
class DenoiserConfig:
  """Static description of the network (hashable, so usable as a jit static argument)."""

  vocab_size: int  # K data tokens (output classes)
  input_vocab_size: int  # K + 1 for masked, K for uniform
  seq_len: int
  num_layers: int = 4
  width: int = 256
  num_heads: int = 4
  mlp_ratio: int = 4
  cond_dim: int = 128  # width of the time-conditioning vector feeding adaLN
  dtype: str = "float32"  # compute dtype; parameters are always float32
  time_conditioning: bool = True
  mask_id: int = -1  # >= 0: masked parametrisation (copy-through, MASK never predicted)
  noise_kind: str = "none"
  noise_dim: int = 0  # features per position fed to the noise projection
  image_shape: tuple = ()  # (H, W, C) for the pyramid
  pyramid_levels: int = 3
  attention_impl: str = "xla"  # or "cudnn" on NVIDIA GPUs
  remat: str = "none"  # activation checkpointing of the blocks: a key of REMAT
  block_size: int = 0  # > 0: block-autoregressive (blocks.py); 0: whole-sequence
  vocab_multiple: int = 1  # embedding rows and logits padded to multiples of this (sliced off)
  absolute_positions: bool = False  # learned `[seq_len, width]` position table added to the input

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def padded_vocab_size(self) -> int:
    """Output width of the logits layer: K rounded up to a multiple of vocab_multiple."""
    return _round_up(self.vocab_size, self.vocab_multiple)

  @property
  def padded_input_vocab_size(self) -> int:
    """Rows of the embedding table: the input vocabulary rounded up to vocab_multiple."""
    return _round_up(self.input_vocab_size, self.vocab_multiple)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def rotary(x, positions):
  """Rotary position embedding. x `[batch, length, heads, head_dim]`, positions `[length]`."""
  half = x.shape[-1] // 2
  freqs = 1.0 / (10000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))
  angles = positions[:, None].astype(jnp.float32) * freqs[None, :]  # [length, half]
  sin, cos = jnp.sin(angles)[None, :, None, :], jnp.cos(angles)[None, :, None, :]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def timestep_embedding(t, dim: int):
  """Sinusoidal features of 1000·t: `[batch]` → `[batch, dim]`."""
  half = dim // 2
  freqs = jnp.exp(-jnp.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  args = 1000.0 * t[:, None].astype(jnp.float32) * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _dense(features, axes, name, dtype, zero=False):
  init = nn.initializers.zeros_init() if zero else nn.initializers.xavier_uniform()
  return nn.Dense(
      features, dtype=dtype, param_dtype=jnp.float32, name=name,
      kernel_init=nn.with_logical_partitioning(init, axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[-1:]))


def _per_position(v, length: int):
  """Per-sequence `[batch, d]` or per-segment `[batch, S, d]` values → `[batch, 1 or length, d]`
  (S equal segments of the length, e.g. the noisy and clean streams of a block model)."""
  if v.ndim == 2:
    return v[:, None, :]
  return jnp.repeat(v, length // v.shape[1], axis=1)


def _modulate(x, shift, scale):
  length = x.shape[1]
  return x * (1.0 + _per_position(scale, length)) + _per_position(shift, length)


class Block(nn.Module):
  """Pre-norm Transformer block with adaLN-Zero modulation from the conditioning vector."""

  cfg: DenoiserConfig

  @nn.compact
  def __call__(self, x, cond, positions, mask=None, context=None, two_stream_block=0,
               noisy_only=False):
    """x `[batch, length, width]`, cond `[batch, cond]` or `[batch, S, cond]`, positions
    `[length]`, mask bool `[length, context + length]` or None (full attention), context: keys and
    values `[batch, context, heads, head_dim]` prepended to this input's own, or None;
    two_stream_block > 0: x is (noisy ‖ clean) of a block model, attended block-sparsely
    (`block_attention.py`) instead of with a mask; with noisy_only (the last layer) only the noisy
    stream's output is computed and returned.
    Returns (x, (k, v)) with this input's keys and values (rotary applied)."""
    cfg, dt = self.cfg, self.cfg.compute_dtype
    mods = _dense(6 * cfg.width, ("cond", "embed"), "adaln", dt, zero=True)(cond)
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mods, 6, axis=-1)
    norm = functools.partial(nn.LayerNorm, use_scale=False, use_bias=False, dtype=dt)

    h = _modulate(norm(name="norm1")(x), shift1, scale1)
    head_dim = cfg.width // cfg.num_heads
    qkv = nn.DenseGeneral(
        (3, cfg.num_heads, head_dim), dtype=dt, param_dtype=jnp.float32, name="qkv",
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.xavier_uniform(), ("embed", None, "heads", "kv")),
        use_bias=False)(h)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q, k = rotary(q, positions), rotary(k, positions)
    if two_stream_block:
      attn = block_attention.two_stream_attention(q, k, v, two_stream_block, noisy_only)
      if noisy_only:
        x = x[:, :attn.shape[1]]
        gate1, shift2, scale2, gate2 = (m[:, 0] for m in (gate1, shift2, scale2, gate2))
    else:
      keys, values = (k, v) if context is None else (
          jnp.concatenate([context[0], k], axis=1), jnp.concatenate([context[1], v], axis=1))
      attn = jax.nn.dot_product_attention(
          q, keys, values, mask=None if mask is None else mask[None, None],
          implementation=_attention_impl(cfg))
    attn = nn.DenseGeneral(
        cfg.width, axis=(-2, -1), dtype=dt, param_dtype=jnp.float32, name="attn_out",
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.xavier_uniform(), ("heads", "kv", "embed")),
        use_bias=False)(attn)
    x = x + _per_position(gate1, x.shape[1]) * attn

    h = _modulate(norm(name="norm2")(x), shift2, scale2)
    h = _dense(cfg.mlp_ratio * cfg.width, ("embed", "mlp"), "mlp_in", dt)(h)
    h = _dense(cfg.width, ("mlp", "embed"), "mlp_out", dt)(nn.gelu(h))
    x = x + _per_position(gate2, x.shape[1]) * h
    return sharding.constrain(x, ("batch", "length", "act_embed")), (k, v)


def _attention_impl(cfg):
  return None if cfg.attention_impl == "xla" else cfg.attention_impl


class Transformer(nn.Module):
  """tokens `[batch, length]` int, t `[batch]`, noise `[batch, length, noise_dim]` or None →
  raw logits `[batch, length, vocab]` (float32).

  Block-model inputs (`blocks.py`): t `[batch, S]` gives each of S equal segments of the tokens
  its own time (logits then cover the first segment only); noise may cover a prefix of the
  tokens; positions `[length]`, mask, per-layer context keys/values and two_stream_block as in
  `Block`; `kv_only` returns the per-layer (k, v) instead of logits.
  """

  cfg: DenoiserConfig

  @nn.compact
  def __call__(self, tokens, t, noise=None, positions=None, mask=None, context=None,
               kv_only=False, two_stream_block=0):
    cfg, dt = self.cfg, self.cfg.compute_dtype
    emb = nn.Embed(
        cfg.padded_input_vocab_size, cfg.width, param_dtype=jnp.float32, name="embed",
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(stddev=1.0), ("vocab", "embed")))
    x = emb(tokens).astype(dt)
    positions = jnp.arange(tokens.shape[1]) if positions is None else positions
    if cfg.absolute_positions:
      table = self.param("position_embed", nn.with_logical_partitioning(
          nn.initializers.normal(stddev=0.02), ("length", "embed")), (cfg.seq_len, cfg.width))
      x = x + jnp.asarray(table, dt)[positions][None]
    if noise is not None:
      # init_params always passes noise, so teacher and student share one parameter tree; a
      # teacher (noise=None) never touches these weights, which stay at their zero init.
      proj = _dense(cfg.width, ("noise", "embed"), "noise_proj", dt, zero=True)
      n = noise.shape[1]
      x = jnp.concatenate([x[:, :n] + proj(noise.astype(dt)), x[:, n:]], axis=1)
    x = sharding.constrain(x, ("batch", "length", "act_embed"))

    if not cfg.time_conditioning:
      t = jnp.zeros_like(t)
    cond = timestep_embedding(t.reshape(-1), cfg.width).reshape(*t.shape, cfg.width)
    cond = _dense(cfg.width, ("cond", "embed"), "time_in", dt)(cond)
    cond = nn.silu(_dense(cfg.cond_dim, ("embed", "cond"), "time_out", dt)(nn.silu(cond)))

    kvs = []
    block = _block_class(cfg.remat)
    for i in range(cfg.num_layers):
      x, kv = block(cfg, name=f"block_{i}")(x, cond, positions, mask,
                                            None if context is None else context[i],
                                            two_stream_block,
                                            i == cfg.num_layers - 1 and not kv_only)
      kvs.append(kv)
    if kv_only:
      return kvs
    if cond.ndim == 3:  # segments: logits of the first one only
      x, cond = x[:, :tokens.shape[1] // cond.shape[1]], cond[:, 0]

    shift, scale = jnp.split(_dense(2 * cfg.width, ("cond", "embed"), "final_adaln", dt,
                                    zero=True)(cond), 2, axis=-1)
    x = _modulate(nn.LayerNorm(use_scale=False, use_bias=False, dtype=dt, name="final_norm")(x),
                  shift, scale)
    logits = _dense(cfg.padded_vocab_size, ("embed", "vocab"), "logits", dt)(x)
    return logits[..., :cfg.vocab_size].astype(jnp.float32)  # the padded classes never exist


def _block_class(remat: str):
  """Block, or Block under `nn.remat` with the policy REMAT[remat] (same parameters)."""
  if remat == "none":
    return Block
  return nn.remat(Block, policy=getattr(jax.checkpoint_policies, REMAT[remat]),
                  static_argnums=(5, 6))


def init_params(key, cfg: DenoiserConfig):
  """Boxed (logically partitioned) parameters; `nn.unbox` them or use `sharding.init_sharded`."""
  tokens = jnp.zeros((1, cfg.seq_len), jnp.int32)
  noise = jnp.zeros((1, cfg.seq_len, cfg.noise_dim)) if cfg.noise_kind != "none" else None
  return Transformer(cfg).init(key, tokens, jnp.zeros((1,)), noise)["params"]


def apply(params, tokens, t, noise=None, *, cfg: DenoiserConfig):
  """Denoiser logits `[batch, length, K]` with the masked parametrisation applied.

  tokens: int `[batch, length]` in [0, input_vocab_size); t: `[batch]`; noise:
  `[batch, length, noise_dim]` or None.
  """
  return copy_through(Transformer(cfg).apply({"params": params}, tokens, t, noise), tokens, cfg)


def copy_through(logits, tokens, cfg: DenoiserConfig):
  """The masked parametrisation: positions of `tokens` `[batch, n]` that are not MASK get their
  own token's log one-hot instead of `logits` `[batch, n, K]` (identity for uniform models)."""
  if cfg.mask_id < 0:
    return logits
  copied = forward_process.log_one_hot(jnp.minimum(tokens, cfg.vocab_size - 1), cfg.vocab_size)
  return jnp.where((tokens == cfg.mask_id)[..., None], logits, copied)


def sample_noise(key, cfg: DenoiserConfig, batch_size: int):
  """Fresh student noise ε `[batch, length, noise_dim]` (None when the config has no noise input).

  projection: i.i.d. N(0, 1) per position and feature.
  pyramid: images (H, W, C) flattened row-major; `noise_dim` features split evenly over
    `pyramid_levels` resolutions H/2^l × W/2^l (nearest-upsampled), so neighbouring pixels share
    coarse noise — the multi-resolution input the paper uses for image students. A sequence
    (no image shape) is an L × 1 × 1 image: level l is shared by runs of 2^l positions, and a
    level with 2^l ≥ L is one noise vector for the whole sequence.
  """
  if cfg.noise_kind == "none":
    return None
  if cfg.noise_kind == "projection":
    return jax.random.normal(key, (batch_size, cfg.seq_len, cfg.noise_dim))
  h, w, c = cfg.image_shape or (cfg.seq_len, 1, 1)
  per_level = cfg.noise_dim // cfg.pyramid_levels
  levels = []
  for level, k in enumerate(jax.random.split(key, cfg.pyramid_levels)):
    f = 2**level
    coarse = jax.random.normal(k, (batch_size, -(-h // f), -(-w // f), per_level))
    fine = jnp.repeat(jnp.repeat(coarse, f, axis=1), f, axis=2)[:, :h, :w]
    levels.append(jnp.broadcast_to(fine[:, :, :, None, :], (batch_size, h, w, c, per_level)))
  return jnp.concatenate(levels, axis=-1).reshape(batch_size, h * w * c, -1)


def validate_config(cfg: DenoiserConfig) -> None:
  """Raise ValueError with one readable line for impossible settings."""
  checks = [
      (cfg.num_layers > 0, f"model.num_layers must be positive, got {cfg.num_layers}"),
      (cfg.width > 0, f"model.width must be positive, got {cfg.width}"),
      (cfg.mlp_ratio > 0, f"model.mlp_ratio must be positive, got {cfg.mlp_ratio}"),
      (cfg.noise_kind != "pyramid" or cfg.pyramid_levels > 0,
       "model.pyramid_levels must be positive for the pyramid noise"),
      (cfg.noise_kind != "pyramid" or len(cfg.image_shape) != 3
       or math.prod(cfg.image_shape) == cfg.seq_len,
       f"image shape {cfg.image_shape} does not match sequence length {cfg.seq_len}"),
      (cfg.num_heads > 0 and cfg.width % cfg.num_heads == 0,
       f"model.width ({cfg.width}) must be a positive multiple of model.num_heads "
       f"({cfg.num_heads})"),
      ((cfg.width // max(cfg.num_heads, 1)) % 2 == 0,
       "model.width / model.num_heads must be even (rotary embedding)"),
      (cfg.cond_dim > 0, f"model.cond_dim must be positive, got {cfg.cond_dim}"),
      (cfg.seq_len > 0, f"sequence length must be positive, got {cfg.seq_len}"),
      (cfg.noise_kind in config_lib.NOISE_KINDS,
       f"model.noise_kind must be one of {config_lib.NOISE_KINDS}"),
      (cfg.noise_kind == "none" or cfg.noise_dim > 0,
       "model.noise_dim must be positive when model.noise_kind is not 'none'"),
      (cfg.noise_kind != "pyramid" or len(cfg.image_shape) in (0, 3),
       f"model.noise_kind='pyramid' needs an image shape (H, W, C) or none, got "
       f"{cfg.image_shape}"),
      (cfg.noise_kind != "pyramid" or cfg.noise_dim % max(cfg.pyramid_levels, 1) == 0,
       "model.noise_dim must be divisible by model.pyramid_levels"),
      (cfg.dtype in ("float32", "bfloat16"), "model.dtype must be 'float32' or 'bfloat16'"),
      (cfg.attention_impl in ("xla", "cudnn"), "model.attention_impl must be 'xla' or 'cudnn'"),
      (cfg.remat in REMAT, f"model.remat must be one of {tuple(REMAT)}, got {cfg.remat!r}"),
      (cfg.vocab_multiple > 0, f"model.vocab_multiple must be positive, got {cfg.vocab_multiple}"),
      (cfg.block_size >= 0 and (cfg.block_size == 0 or cfg.seq_len % cfg.block_size == 0),
       f"model.block_size ({cfg.block_size}) must divide the sequence length ({cfg.seq_len})"),
  ]
  for ok, message in checks:
    if not ok:
      raise ValueError(message)
