"""Pre-tokenized corpora on disk: a parallel, resumable shard writer and a memory-mapped reader.

A prepared directory holds

    index.json            tokenizer spec, vocabulary, dtype, token counts, and per shard: file,
                          split ("train" | "eval"), num_tokens, bytes, sha256, sample_sha256
    train-00000.npy …     1-D token arrays (.npy, uint16 when K ≤ 65,536 else uint32)
    eval-00000.npy …      the held-out shards (separate files)

Input documents (a text file, every file of a directory, each line of a JSONL file, each record
of a tfds split) are tokenised and each is followed by a separator (GPT-2: <|endoftext|>; chars:
"\\n"), exactly as `text.join_docs` does in memory. Large files are cut into pieces only at a
"x\\nY" boundary (x, Y printable ASCII), where GPT-2's pre-tokenizer also breaks, so the shards
hold the same tokens as tokenising each document whole (a file with no such boundary in a 1 MiB
stretch is cut at a newline or character boundary, where BPE tokens may differ).

Writing: `prepare(...)` plans the pieces and shards (plan.json), then tokenises shards in worker
processes. Each shard is written to a temporary name and renamed when complete, its metadata
likewise, and index.json last, so a killed run leaves only finished shards visible and the same
command continues where it stopped without rewriting them.

Reading: `load_dataset(data_cfg)` (data.source="tokens", data.path=DIR) checks the index against
the shards (existence, size, .npy header, sampled checksum; full SHA-256 with
data.verify_shards="full"), then returns `TokenWindows`: fixed-length windows of L tokens cut
inside each shard, read on demand from memory-mapped shards (a grain-compatible random-access
source: `len`, `[i]`, `[slice]`, `[index array]`).
"""

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import multiprocessing
import os
import pathlib
import re
import time

import numpy as np

from dmmd_jax import config_lib
from dmmd_jax.data import splits, tfds_io, tokenizers
from dmmd_jax.data import types as data_types

FORMAT = "dmmd_jax.token_shards/1"
INDEX_FILE = "index.json"
PLAN_FILE = "plan.json"
PROGRESS_DIR = ".progress"
TOKENIZERS = ("char", "gpt2")
VERIFY_MODES = ("quick", "full")
_SAFE_CUT = re.compile(rb"[\x21-\x7e]\n[\x21-\x7e]")
_CUT_SEARCH = 1 << 20
_SAMPLE = 1 << 16
_TFDS_DOCS_PER_SHARD = 20_000


class ShardError(data_types.DataError):
  """A prepared-token directory or input that cannot be used; the message names the file."""


# ----------------------------------------------------------------------------------------------
# Planning: inputs → pieces → shards.


