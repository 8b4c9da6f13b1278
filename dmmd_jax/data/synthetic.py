"""An exact-likelihood sequence source with long-range structure: a Markov chain and its mirror.

A sequence of even length L = 2h over V symbols is

    x_0 ~ p_0,  x_i ~ T[x_{i−1}, ·] for 0 < i < h   (the first half: a Markov chain)
    x_{h+j} = x_{h−1−j} for 0 ≤ j < h             (the second half: the first half reversed)

so every sequence is a palindrome, and position i must equal position L − 1 − i: the
correlations span the whole sequence (position 0 ↔ L − 1), not only neighbours. The transition
matrix T is drawn from a seed: each row is Dirichlet(concentration) mixed with the uniform
distribution at weight `smoothing` (so every palindrome has positive probability and the
exact log-likelihood is finite on exactly the palindromes). p_0 is uniform or a Dirichlet(1)
draw.

Everything is exact, in float64 on the host:
- `log_likelihood(source, tokens)`: log p(x) of any sequences (−inf where the second half is not
  the reversed first half);
- `copy_rate(tokens)`: the fraction of sequences that are palindromes, and the per-position
  agreement x_{h+j} = x_{h−1−j} averaged over the h mirrored pairs;
- `exact_nll(source, tokens)`: the mean −log p_data(x) over the valid (palindromic) samples and
  the valid fraction. For data samples it estimates the source entropy `entropy(source)`
  (nats/sequence); a model below it puts its mass on the source's most likely sequences (mode
  seeking, read it with the unigram entropy), one above it samples unlikely chains.

A few-step factorised sampler must decide mirrored positions independently; the copy rate shows
whether a model captures the long-range constraint, with no proxy model in between.

Data: data.source="synthetic" samples the source named by the data config (`load_dataset`);
`write_dataset` stores `[N, L]` int32 samples as an .npy (usable with
data.source="npy") and the source description next to it (`<stem>.synthetic.json`), from which
`source_for_data_config` rebuilds the source for the evaluation metrics.
"""

import dataclasses
import functools
import json
import os
import pathlib
from typing import NamedTuple

import numpy as np

from dmmd_jax import config_lib
from dmmd_jax.data import types as data_types

INITIALS = ("uniform", "dirichlet")


SIDECAR_SUFFIX = ".synthetic.json"


class SyntheticError(ValueError):
  """A synthetic source description or token array that cannot be used."""


@dataclasses.dataclass(frozen=True)
class SyntheticSource:
  """The source's parameters (frozen and hashable: its tables are cached per instance).

  Attributes:
    vocab_size: V symbols, ids 0..V−1.
    seq_len: L, even; the chain covers the first h = L / 2 positions.
    seed: seeds the transition matrix (and p_0 when initial == "dirichlet").
    concentration: Dirichlet concentration of each transition row; small values give nearly
      deterministic chains (low entropy), large values nearly uniform ones.
    smoothing: weight of the uniform distribution mixed into every transition row.
    initial: "uniform" p_0, or "dirichlet" (a Dirichlet(1) draw from the seed).
  """

  vocab_size: int
  seq_len: int
  seed: int = 0
  concentration: float = 0.1
  smoothing: float = 0.01
  initial: str = "uniform"

  def __post_init__(self):
    if self.vocab_size < 2:
      raise SyntheticError(f"vocab_size must be at least 2, got {self.vocab_size}.")
    if self.seq_len < 2 or self.seq_len % 2:
      raise SyntheticError(f"seq_len must be even and at least 2, got {self.seq_len}.")
    if self.concentration <= 0 or not 0 <= self.smoothing <= 1:
      raise SyntheticError("concentration must be positive and smoothing in [0, 1].")
    if self.initial not in INITIALS:
      raise SyntheticError(f"initial must be one of {INITIALS}, got {self.initial!r}.")
    if self.smoothing == 0 and self.concentration < 1:
      raise SyntheticError("smoothing=0 with concentration < 1 can draw zero transition "
                           "probabilities; use smoothing > 0.")

  @property
  def half(self) -> int:
    return self.seq_len // 2

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


class Tables(NamedTuple):
  """initial `[V]` and transition `[V, V]` (rows sum to 1), float64."""

  initial: np.ndarray
  transition: np.ndarray


@functools.lru_cache(maxsize=32)
def tables(source: SyntheticSource) -> Tables:
  """The source's p_0 and T, drawn deterministically from `source.seed`."""
  rng = np.random.default_rng(source.seed)
  v = source.vocab_size
  rows = rng.dirichlet(np.full(v, source.concentration), size=v)
  transition = (1.0 - source.smoothing) * rows + source.smoothing / v
  transition /= transition.sum(axis=1, keepdims=True)
  if source.initial == "uniform":
    initial = np.full(v, 1.0 / v)
  else:
    initial = rng.dirichlet(np.ones(v))
  return Tables(initial, transition)


