"""What token arrays mean (`DataInfo`), the data error, and the one token-array check.

A leaf module: every other part of the package may import it.
"""

import dataclasses
import json
import pickle

import numpy as np


class DataError(ValueError):
  """A data configuration or input that cannot be loaded; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class DataInfo:
  """What the token arrays of a dataset mean.

  Attributes:
    kind: "text" or "image".
    vocab_size: K, the number of data tokens (ids lie in [0, K)).
    seq_len: L, tokens per example (H·W·C for images).
    image_shape: (H, W, C) for images, else None.
    tokenizer: the tokenizer's `spec()` dict for tokenised text, else None.
  """

  kind: str
  vocab_size: int
  seq_len: int
  image_shape: tuple[int, int, int] | None = None
  tokenizer: dict | None = None

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self))

  @classmethod
  def from_json(cls, text: str) -> "DataInfo":
    fields = json.loads(text)
    if fields.get("image_shape") is not None:
      fields["image_shape"] = tuple(fields["image_shape"])
    return cls(**fields)


def load_token_array(path) -> np.ndarray:
  """np.load of a .npy file; DataError naming the path if it is empty, truncated or not .npy."""
  with open(path, "rb") as f:
    head = f.read(6)
  if not head:
    raise DataError(f"{path} is empty (0 bytes), not a .npy array.")
  if head != b"\x93NUMPY":
    raise DataError(f"{path} is not a .npy file (it does not start with the NumPy header).")
  try:
    return np.load(path, allow_pickle=False)
  except (EOFError, ValueError, OSError, pickle.UnpicklingError) as e:
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DataError(f"{path} is not a readable .npy array ({reason}).") from None


def check_tokens(tokens, vocab_size: int, seq_len: int | None = None, name: str = "samples"):
  """int32 `[n, L]` copy of `tokens` with ids in [0, vocab_size), else DataError naming `name`.

  The one check of token arrays from outside the models: data files, sample files, metric inputs.
  """
  tokens = np.asarray(tokens)
  if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer) or tokens.size == 0:
    raise DataError(f"{name} must be a non-empty integer array [n, length], got "
                    f"{tokens.dtype} {tokens.shape}.")
  if seq_len is not None and tokens.shape[1] != seq_len:
    raise DataError(f"{name} have length {tokens.shape[1]}, expected {seq_len}.")
  lo, hi = int(tokens.min()), int(tokens.max())
  if lo < 0 or hi >= vocab_size:
    raise DataError(f"{name} have token ids in [{lo}, {hi}], outside the vocabulary "
                    f"[0, {vocab_size}).")
  return tokens.astype(np.int32)