def _input_files(path: pathlib.Path) -> list[pathlib.Path]:
  if path.is_file():
    return [path]
  if path.is_dir():
    files = sorted(p for p in path.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
      raise ShardError(f"{path} holds no files.")
    return files
  raise ShardError(f"{path}: no such file or directory.")


def _is_jsonl(path: pathlib.Path) -> bool:
  return path.suffix in (".jsonl", ".json")


def _cut_near(f, size: int, target: int, jsonl: bool) -> int:
  """The first safe cut at or after byte `target` of an open file (see the module docstring)."""
  f.seek(target - 1)
  window = f.read(_CUT_SEARCH + 2)
  match = None if jsonl else _SAFE_CUT.search(window)
  if match is not None:
    return target - 1 + match.start() + 2
  newline = window.find(b"\n")
  if newline >= 0:
    return min(size, target + newline)
  for i, byte in enumerate(window[1:]):  # a UTF-8 character start
    if byte & 0xC0 != 0x80:
      return target + i
  return size


def _file_pieces(path: pathlib.Path, offset: int, eval_start: int, piece_bytes: int) -> list:
  """Pieces {path, start, end, jsonl, last, split} of one file at global byte `offset`."""
  size, jsonl = path.stat().st_size, _is_jsonl(path)
  targets = set(range(piece_bytes, size, piece_bytes))
  if offset < eval_start < offset + size:
    targets.add(eval_start - offset)
  cuts = [0]
  with open(path, "rb") as f:
    for target in sorted(targets):
      if target > cuts[-1]:
        cut = _cut_near(f, size, target, jsonl)
        if cuts[-1] < cut < size:
          cuts.append(cut)
  cuts.append(size)
  return [dict(path=str(path), start=a, end=b, jsonl=jsonl, last=b == size,
               split="eval" if offset + a >= eval_start else "train")
          for a, b in zip(cuts, cuts[1:], strict=False) if b > a or size == 0]


def _group(pieces: list, shard_bytes: int) -> list:
  """Consecutive pieces of one split grouped into shards of at most ~shard_bytes input bytes."""
  shards, counters = [], {"train": 0, "eval": 0}
  for piece in pieces:
    size = piece["end"] - piece["start"]
    last = shards[-1] if shards else None
    if last is None or last["split"] != piece["split"] or last["bytes"] + size > shard_bytes:
      name = f"{piece['split']}-{counters[piece['split']]:05d}"
      counters[piece["split"]] += 1
      last = dict(name=name, split=piece["split"], bytes=0, pieces=[])
      shards.append(last)
    last["pieces"].append(piece)
    last["bytes"] += size
  return shards


def plan_files(input_path, eval_fraction: float, piece_bytes: int, shard_bytes: int) -> list:
  """Shards [{name, split, bytes, pieces}] of a text file, JSONL file or directory."""
  files = _input_files(pathlib.Path(input_path).expanduser())
  sizes = [p.stat().st_size for p in files]
  total = sum(sizes)
  if total == 0:
    raise ShardError(f"{input_path}: the input is empty.")
  eval_start = total - int(total * eval_fraction) if eval_fraction > 0 else total + 1
  pieces, offset = [], 0
  for path, size in zip(files, sizes, strict=True):
    pieces += _file_pieces(path, offset, eval_start, piece_bytes)
    offset += size
  shards = _group(pieces, shard_bytes)
  if eval_fraction > 0 and not any(s["split"] == "eval" for s in shards):
    raise ShardError(f"--eval_fraction={eval_fraction} of {input_path} ({total} bytes) holds out "
                     "nothing; raise it or give more data.")
  return shards


def plan_tfds(name: str, data_dir: str, eval_fraction: float,
              docs_per_shard: int = _TFDS_DOCS_PER_SHARD) -> list:
  """Shards of a tfds text dataset: its test/validation split is held out, else the last
  `eval_fraction` of the train documents."""
  train_len = len(tfds_io.split(name, "train", data_dir))
  eval_split = next((s for s in tfds_io.EVAL_SPLITS if _has_split(name, s, data_dir)),
                    None)
  if eval_split is None:
    n_eval = int(train_len * eval_fraction)
    ranges = [("train", "train", 0, train_len - n_eval),
              ("train", "eval", train_len - n_eval, train_len)]
  else:
    eval_len = len(tfds_io.split(name, eval_split, data_dir))
    ranges = [("train", "train", 0, train_len), (eval_split, "eval", 0, eval_len)]
  shards, counters = [], {"train": 0, "eval": 0}
  for tfds_split, split, lo, hi in ranges:
    for start in range(lo, hi, docs_per_shard):
      piece = dict(tfds=name, tfds_split=tfds_split, data_dir=data_dir, start=start,
                   end=min(hi, start + docs_per_shard), split=split)
      shards.append(dict(name=f"{split}-{counters[split]:05d}", split=split,
                         bytes=piece["end"] - start, pieces=[piece]))
      counters[split] += 1
  return shards


def _has_split(name: str, split: str, data_dir: str) -> bool:
  try:
    tfds_io.split(name, split, data_dir)
    return True
  except data_types.DataError:
    return False


# ----------------------------------------------------------------------------------------------
# Reading documents of a piece.


def _piece_docs(piece: dict, jsonl_field: str) -> list[tuple[str, bool]]:
  """The piece's text as [(text, ends_a_document)]."""
  if "tfds" in piece:
    source = tfds_io.split(piece["tfds"], piece["tfds_split"], piece["data_dir"])
    return [(_as_text(source[i]["text"]), True) for i in range(piece["start"], piece["end"])]
  path = piece["path"]
  try:
    with open(path, "rb") as f:
      f.seek(piece["start"])
      raw = f.read(piece["end"] - piece["start"])
    text = raw.decode("utf-8")
  except OSError as e:
    raise ShardError(f"{path}: cannot be read ({e.strerror or e}).") from e
  except UnicodeDecodeError as e:
    raise ShardError(f"{path} is not UTF-8 text (byte {piece['start'] + e.start}).") from e
  if not piece["jsonl"]:
    return [(text, piece["last"])]
  return [(_jsonl_text(line, path, jsonl_field), True) for line in text.splitlines()
          if line.strip()]


def _as_text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _jsonl_text(line: str, path: str, field: str) -> str:
  try:
    return _as_text(json.loads(line)[field])
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise ShardError(f"{path}: a line is not a JSON object with a {field!r} field "
                     f"({type(e).__name__}: {line[:60]!r}).") from e


def _piece_codepoints(piece: dict, jsonl_field: str) -> np.ndarray:
  """Sorted distinct Unicode code points of a piece's documents, uint32 [n]."""
  seen = np.zeros([0x110000], bool)
  for text, _ in _piece_docs(piece, jsonl_field):
    seen[np.frombuffer(text.encode("utf-32-le"), np.uint32)] = True
  return np.flatnonzero(seen).astype(np.uint32)


# ----------------------------------------------------------------------------------------------
# Writing shards.


def dtype_for(vocab_size: int) -> str:
  """The most compact unsigned dtype holding ids in [0, vocab_size)."""
  return "uint16" if vocab_size <= 1 << 16 else "uint32"


@functools.lru_cache(maxsize=4)
def _tokenizer(spec_json: str) -> tokenizers.Tokenizer:
  return tokenizers.tokenizer_from_spec(json.loads(spec_json))


def _separator(tok: tokenizers.Tokenizer) -> np.ndarray:
  """What follows every document: <|endoftext|> for GPT-2, "\\n" for characters (int32 [1])."""
  if isinstance(tok, tokenizers.GPT2Tokenizer):
    return np.array([tok.eot_id], np.int32)
  return tok.encode("\n")


def tokenize_piece(piece: dict, tok: tokenizers.Tokenizer, dtype: str,
                   jsonl_field: str = "text") -> np.ndarray:
  """A piece's documents as one token stream [n] of `dtype`, a separator after each document."""
  parts, sep = [], _separator(tok)
  for text, ends in _piece_docs(piece, jsonl_field):
    try:
      parts.append(tok.encode(text))
    except ValueError as e:  # a character outside the planned vocabulary: the input changed
      raise ShardError(f"{piece.get('path', piece.get('tfds'))}: {e} (the input changed since "
                       "planning; use a new --output_dir).") from e
    if ends:
      parts.append(sep)
  return np.concatenate(parts).astype(dtype) if parts else np.zeros([0], dtype)


def _atomic_write(path: pathlib.Path, write) -> None:
  """write(file) into a temporary sibling, fsync, then rename onto `path`."""
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  with open(tmp, "wb") as f:
    write(f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _write_json(path: pathlib.Path, obj) -> None:
  _atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def file_sha256(path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(1 << 24):
      digest.update(block)
  return digest.hexdigest()


def sample_sha256(path) -> str:
  """SHA-256 of a file's size and its first, middle and last 64 KiB: a check in O(1) reads."""
  size = os.path.getsize(path)
  digest = hashlib.sha256(str(size).encode())
  with open(path, "rb") as f:
    for start in (0, max(0, size // 2 - _SAMPLE // 2), max(0, size - _SAMPLE)):
      f.seek(start)
      digest.update(f.read(_SAMPLE))
  return digest.hexdigest()


def _shard_meta(path: pathlib.Path, split: str, input_bytes: int) -> dict:
  num_tokens = int(np.load(path, mmap_mode="r").shape[0])
  return dict(file=path.name, split=split, num_tokens=num_tokens, bytes=path.stat().st_size,
              sha256=file_sha256(path), sample_sha256=sample_sha256(path),
              input_bytes=input_bytes)


def write_shard(out_dir: str, shard: dict, spec_json: str, dtype: str, jsonl_field: str) -> dict:
  """Tokenises one planned shard into OUT/NAME.npy (atomically) and records its metadata in
  OUT/.progress/NAME.json; a shard file that already exists is never rewritten."""
  out = pathlib.Path(out_dir)
  final = out / f"{shard['name']}.npy"
  if not final.exists():
    tok = _tokenizer(spec_json)
    tokens = np.concatenate([tokenize_piece(p, tok, dtype, jsonl_field)
                             for p in shard["pieces"]])
    _atomic_write(final, lambda f: np.lib.format.write_array(f, tokens, allow_pickle=False))
  meta = _shard_meta(final, shard["split"], shard["bytes"])
  _write_json(out / PROGRESS_DIR / f"{shard['name']}.json", meta)
  return meta


# ----------------------------------------------------------------------------------------------
# prepare: plan, tokenise in parallel, index.


@dataclasses.dataclass(frozen=True)
class Request:
  """What to prepare; a rerun with the same request resumes, a different one is refused."""

  input_path: str = ""
  tfds_name: str = ""
  tfds_data_dir: str = ""
  tokenizer: str = "char"
  eval_fraction: float = 0.05
  shard_mb: float = 64.0
  piece_mb: float = 8.0
  jsonl_field: str = "text"

  def validate(self) -> None:
    if bool(self.input_path) == bool(self.tfds_name):
      raise ShardError("give exactly one of --input and --tfds_name.")
    if self.tokenizer not in TOKENIZERS:
      raise ShardError(f"--tokenizer must be one of {TOKENIZERS}, got {self.tokenizer!r}.")
    if not 0.0 <= self.eval_fraction < 1.0:
      raise ShardError(f"--eval_fraction must lie in [0, 1), got {self.eval_fraction}.")
    if self.shard_mb <= 0 or self.piece_mb <= 0:
      raise ShardError("--shard_mb and --piece_mb must be positive.")

  def fingerprint(self) -> dict:
    """The request plus the input files' sizes and modification times."""
    out = dataclasses.asdict(self)
    if self.input_path:
      files = _input_files(pathlib.Path(self.input_path).expanduser())
      out["files"] = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    return out


def _pool(workers: int):
  return concurrent.futures.ProcessPoolExecutor(
      max_workers=workers, mp_context=multiprocessing.get_context("fork"))


def _map(fn, jobs: list, workers: int):
  """Yields fn(*job) for each job, in completion order (in process when workers <= 1)."""
  if workers <= 1:
    yield from (fn(*job) for job in jobs)
    return
  with _pool(workers) as pool:
    futures = [pool.submit(fn, *job) for job in jobs]
    for future in concurrent.futures.as_completed(futures):
      yield future.result()


def _tokenizer_spec(request: Request, shards: list, workers: int) -> dict:
  if request.tokenizer == "gpt2":
    try:
      return tokenizers.GPT2Tokenizer().spec()
    except ImportError as e:
      raise ShardError(str(e)) from e
  jobs = [(p, request.jsonl_field) for s in shards for p in s["pieces"]]
  codes = {int(c) for found in _map(_piece_codepoints, jobs, workers) for c in found}
  return tokenizers.CharTokenizer("".join(map(chr, sorted(codes | {ord("\n")})))).spec()


def _load_or_make_plan(out: pathlib.Path, request: Request, workers: int) -> dict:
  fingerprint = request.fingerprint()
  path = out / PLAN_FILE
  if path.exists():
    plan = json.loads(path.read_text())
    if plan["request"] != fingerprint:
      raise ShardError(f"{out} holds an unfinished preparation of other inputs or settings "
                       f"({path}); use another --output_dir or delete it.")
    return plan
  piece, shard = int(request.piece_mb * 2**20), int(request.shard_mb * 2**20)
  if request.input_path:
    shards = plan_files(request.input_path, request.eval_fraction, piece, shard)
  else:
    shards = plan_tfds(request.tfds_name, request.tfds_data_dir, request.eval_fraction)
  spec = _tokenizer_spec(request, shards, workers)
  plan = dict(request=fingerprint, tokenizer=spec, shards=shards)
  out.mkdir(parents=True, exist_ok=True)
  _write_json(path, plan)
  return plan


def prepare(output_dir, request: Request, *, workers: int = 0, progress: bool = True) -> dict:
  """Tokenises the request's inputs into shards under output_dir; returns the index dict.

  Resumable: rerunning the same request continues an interrupted preparation (finished shards
  are kept as they are) and returns the existing index once everything is done.
  """
  from tqdm import tqdm

  request.validate()
  out = pathlib.Path(output_dir).expanduser()
  if (out / INDEX_FILE).exists():
    index = read_index(out)
    if index.get("request") != request.fingerprint():
      raise ShardError(f"{out / INDEX_FILE} was prepared from other inputs or settings; use "
                       "another --output_dir.")
    return index
  workers = workers or os.cpu_count() or 1
  plan = _load_or_make_plan(out, request, workers)
  (out / PROGRESS_DIR).mkdir(exist_ok=True)
  spec_json = json.dumps(plan["tokenizer"], sort_keys=True)
  vocab = _tokenizer(spec_json).vocab_size
  dtype = dtype_for(vocab)
  done = {p.stem: json.loads(p.read_text()) for p in (out / PROGRESS_DIR).glob("*.json")}
  todo = [s for s in plan["shards"] if s["name"] not in done]
  bar = tqdm(total=sum(s["bytes"] for s in plan["shards"]), unit="B", unit_scale=True,
             initial=sum(m["input_bytes"] for m in done.values()), disable=not progress,
             desc=f"tokenizing ({request.tokenizer})", dynamic_ncols=True)
  start, tokens = time.perf_counter(), 0
  jobs = [(str(out), s, spec_json, dtype, request.jsonl_field) for s in todo]
  for meta in _map(write_shard, jobs, workers):
    done[meta["file"][:-4]] = meta
    tokens += meta["num_tokens"]
    bar.update(meta["input_bytes"])
    bar.set_postfix(tokens_per_s=f"{tokens / (time.perf_counter() - start):.3g}")
  bar.close()
  return _finish(out, plan, done, vocab, dtype)


def _finish(out: pathlib.Path, plan: dict, done: dict, vocab: int, dtype: str) -> dict:
  shards = [done[s["name"]] for s in plan["shards"]]
  counts = {split: sum(m["num_tokens"] for m in shards if m["split"] == split)
            for split in ("train", "eval")}
  index = dict(format=FORMAT, tokenizer=plan["tokenizer"], vocab_size=vocab, dtype=dtype,
               num_tokens=counts, request=plan["request"], shards=shards)
  _write_json(out / INDEX_FILE, index)
  for path in (out / PROGRESS_DIR).glob("*.json"):
    path.unlink()
  (out / PROGRESS_DIR).rmdir()
  (out / PLAN_FILE).unlink()
  return index


# ----------------------------------------------------------------------------------------------
# Reading.


def read_index(directory) -> dict:
  """The parsed index.json of a prepared directory (ShardError naming the file otherwise)."""
  path = pathlib.Path(directory).expanduser() / INDEX_FILE
  if not path.is_file():
    hint = " (an unfinished preparation: rerun prepare_data.py)" if (
        path.parent / PLAN_FILE).exists() else ""
    raise ShardError(f"{path}: no token index{hint}; prepare the directory with "
                     "experiments/prepare_data.py.")
  try:
    index = json.loads(path.read_text())
    keys = ("format", "tokenizer", "vocab_size", "dtype", "shards")
    missing = [k for k in keys if k not in index]
  except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as e:
    raise ShardError(f"{path} is not a readable token index ({e}).") from e
  if missing or index["format"] != FORMAT:
    raise ShardError(f"{path} is not a {FORMAT} index (missing {missing or 'the format tag'}).")
  return index


def check_shards(directory, index: dict, verify: str = "quick") -> list[pathlib.Path]:
  """Checks every shard against the index; returns their paths in index order.

  quick: file present, size, .npy header (dtype, length), sampled checksum; full: also the SHA-256
  of every byte (reads the whole corpus once).
  """
  if verify not in VERIFY_MODES:
    raise ShardError(f"data.verify_shards must be one of {VERIFY_MODES}, got {verify!r}.")
  directory = pathlib.Path(directory).expanduser()
  paths = []
  for meta in index["shards"]:
    path = directory / meta["file"]
    _check_shard(path, meta, index["dtype"])
    if verify == "full" and file_sha256(path) != meta["sha256"]:
      raise ShardError(f"{path}: contents do not match the SHA-256 in {directory / INDEX_FILE} "
                       "(corrupt shard); prepare the corpus again.")
    paths.append(path)
  return paths


def _check_shard(path: pathlib.Path, meta: dict, dtype: str) -> None:
  index_file = path.parent / INDEX_FILE
  if not path.is_file():
    raise ShardError(f"{path}: shard listed in {index_file} is missing.")
  size = path.stat().st_size
  if size != meta["bytes"]:
    raise ShardError(f"{path}: {size} bytes, but {index_file} says {meta['bytes']} (truncated or "
                     "replaced shard); prepare the corpus again.")
  try:
    array = np.load(path, mmap_mode="r", allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise ShardError(f"{path}: not a valid .npy token shard ({e}).") from e
  if array.dtype != np.dtype(dtype) or array.shape != (meta["num_tokens"],):
    raise ShardError(f"{path}: holds {array.dtype} {array.shape}, but {index_file} says {dtype} "
                     f"({meta['num_tokens']},).")
  if sample_sha256(path) != meta["sample_sha256"]:
    raise ShardError(f"{path}: contents do not match the checksum in {index_file} (corrupt "
                     "shard); prepare the corpus again.")


class TokenWindows:
  """Windows of L consecutive tokens cut inside memory-mapped shards: a random-access source.

  Row r is the r-th non-overlapping window, counting through the shards in order (each shard's
  last n mod L tokens are unused). Indexing with an int, a slice or an int array returns int32
  [L] / [n, L] read from disk on demand; nothing else is held in memory.
  """

  def __init__(self, paths: list, seq_len: int, vocab_size: int, max_rows: int = 0):
    self._paths = [str(p) for p in paths]
    self._maps = [np.load(p, mmap_mode="r", allow_pickle=False) for p in paths]
    rows = np.array([len(m) // seq_len for m in self._maps], np.int64)
    self._starts = np.concatenate([[0], np.cumsum(rows)])
    total = int(self._starts[-1])
    self._len = min(total, max_rows) if max_rows > 0 else total
    self.seq_len, self.vocab_size = seq_len, vocab_size

  def __len__(self) -> int:
    return self._len

  @property
  def shape(self) -> tuple[int, int]:
    return (self._len, self.seq_len)

  @property
  def ndim(self) -> int:
    return 2

  @property
  def dtype(self):
    return np.dtype(np.int32)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self._rows(np.arange(*index.indices(self._len)))
    rows = np.asarray(index)
    out = self._rows(rows.reshape(-1))
    return out.reshape(*rows.shape, self.seq_len)

  def _rows(self, rows: np.ndarray) -> np.ndarray:
    """int32 [n, L] windows of row ids [n] (negative ids count from the end)."""
    rows = np.where(rows < 0, rows + self._len, rows).astype(np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= self._len):
      raise IndexError(f"window index out of range [0, {self._len}).")
    shard = np.searchsorted(self._starts, rows, side="right") - 1
    offsets = (rows - self._starts[shard]) * self.seq_len
    out = np.empty([len(rows), self.seq_len], np.int32)
    for j, (s, o) in enumerate(zip(shard.tolist(), offsets.tolist(), strict=True)):
      out[j] = self._maps[s][o:o + self.seq_len]
    if out.size and out.max() >= self.vocab_size:
      bad = self._paths[shard[int(np.argmax(out.max(axis=1)))]]
      raise ShardError(f"{bad}: token id {int(out.max())} is outside the vocabulary of "
                       f"{self.vocab_size} (corrupt shard); prepare the corpus again.")
    return out


def _split_windows(directory, index, paths, split: str, seq_len: int, max_rows: int):
  chosen = [(p, m) for p, m in zip(paths, index["shards"], strict=True) if m["split"] == split]
  if not chosen:
    raise ShardError(f"{pathlib.Path(directory) / INDEX_FILE} lists no {split!r} shards; prepare "
                     "with --eval_fraction > 0 (or a dataset with a test split).")
  for path, meta in chosen:
    if meta["num_tokens"] < seq_len:
      raise ShardError(f"{path}: {meta['num_tokens']} tokens, fewer than data.seq_len={seq_len} "
                       "(windows never cross shards); use a shorter seq_len or larger shards "
                       "(--shard_mb).")
  return TokenWindows([p for p, _ in chosen], seq_len, int(index["vocab_size"]), max_rows)


def load_dataset(data_cfg):
  """data.source="tokens": (train TokenWindows [N, L], eval TokenWindows [M, L], DataInfo).

  Reads data.path (a prepared directory), data.seq_len, data.tokenizer (must match the index),
  data.vocab_size (0 or the index's), data.max_examples and data.verify_shards.
  """
  data_cfg = config_lib.typed(data_cfg, config_lib.DataConfig)
  directory = pathlib.Path(data_cfg.path).expanduser()
  if not str(directory) or not directory.is_dir():
    raise ShardError(f"tokens: data.path={str(directory)!r} is not a prepared directory "
                     "(experiments/prepare_data.py writes one).")
  index = read_index(directory)
  kind = index["tokenizer"].get("type")
  wanted = data_cfg.tokenizer
  if kind != wanted:
    raise ShardError(f"{directory / INDEX_FILE}: tokens were prepared with tokenizer {kind!r} but "
                     f"data.tokenizer={wanted!r}; set --config.data.tokenizer={kind}.")
  vocab = splits.check_vocab(data_cfg, int(index["vocab_size"]))
  if data_cfg.seq_len < 1:
    raise ShardError(f"tokens: data.seq_len must be at least 1, got {data_cfg.seq_len}.")
  seq_len = data_cfg.seq_len
  paths = check_shards(directory, index, data_cfg.verify_shards)
  max_rows = data_cfg.max_examples
  train = _split_windows(directory, index, paths, "train", seq_len, max_rows)
  evals = _split_windows(directory, index, paths, "eval", seq_len, max_rows)
  info = data_types.DataInfo(kind="text", vocab_size=vocab, seq_len=seq_len,
                           tokenizer=index["tokenizer"])
  return train, evals, info