def sample(source: SyntheticSource, num: int, seed: int = 0) -> np.ndarray:
  """`num` sequences, int32 `[num, L]`, deterministic for a seed (inverse-CDF, vectorised)."""
  rng = np.random.default_rng(seed)
  initial, transition = tables(source)
  cdf = np.cumsum(transition, axis=1)
  first = np.empty((num, source.half), np.int32)
  first[:, 0] = _draw(np.cumsum(initial)[None], rng.random(num))
  for i in range(1, source.half):
    first[:, i] = _draw(cdf[first[:, i - 1]], rng.random(num))
  return np.concatenate([first, first[:, ::-1]], axis=1)


def _draw(cdf, u):
  """Inverse-CDF draws: cdf `[n or 1, V]`, u `[n]` → int `[n]`."""
  return np.minimum((cdf < u[:, None]).sum(axis=1), cdf.shape[1] - 1)


def is_mirrored(tokens) -> np.ndarray:
  """bool `[n]`: the second half equals the reversed first half. tokens int `[n, L]`, L even."""
  tokens = np.asarray(tokens)
  h = tokens.shape[1] // 2
  return np.all(tokens[:, h:] == tokens[:, :h][:, ::-1], axis=1)


def log_likelihood(source: SyntheticSource, tokens) -> np.ndarray:
  """Exact log p(x), float64 `[n]`, −inf for sequences that are not mirrored.

  Args:
    source: the source.
    tokens: int `[n, L]` with ids in [0, V).
  """
  tokens = data_types.check_tokens(tokens, source.vocab_size, source.seq_len, "tokens")
  initial, transition = tables(source)
  first = tokens[:, :source.half]
  logp = np.log(initial)[first[:, 0]] + np.log(transition)[first[:, :-1], first[:, 1:]].sum(1)
  return np.where(is_mirrored(tokens), logp, -np.inf)


def entropy(source: SyntheticSource) -> float:
  """The source entropy H = E[−log p(x)] in nats per sequence (the chain's; the mirror adds 0).

  H = H(p_0) + Σ_{i=1}^{h−1} Σ_s p_{i−1}(s) H(T[s, ·]), with p_i = p_{i−1} T.
  """
  initial, transition = tables(source)
  row_entropy = -np.sum(transition * np.log(transition), axis=1)
  marginal, total = initial, -np.sum(initial * np.log(initial))
  for _ in range(1, source.half):
    total += marginal @ row_entropy
    marginal = marginal @ transition
  return float(total)


class CopyRate(NamedTuple):
  """rate: fraction of mirrored sequences; position_agreement: mean over the h mirrored pairs."""

  rate: float
  position_agreement: float


def copy_rate(tokens) -> CopyRate:
  """How often samples satisfy the mirror constraint. tokens int `[n, L]` with L even."""
  tokens = np.asarray(tokens)
  if tokens.ndim != 2 or tokens.shape[1] % 2 or len(tokens) == 0:
    raise SyntheticError(f"copy_rate needs a non-empty [n, L] array with L even, got shape "
                         f"{tokens.shape}.")
  h = tokens.shape[1] // 2
  agree = tokens[:, h:] == tokens[:, :h][:, ::-1]
  return CopyRate(rate=float(np.mean(np.all(agree, axis=1))),
                  position_agreement=float(np.mean(agree)))


class MirrorErrors(NamedTuple):
  """Mirrored pairs (i, L − 1 − i) of a k-step masked sampler's output, by the step that completed
  them; each field int64 `[k]`, index = the sampler's step (0 = the first, from all-MASK).

  together / together_wrong: pairs whose two positions were unmasked in the same step (the
    sampler drew both at once, so only a joint draw keeps them equal), and how many disagree;
  after / after_wrong: pairs whose second position was unmasked in this step while its partner
    was already visible (a copy), and how many disagree.
  """

  together: np.ndarray
  together_wrong: np.ndarray
  after: np.ndarray
  after_wrong: np.ndarray


