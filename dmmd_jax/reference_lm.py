"""A small causal Transformer language model: the reference LM of the evaluation metrics.

No pretrained language model is available offline, so the gradient-moment metric (GM, method
doc §6) and generative perplexity use a small autoregressive Transformer trained in the project
(`train_reference_lm`). Any other reference model works as long as it offers the same two pure
functions of `(params, tokens)`:

- `sequence_log_likelihood(params, tokens [b, L]) -> [b]`: mean per-token log-likelihood of
  tokens[1:] given their prefixes (the per-sequence log p of GM);
- `token_log_probs(params, tokens [b, L]) -> [b, L - 1]`: log p(tokens[i] | tokens[:i]) for
  i = 1..L-1 (what perplexity averages).

Architecture: token embedding, learned absolute or rotary positions, `num_layers` pre-LayerNorm
blocks (causal multi-head self-attention, GELU MLP), a final LayerNorm and a tied or untied output
projection. Written in flax.linen because the model is only ever used as a pure function of its
parameter pytree (`ReferenceLM(config).apply`), which is what `jax.grad` over ψ in GM needs.
The first token has no prefix and is never scored (there is no BOS token).
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dmmd_jax import metrics

POSITIONS = ("learned", "rotary")


@dataclasses.dataclass(frozen=True)
class ReferenceLMConfig:
  """Sizes of the reference LM (frozen, hence hashable and usable as a static jit argument).

  Attributes:
    vocab_size: number of token ids.
    max_len: longest sequence the model reads (size of the learned position table).
    num_layers: Transformer blocks.
    width: model (embedding) width.
    num_heads: attention heads; must divide `width`.
    mlp_ratio: MLP hidden width / `width`.
    positions: "learned" (absolute position embeddings) or "rotary" (RoPE on queries and keys).
    tie_embeddings: use the token embedding matrix as the output projection.
  """

  vocab_size: int
  max_len: int
  num_layers: int = 2
  width: int = 128
  num_heads: int = 4
  mlp_ratio: int = 4
  positions: str = "learned"
  tie_embeddings: bool = True

  def __post_init__(self):
    if self.positions not in POSITIONS:
      raise ValueError(f"Unknown positions {self.positions!r}; choose one of {POSITIONS}.")
    if self.width % self.num_heads:
      raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}.")
    if self.positions == "rotary" and (self.width // self.num_heads) % 2:
      raise ValueError("Rotary positions need an even head dimension.")
    if self.vocab_size < 2 or self.max_len < 2:
      raise ValueError("vocab_size and max_len must both be at least 2.")


def rotary(x, positions):
  """Rotary position embedding (RoPE) of queries or keys.

  Args:
    x: `[batch, length, heads, head_dim]` with an even head_dim.
    positions: int `[length]`.

  Returns:
    `[batch, length, heads, head_dim]`, each half-pair of channels rotated by position · freq.
  """
  half = x.shape[-1] // 2
  freqs = 1.0 / (10_000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))
  angles = positions[:, None].astype(jnp.float32) * freqs  # [length, half]
  sin, cos = jnp.sin(angles)[:, None, :], jnp.cos(angles)[:, None, :]
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


class CausalSelfAttention(nn.Module):
  """Multi-head self-attention where position i attends to positions ≤ i."""

  config: ReferenceLMConfig

  @nn.compact
  def __call__(self, h):
    """`[batch, length, width]` → `[batch, length, width]`."""
    cfg = self.config
    head_dim = cfg.width // cfg.num_heads
    dense = functools.partial(nn.DenseGeneral, features=(cfg.num_heads, head_dim), use_bias=False)
    q, k, v = dense(name="query")(h), dense(name="key")(h), dense(name="value")(h)
    if cfg.positions == "rotary":
      pos = jnp.arange(h.shape[1])
      q, k = rotary(q, pos), rotary(k, pos)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim).astype(h.dtype)
    causal = jnp.tril(jnp.ones((h.shape[1], h.shape[1]), bool))
    logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
    return nn.DenseGeneral(cfg.width, axis=(-2, -1), use_bias=False, name="out")(out)


class Block(nn.Module):
  """Pre-norm Transformer block: h + attn(LN(h)), then h + MLP(LN(h))."""

  config: ReferenceLMConfig

  @nn.compact
  def __call__(self, h):
    """`[batch, length, width]` → `[batch, length, width]`."""
    cfg = self.config
    h = h + CausalSelfAttention(cfg, name="attention")(nn.LayerNorm(name="ln_attention")(h))
    y = nn.Dense(cfg.mlp_ratio * cfg.width, name="mlp_in")(nn.LayerNorm(name="ln_mlp")(h))
    return h + nn.Dense(cfg.width, name="mlp_out")(nn.gelu(y))


class ReferenceLM(nn.Module):
  """Causal Transformer LM: int tokens `[batch, length]` → next-token logits `[batch, length, V]`.

  logits[:, i] is the prediction of tokens[:, i + 1] from tokens[:, :i + 1].
  """

  config: ReferenceLMConfig

  @nn.compact
  def __call__(self, tokens):
    cfg = self.config
    if tokens.shape[1] > cfg.max_len:
      raise ValueError(f"Sequence length {tokens.shape[1]} exceeds max_len {cfg.max_len}.")
    embed = nn.Embed(cfg.vocab_size, cfg.width, embedding_init=nn.initializers.normal(0.02),
                     name="embed")
    h = embed(tokens)
    if cfg.positions == "learned":
      table = self.param("position_embedding", nn.initializers.normal(0.02),
                         (cfg.max_len, cfg.width))
      h = h + table[None, :tokens.shape[1]]
    for i in range(cfg.num_layers):
      h = Block(cfg, name=f"block_{i}")(h)
    h = nn.LayerNorm(name="ln_final")(h)
    if cfg.tie_embeddings:
      return embed.attend(h)
    return nn.Dense(cfg.vocab_size, use_bias=False, name="unembed")(h)


@functools.partial(jax.jit, static_argnames=("config",))
def init_params(key, config: ReferenceLMConfig):
  """Fresh parameters of `ReferenceLM(config)` (a pytree)."""
  dummy = jnp.zeros((1, config.max_len), jnp.int32)
  return ReferenceLM(config).init(key, dummy)["params"]


def init_reference_lm(key, vocab_size: int, seq_len: int, **sizes):
  """Parameters of `ReferenceLM(ReferenceLMConfig(vocab_size, seq_len, **sizes))`.

  Args:
    key: PRNG key.
    vocab_size: number of token ids.
    seq_len: max_len of the model.
    **sizes: any other `ReferenceLMConfig` field (num_layers, width, num_heads, ...); pass the
      same values to the config given to `sequence_log_likelihood` / `token_log_probs`.

  Returns:
    The parameter pytree.
  """
  return init_params(key, ReferenceLMConfig(vocab_size, seq_len, **sizes))


@functools.partial(jax.jit, static_argnames=("config",))
def next_token_logits(params, tokens, *, config: ReferenceLMConfig):
  """Logits of tokens[:, i + 1] given tokens[:, :i + 1]: int `[b, L]` → `[b, L, vocab_size]`."""
  return ReferenceLM(config).apply({"params": params}, tokens)


@functools.partial(jax.jit, static_argnames=("config",))
def token_log_probs(params, tokens, *, config: ReferenceLMConfig):
  """log p_ψ(tokens[:, i] | tokens[:, :i]) for i = 1..L-1: int `[b, L]` → float32 `[b, L - 1]`."""
  logits = next_token_logits(params, tokens, config=config)[:, :-1].astype(jnp.float32)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]


@functools.partial(jax.jit, static_argnames=("config",))
def sequence_log_likelihood(params, tokens, *, config: ReferenceLMConfig):
  """Mean per-token log-likelihood of tokens[:, 1:] given prefixes: int `[b, L]` → `[b]`."""
  return jnp.mean(token_log_probs(params, tokens, config=config), axis=-1)


def make_optimizer(lr: float, num_steps: int, weight_decay: float = 0.01):
  """AdamW with linear warm-up (5% of steps), cosine decay to lr/10, and grad clipping at 1."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, lr, max(1, num_steps // 20), max(2, num_steps), end_value=0.1 * lr)
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, b2=0.99, weight_decay=weight_decay))


