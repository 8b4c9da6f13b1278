"""The registry of data sources and `load_dataset`, the one entry point from a data config.

Every source turns a `config_lib.DataConfig` into int32 token arrays `train [N, L]` and
`eval [M, L]` with ids in [0, K), plus a `DataInfo` describing them:

  text   (shakespeare, text_file, tfds_text, npy; `text.py`): tokenised (characters or GPT-2
         BPE) and cut into non-overlapping windows of L = `seq_len` tokens.
  synthetic (`synthetic.py`): `max_examples` sequences of the exact-likelihood mirror source with
         K = `vocab_size`, L = `seq_len`, `synthetic_seed`, `synthetic_concentration`.
  image  (fashion_mnist, digits, tfds_image; `images.py`): pixels flattened row-major over
         (H, W, C), so L = H·W·C, quantised to K = `levels` grey levels.
  tokens (`token_shards.py`): a directory of pre-tokenized shards (`path`, written by
         experiments/prepare_data.py); train and eval are `TokenWindows`, read on demand from
         memory-mapped files (`verify_shards`: "quick" sizes or "full" checksums).

Fields: `tokenizer` ("char" | "gpt2", text), `path` (text_file, npy), `vocab_size` (npy:
required; else 0 = infer, nonzero must match), `seq_len` (text window; npy: 0 = from the array;
images: ignored), `eval_fraction`, `tfds_name`, `tfds_data_dir`, `cache_dir`, `levels` (images;
0 = native), `max_examples` (0 = all; caps train and eval).

A new source is one loader function and one entry in `SOURCES` (and its name in
`config_lib.DATA_SOURCES`).
"""

import numpy as np

from dmmd_jax import config_lib
from dmmd_jax.data import images, synthetic, text, token_shards
from dmmd_jax.data import types as data_types

SOURCES = {
    "shakespeare": text.load_shakespeare,
    "text_file": text.load_text_file,
    "npy": text.load_npy,
    "tfds_text": text.load_tfds_text,
    "synthetic": synthetic.load_dataset,
    "fashion_mnist": images.load_images,
    "digits": images.load_images,
    "tfds_image": images.load_images,
    "tokens": token_shards.load_dataset,
}


def load_dataset(cfg: config_lib.DataConfig) -> tuple[np.ndarray, np.ndarray,
                                                      data_types.DataInfo]:
  """(train int32 `[N, L]`, eval int32 `[M, L]`, DataInfo) of a data config.

  Raises DataError for any configuration or input that cannot be loaded.
  """
  cfg = config_lib.typed(cfg, config_lib.DataConfig)
  try:
    config_lib.validate_data(cfg)
  except config_lib.ConfigError as e:
    raise data_types.DataError(str(e)) from None
  return SOURCES[cfg.source](cfg)