def mirror_errors_by_step(tokens, order, steps: int) -> MirrorErrors:
  """Where a sampler breaks the mirror. tokens, order int `[n, L]` (L even); order from
  `sampling.sample(..., return_order=True)`: the step in [0, steps) that unmasked each position,
  −1 for positions given from the start (a prompt), which count as visible before step 0."""
  tokens, order = np.asarray(tokens), np.asarray(order)
  if tokens.shape != order.shape or tokens.ndim != 2 or tokens.shape[1] % 2:
    raise SyntheticError(f"mirror_errors_by_step needs tokens and order of one [n, L] shape with "
                         f"L even, got {tokens.shape} and {order.shape}.")
  h = tokens.shape[1] // 2
  wrong = tokens[:, :h] != tokens[:, ::-1][:, :h]
  first, last = (f(order[:, :h], order[:, ::-1][:, :h]) for f in (np.minimum, np.maximum))
  at_step = last[None] == np.arange(steps)[:, None, None]  # [steps, n, h]
  together, after = at_step & (first == last)[None], at_step & (first < last)[None]
  return MirrorErrors(*(np.sum(m, axis=(1, 2)) for m in (together, together & wrong[None],
                                                          after, after & wrong[None])))


class ExactNLL(NamedTuple):
  """nll: mean −log p_data (nats/sequence) over valid samples (nan if none); valid_fraction."""

  nll: float
  valid_fraction: float


def exact_nll(source: SyntheticSource, tokens) -> ExactNLL:
  """Mean exact negative log-likelihood of model samples under the source, over valid ones."""
  logp = log_likelihood(source, tokens)
  valid = np.isfinite(logp)
  nll = float(-logp[valid].mean()) if valid.any() else float("nan")
  return ExactNLL(nll=nll, valid_fraction=float(valid.mean()))


def sidecar_path(npy_path) -> pathlib.Path:
  """`DIR/name.npy` → `DIR/name.synthetic.json`."""
  path = pathlib.Path(npy_path).expanduser()
  return path.with_name(path.stem + SIDECAR_SUFFIX)


def write_dataset(source: SyntheticSource, num_examples: int, path, sample_seed: int = 1):
  """Writes `num_examples` samples to `path` (.npy) and the source to its sidecar JSON.

  Skips the work when both files exist and describe the same source and size. The files are
  written atomically (temporary name, then rename), so concurrent writers are safe.
  """
  path = pathlib.Path(path).expanduser()
  spec = {"source": source.to_json(), "num_examples": int(num_examples),
          "sample_seed": int(sample_seed)}
  side = sidecar_path(path)
  if path.exists() and side.exists() and json.loads(side.read_text()) == spec:
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  tokens = sample(source, num_examples, sample_seed)
  tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npy")
  np.save(tmp, tokens)
  os.replace(tmp, path)
  tmp_side = side.with_name(f"{side.name}.tmp{os.getpid()}")
  tmp_side.write_text(json.dumps(spec, indent=2))
  os.replace(tmp_side, side)
  return path


def source_from_data_fields(data_cfg) -> SyntheticSource:
  """The source a data config with source="synthetic" describes (see `load_dataset`)."""
  data_cfg = config_lib.typed(data_cfg, config_lib.DataConfig)
  return SyntheticSource(
      vocab_size=data_cfg.vocab_size, seq_len=data_cfg.seq_len, seed=data_cfg.synthetic_seed,
      concentration=data_cfg.synthetic_concentration)


def source_for_data_config(data_cfg) -> SyntheticSource | None:
  """The synthetic source behind a data config, or None if the data is not synthetic.

  Recognises data.source="synthetic" (see `load_dataset`) and data.source="npy" whose .npy has
  a sidecar written by `write_dataset`.
  """
  data_cfg = config_lib.typed(data_cfg, config_lib.DataConfig)
  kind = data_cfg.source
  if kind == "synthetic":
    return source_from_data_fields(data_cfg)
  if kind != "npy" or not data_cfg.path:
    return None
  side = sidecar_path(data_cfg.path)
  if not side.exists():
    return None
  return SyntheticSource(**json.loads(side.read_text())["source"])


def load_dataset(data_cfg):
  """`data.load_dataset` for data.source="synthetic": samples drawn from the config's source.

  Reads vocab_size (V), seq_len (L), max_examples (N sequences; 0 → 10,000), eval_fraction and
  the optional synthetic_seed / synthetic_concentration; returns (train [N − M, L],
  eval [M, L], DataInfo(kind="text")), eval = the last eval_fraction of the rows.
  """

  try:
    source = source_from_data_fields(data_cfg)
  except SyntheticError as e:
    raise data_types.DataError(f"synthetic source: {e}") from None
  num = data_cfg.max_examples or 10_000
  tokens = sample(source, num, seed=source.seed + 1)
  n_eval = int(num * data_cfg.eval_fraction)
  if n_eval == 0:
    raise data_types.DataError(f"eval_fraction holds out no rows of {num}.")
  info = data_types.DataInfo(kind="text", vocab_size=source.vocab_size, seq_len=source.seq_len)
  return tokens[:num - n_eval], tokens[num - n_eval:], info
