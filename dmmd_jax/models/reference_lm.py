"""A small causal Transformer language model: the reference LM of the evaluation metrics.

No pretrained language model is available offline, so the gradient-moment metric (GM, method
doc §6) and generative perplexity use a small autoregressive Transformer trained in the project
(`training/reference_lm_run.py`). Any other reference model works as long as it offers the same
two pure functions of `(params, tokens)`:

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

from dmmd_jax import config_lib
from dmmd_jax.data import types as data_types
from dmmd_jax.infra import pytree_io


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
    if self.positions not in config_lib.POSITIONS:
      raise ValueError(f"Unknown positions {self.positions!r}; choose one of "
                       f"{config_lib.POSITIONS}.")
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


@functools.partial(jax.jit, static_argnames=("config", "start"))
def sequence_log_likelihood(params, tokens, *, config: ReferenceLMConfig, start: int = 1):
  """Mean per-token log-likelihood of tokens[:, start:] given prefixes: int `[b, L]` → `[b]`.

  start = 1 (the default) scores every token that has a prefix; start = n, the log-likelihood of
  a continuation given its n-token prompt.
  """
  return jnp.mean(token_log_probs(params, tokens, config=config)[:, start - 1:], axis=-1)


# ---------------------------------------------------------------------------------------------
# A trained reference LM: the metrics' adaptor, and its directory (DIR/reference_lm.json with
# its ReferenceLMConfig, DataInfo, data config and training history + params; `infra/pytree_io`).

RECORD_FILE = "reference_lm.json"


@dataclasses.dataclass(eq=False)
class Trained:
  """A trained reference LM as `gen_ppl` and `gm` use it.

  Any reference model works if it offers `params`, `loglik_fn(params, tokens [b, L]) -> [b]`
  (a fixed, hashable function: a static jit argument), `log_prob_fn(tokens [b, L]) ->
  [b, L − 1]` and `check_compatible(info)`; `gm` with a prompt (evaluate.py --prompt_len=n)
  also needs `loglik_fn_from(n)`, the log-likelihood of tokens[:, n:] given their prefixes.
  eq=False: instances hash by identity, and so do their `loglik_fn` partials, which therefore
  compile once per instance.
  """

  config: ReferenceLMConfig
  params: dict
  info: data_types.DataInfo | None = None
  path: str = ""

  def __post_init__(self):
    self._loglik_fns = {}
    self.loglik_fn = self.loglik_fn_from(1)
    self.log_prob_fn = functools.partial(token_log_probs, self.params, config=self.config)

  def loglik_fn_from(self, start: int):
    """`(params, tokens [b, L]) -> [b]`: mean log-likelihood of tokens[:, start:] (one function
    object per start, so that jit compiles it once)."""
    if start not in self._loglik_fns:
      self._loglik_fns[start] = functools.partial(sequence_log_likelihood, config=self.config,
                                                  start=start)
    return self._loglik_fns[start]

  def check_compatible(self, info: data_types.DataInfo) -> None:
    """ValueError unless samples described by `info` use this LM's tokens and fit its length."""
    where = self.path or "the reference LM"
    if info.vocab_size != self.config.vocab_size:
      raise ValueError(f"{where} has a vocabulary of {self.config.vocab_size} tokens but the "
                       f"samples use {info.vocab_size}; train it on the same data "
                       "(--config.data_from=WORKDIR).")
    if self.info is not None and self.info.tokenizer != info.tokenizer:
      raise ValueError(f"{where} was trained with a different tokenizer than the samples'.")
    if info.seq_len > self.config.max_len:
      raise ValueError(f"{where} reads at most {self.config.max_len} tokens; the samples have "
                       f"{info.seq_len}.")


def save(path: str, lm: Trained, extra: dict) -> None:
  """Store a trained LM in directory `path`; `extra` (JSON-ready) joins its record."""
  pytree_io.save_network(path, RECORD_FILE, lm.params, {
      "kind": "reference_lm", "config": dataclasses.asdict(lm.config),
      "data_info": lm.info.to_json(), **extra})


def load(path: str) -> Trained:
  """The reference LM stored in `path` by `save` (experiments/train_reference_lm.py)."""
  record, params = pytree_io.load_network(path, RECORD_FILE, "a reference-LM directory",
                                          "experiments/train_reference_lm.py")
  return Trained(ReferenceLMConfig(**record["config"]), params,
                 data_types.DataInfo.from_json(record["data_info"]), path)
