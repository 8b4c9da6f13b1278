"""Prompts and infilling templates: which positions a sampler keeps fixed, and to which tokens.

A prompt is a token sequence of length n ≤ the generated length; positions i < n are fixed to
their token, positions ≥ n are generated. An infilling template is a prompt in which a marker
string (`fill_marker`, e.g. "_") stands for one position to fill: "To be, or ___ to be" fixes
every character but the three underscores (with GPT-2 BPE, the text between markers is tokenised
piece by piece and each marker is one token to fill). `Prompt.arrays` gives the sampler's
`fixed` (bool) and `fixed_tokens` (int32) arrays, both `[num_samples, length]`.

Prompts come from text (tokenised with the data's own tokenizer; characters outside its
vocabulary are an error) or from a `.npy` token file: int `[n]` (one prompt for every sample) or
`[N, n]` (one per sample, N = the number of samples, e.g. held-out prefixes). Every check raises
`PromptError` with one readable line before anything is compiled.
"""

import dataclasses
import os

import numpy as np

from dmmd_jax.data import tokenizers


class PromptError(ValueError):
  """A prompt that cannot be used with this model."""


@dataclasses.dataclass(frozen=True)
class Prompt:
  """tokens: int32 `[n]` or `[N, n]`; fixed: bool, same shape (False where a marker stood)."""

  tokens: np.ndarray
  fixed: np.ndarray

  @property
  def length(self) -> int:
    return self.tokens.shape[-1]

  def arrays(self, num_samples: int, length: int, vocab_size: int):
    """(fixed bool, fixed_tokens int32), each `[num_samples, length]`; raises PromptError."""
    if self.length > length:
      raise PromptError(f"the prompt has {self.length} tokens but the model generates only "
                        f"{length}; shorten the prompt (or ask for a longer --length).")
    if self.tokens.ndim == 2 and self.tokens.shape[0] != num_samples:
      raise PromptError(f"the prompt file has {self.tokens.shape[0]} rows but "
                        f"{num_samples} samples were asked for; give one row or one per sample.")
    used = self.tokens[self.fixed]
    if used.size and (used.min() < 0 or used.max() >= vocab_size):
      raise PromptError(f"prompt token ids must lie in [0, {vocab_size}); got "
                        f"[{used.min()}, {used.max()}].")
    pad = [(0, 0)] * (self.tokens.ndim - 1) + [(0, length - self.length)]
    tokens = np.pad(np.where(self.fixed, self.tokens, 0), pad).astype(np.int32)
    fixed = np.pad(self.fixed, pad)
    shape = (num_samples, length)
    return np.broadcast_to(fixed, shape).copy(), np.broadcast_to(tokens, shape).copy()


def from_text(text: str, tokenizer, fill_marker: str = "") -> Prompt:
  """Tokenise `text`; each occurrence of `fill_marker` (if non-empty) is one position to fill."""
  if not text:
    raise PromptError("the prompt is empty.")
  pieces = text.split(fill_marker) if fill_marker else [text]
  tokens, fixed = [], []
  for i, piece in enumerate(pieces):
    if i:
      tokens.append(np.zeros(1, np.int32))
      fixed.append(np.zeros(1, bool))
    ids = _encode(tokenizer, piece) if piece else np.zeros(0, np.int32)
    tokens.append(ids)
    fixed.append(np.ones(len(ids), bool))
  return Prompt(np.concatenate(tokens).astype(np.int32), np.concatenate(fixed))


def _encode(tokenizer, text: str) -> np.ndarray:
  try:
    return tokenizer.encode(text)
  except ValueError as e:
    raise PromptError(f"the prompt does not fit the model's vocabulary: {e}") from None


def from_tokens(tokens) -> Prompt:
  """A prompt fixing every position of int tokens `[n]` (one for all samples) or `[N, n]` (one
  per sample, e.g. the first n tokens of N held-out rows)."""
  tokens = np.asarray(tokens)
  return Prompt(tokens.astype(np.int64), np.ones(tokens.shape, bool))


def from_token_file(path: str) -> Prompt:
  """A `.npy` file of int tokens `[n]` or `[N, n]` (all positions fixed)."""
  if not os.path.exists(path):
    raise PromptError(f"prompt token file {path} does not exist.")
  try:
    tokens = np.load(path, allow_pickle=False)
  except ValueError as e:
    raise PromptError(f"cannot read {path} as a .npy array: {e}") from None
  if tokens.ndim not in (1, 2) or not np.issubdtype(tokens.dtype, np.integer) or not tokens.size:
    raise PromptError(f"{path} must hold a non-empty integer array [n] or [N, n]; got "
                      f"{tokens.dtype} {tokens.shape}.")
  return from_tokens(tokens)


def from_flags(info, text: str = "", text_file: str = "", token_file: str = "",
               fill_marker: str = "") -> Prompt | None:
  """The prompt given by at most one of text / text_file / token_file, for data `info`."""
  given = [name for name, v in (("--prompt", text), ("--prompt_file", text_file),
                                ("--prompt_tokens", token_file)) if v]
  if len(given) > 1:
    raise PromptError(f"give at most one of {', '.join(given)}.")
  if fill_marker and not (text or text_file):
    raise PromptError("--fill_marker needs a text prompt (--prompt or --prompt_file).")
  if token_file:
    return from_token_file(token_file)
  if not (text or text_file):
    return None
  if info.kind != "text" or not info.tokenizer:
    raise PromptError("text prompts need a model trained on tokenised text; use "
                      "--prompt_tokens=file.npy for this model.")
  if text_file:
    if not os.path.exists(text_file):
      raise PromptError(f"prompt file {text_file} does not exist.")
    with open(text_file, encoding="utf-8") as f:
      text = f.read()
  return from_text(text, tokenizers.tokenizer_from_spec(info.tokenizer), fill_marker)
