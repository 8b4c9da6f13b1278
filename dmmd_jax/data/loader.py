"""The checkpointable grain batch iterator over rows of a token array (train and eval)."""


import grain
import numpy as np

from dmmd_jax.data import types as data_types


def batch_iterator(tokens: np.ndarray, batch_size: int, seed: int, *, shuffle: bool = True,
                   process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
  """An infinite, deterministic, checkpointable iterator over batches of rows of `tokens`.

  Each step draws a global batch of `batch_size` rows (reshuffled every epoch when `shuffle`;
  batches run across epoch boundaries) and host `process_index` gets its contiguous slice, so
  the hosts' batches of one step together form the single-host global batch. Use the returned
  iterator's `get_state()` / `set_state()` to resume exactly.

  Args:
    tokens: int [N, L] examples: an array, or a random-access source with `shape`, `len` and
      row indexing (e.g. `token_shards.TokenWindows`), read a batch of rows at a time.
    batch_size: global batch size B, divisible by `process_count`.
    seed: shuffle seed (taken modulo 2**32).
    shuffle: if False, rows come in order, epoch after epoch.
    process_index: this host's index p in [0, process_count).
    process_count: number of hosts P.

  Returns:
    A `grain.DatasetIterator` yielding int32 [B // P, L].
  """
  if isinstance(tokens, np.ndarray) or not hasattr(tokens, "shape"):
    tokens = np.ascontiguousarray(tokens, dtype=np.int32)  # else a random-access row source
  if tokens.ndim != 2 or len(tokens) == 0:
    raise data_types.DataError(
        f"batch_iterator needs a non-empty [N, L] array, got shape {tokens.shape}.")
  if batch_size < 1 or process_count < 1 or batch_size % process_count:
    raise data_types.DataError(
        f"batch_size={batch_size} must be a positive multiple of process_count={process_count}.")
  if not 0 <= process_index < process_count:
    raise data_types.DataError(f"process_index={process_index} must lie in [0, {process_count}).")
  per_host = batch_size // process_count
  start = process_index * per_host
  ds = grain.MapDataset.range(len(tokens))
  if shuffle:
    ds = ds.shuffle(seed=int(seed) % 2**32)
  ds = ds.repeat().batch(batch_size).map(lambda idx: tokens[idx[start:start + per_host]])
  read = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  return iter(ds.to_iter_dataset(read))