@functools.lru_cache(maxsize=16)
def _optimizer_and_step(config: ReferenceLMConfig, lr: float, num_steps: int,
                        weight_decay: float):
  """The optimiser and its jitted training step (cached, so repeated runs compile once)."""
  optimizer = make_optimizer(lr, num_steps, weight_decay)

  @jax.jit
  def step(params, opt_state, batch):
    """One AdamW step on the mean token NLL of `batch` `[b, L]` → (params, state, nll)."""
    loss_fn = lambda p: -jnp.mean(token_log_probs(p, batch, config=config))
    nll, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, nll

  return optimizer, step


def _batch_indices(rng, num_examples: int, batch_size: int, num_steps: int):
  """Indices `[num_steps, batch_size]` from consecutive shuffled epochs (no repeats in an epoch)."""
  epochs = -(-num_steps * batch_size // num_examples)
  order = np.concatenate([rng.permutation(num_examples) for _ in range(epochs)])
  return order[:num_steps * batch_size].reshape(num_steps, batch_size)


def evaluate_nll(params, tokens, *, config: ReferenceLMConfig, batch_size: int = 64) -> float:
  """Token-weighted mean NLL (nats) of int `[n, L]` tokens, accumulated in float64."""
  log_prob_fn = functools.partial(token_log_probs, params, config=config)
  return metrics.generative_perplexity(log_prob_fn, tokens, micro_batch=batch_size).nll


def train_reference_lm(tokens, config: ReferenceLMConfig, *, num_steps: int, batch_size: int,
                       lr: float, seed: int, eval_tokens=None, log_every: int = 100,
                       weight_decay: float = 0.01, init=None):
  """Trains the reference LM by next-token prediction with AdamW (deterministic for a seed).

  Args:
    tokens: int `[N, L]` training sequences (numpy), L ≤ config.max_len.
    config: model sizes.
    num_steps: optimiser steps.
    batch_size: sequences per step (sampled from shuffled epochs of `tokens`).
    lr: peak learning rate (warm-up and cosine decay, see `make_optimizer`).
    seed: seeds the parameter initialisation and the batch order.
    eval_tokens: optional int `[M, L]` held-out sequences, evaluated at every log point.
    log_every: log every this many steps (and at the last step).
    weight_decay: AdamW decoupled weight decay.
    init: optional starting parameters (otherwise `init_params(PRNGKey(seed), config)`).

  Returns:
    (params, history): history is a dict of lists, "step", "train_nll" (mean training NLL over
    the steps since the previous log point) and, with eval_tokens, "eval_nll".
  """
  tokens = np.asarray(tokens, np.int32)
  params = init_params(jax.random.PRNGKey(seed), config) if init is None else init
  optimizer, step_fn = _optimizer_and_step(config, lr, num_steps, weight_decay)
  opt_state = optimizer.init(params)
  order = _batch_indices(np.random.default_rng(seed), len(tokens), batch_size, num_steps)
  history = {"step": [], "train_nll": []} | ({"eval_nll": []} if eval_tokens is not None else {})
  window = []
  for step in range(num_steps):
    params, opt_state, nll = step_fn(params, opt_state, tokens[order[step]])
    window.append(nll)
    if (step + 1) % log_every == 0 or step + 1 == num_steps:
      history["step"].append(step + 1)
      history["train_nll"].append(float(np.mean(jax.device_get(window))))
      window = []
      if eval_tokens is not None:
        history["eval_nll"].append(evaluate_nll(params, eval_tokens, config=config))
  return params, history
