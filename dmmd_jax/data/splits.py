"""Held-out splits, example caps and the vocabulary check shared by every data source."""

import os
import pathlib

import numpy as np

from dmmd_jax.data import types as data_types


def cache_dir(cfg=None) -> pathlib.Path:
  """`cfg.cache_dir` if set, else $DMMD_JAX_CACHE, else ~/.cache/dmmd_jax."""
  path = cfg.cache_dir if cfg is not None else ""
  path = path or os.environ.get("DMMD_JAX_CACHE", "") or "~/.cache/dmmd_jax"
  return pathlib.Path(path).expanduser()


def check_vocab(cfg, inferred: int) -> int:
  """Returns `inferred`, after checking that a nonzero `cfg.vocab_size` agrees with it."""
  requested = cfg.vocab_size
  if requested and requested != inferred:
    raise data_types.DataError(
        f"vocab_size={requested} does not match the data's vocabulary of {inferred} tokens; "
        "set vocab_size to 0 to infer it.")
  return inferred


def cap(tokens: np.ndarray, max_examples: int) -> np.ndarray:
  return tokens[:max_examples] if max_examples > 0 else tokens
