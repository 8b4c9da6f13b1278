"""Block-sparse attention of the two-stream block denoiser (`blocks.py`), without the masked half.

The input is the noisy stream followed by the clean stream, each of length L in blocks of B. A
dense `[2L, 2L]` mask would compute 4L² scores, half of them masked. Here:

    clean queries  → clean keys, block-causal           `[L, L]`
    noisy queries  → clean keys of earlier blocks        `[L, L]` (strictly block-causal)
                   ‖ noisy keys of their own block       `[L, B]` (blocks reshaped side by side)

so 2L² + L·B scores (in the last layer only the noisy queries: the clean stream's output is
never read, only its keys and values). One softmax per noisy query runs over both key sets
together. Masked scores get a large negative value and so exactly zero weight: an output never
depends on a key it must not see, bit for bit.
"""

import jax
import jax.numpy as jnp

_MASKED = -1e30


def _softmax_weights(scores, mask):
  scores = jnp.where(mask, scores.astype(jnp.float32), _MASKED)
  return jax.nn.softmax(scores, axis=-1)


def two_stream_attention(q, k, v, block_size: int, noisy_only: bool = False):
  """q, k, v: `[batch, 2L, heads, head_dim]` (noisy ‖ clean) → `[batch, 2L, heads, head_dim]`,
  or the noisy stream's `[batch, L, heads, head_dim]` only (noisy_only: the last layer)."""
  batch, two_l, heads, dim = q.shape
  length, num_blocks = two_l // 2, two_l // 2 // block_size
  scale = dim ** -0.5
  qn, qc = q[:, :length] * scale, q[:, length:] * scale
  kn, kc, vn, vc = k[:, :length], k[:, length:], v[:, :length], v[:, length:]
  ids = jnp.arange(length) // block_size

  def blocked(a):
    return a.reshape(batch, num_blocks, block_size, heads, dim)

  context = jnp.einsum("bqhd,bkhd->bhqk", qn, kc)  # [batch, heads, L, L]
  own = jnp.einsum("bnqhd,bnkhd->bhnqk", blocked(qn), blocked(kn))
  own = own.reshape(batch, heads, length, block_size)
  mask = jnp.concatenate([ids[:, None] > ids[None, :], jnp.ones((length, block_size), bool)], 1)
  weights = _softmax_weights(jnp.concatenate([context, own], axis=-1), mask).astype(v.dtype)
  noisy = jnp.einsum("bhqk,bkhd->bqhd", weights[..., :length], vc)
  own_w = weights[..., length:].reshape(batch, heads, num_blocks, block_size, block_size)
  noisy = noisy + jnp.einsum("bhnqk,bnkhd->bnqhd", own_w, blocked(vn)).reshape(
      batch, length, heads, dim)
  if noisy_only:
    return noisy
  clean_w = _softmax_weights(jnp.einsum("bqhd,bkhd->bhqk", qc, kc),
                             ids[:, None] >= ids[None, :])
  clean = jnp.einsum("bhqk,bkhd->bqhd", clean_w.astype(v.dtype), vc)
  return jnp.concatenate([noisy, clean], axis=1)
