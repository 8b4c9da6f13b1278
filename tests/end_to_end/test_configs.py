"""Tests for `configs/*.py`: every file and preset builds and validates; every diffusion config's
`tiny` preset trains a teacher and distils a student end to end; the `base` text presets have the
paper's OpenWebText size (≈170M parameters, 1024 tokens).

The tiny end-to-end runs compile a fresh network per config (≈1–2 min each on 2 cores), so only
digits (which shares the canonical fast programs of `_helpers.FAST`) runs by default; the others
are slow tests.
"""

import functools
import math
import os

import _helpers
import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from dmmd_jax import config_lib
from dmmd_jax.data import images, sources, splits, text, token_shards
from dmmd_jax.infra import workdir as workdir_lib
from dmmd_jax.models import denoiser
from dmmd_jax.training import dmmd_run, teacher_run, trained_model
from dmmd_jax.training import setup as setup_lib

CONFIGS = _helpers.config_names()


def presets_of(name):
  module = _helpers.load_config_module(name)
  return list(getattr(module, "SIZES", config_lib.PRESETS))


def is_diffusion_config(name) -> bool:
  """Experiment configs of teachers/students (others configure metric networks)."""
  return "distill" in _helpers.load_config_module(name).get_config("tiny")


DIFFUSION_CONFIGS = [n for n in CONFIGS if is_diffusion_config(n)]


def test_the_expected_configs_exist():
  assert {"digits", "fashion_mnist", "npy_tokens", "shakespeare_bpe",
          "shakespeare_char", "tokens"} <= set(DIFFUSION_CONFIGS)


@pytest.mark.parametrize("name, preset", [(n, p) for n in CONFIGS for p in presets_of(n)])
def test_every_config_and_preset_builds_and_validates(name, preset):
  config = _helpers.load_config_module(name).get_config(preset)
  assert isinstance(config, ml_collections.ConfigDict)
  assert config.preset == preset
  assert config.is_locked  # misspelt --config.* flags fail instead of adding keys
  with pytest.raises((AttributeError, KeyError)):
    config.train.no_such_key = 1
  if name in DIFFUSION_CONFIGS:
    config_lib.validate(config)
    image = config.model.noise_kind == "pyramid"  # any image shape will do for validation
    model_cfg = setup_lib.denoiser_config_of(
        config, setup_lib.forward_process_of(config, 16),
        64 if image else max(config.data.seq_len, 1), (8, 8, 1) if image else ())
    denoiser.validate_config(model_cfg)


@pytest.mark.parametrize("name", CONFIGS)
def test_unknown_preset_is_refused(name):
  with pytest.raises(config_lib.ConfigError, match="preset"):
    _helpers.load_config_module(name).get_config("huge")


@pytest.mark.parametrize("name", ["shakespeare_bpe", "shakespeare_char"])
def test_shakespeare_base_has_the_papers_size(name):
  """≈170M parameters (the paper's OpenWebText network; asserted 150M–190M) and 1024 tokens."""
  config = _helpers.make_config(name, "base")
  assert config.data.seq_len == 1024
  if config.data.tokenizer == "gpt2":
    vocab = 50257
  else:  # the character vocabulary of the corpus (the tiny preset loads faster, same characters)
    vocab = sources.load_dataset(_helpers.make_config(name, "tiny").data)[2].vocab_size
  kernel = setup_lib.forward_process_of(config, vocab)
  model_cfg = setup_lib.denoiser_config_of(config, kernel, config.data.seq_len)
  shapes = nn.unbox(jax.eval_shape(functools.partial(denoiser.init_params, cfg=model_cfg),
                                   jax.random.key(0)))
  count = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
  print(f"{name} base: vocab {vocab}, {count / 1e6:.1f}M parameters")
  assert 150e6 <= count <= 190e6, f"{count / 1e6:.1f}M parameters"


def _tiny_overrides(name, tmp_path):
  if name == "digits":
    return dict(_helpers.FAST)  # shares compiled programs with test_train / test_distill
  overrides = {**_helpers.quiet_schedule("train", 3), **_helpers.quiet_schedule("distill", 2)}
  if name == "npy_tokens":
    tokens = np.random.default_rng(0).integers(0, 5, size=(200, 8)).astype(np.int32)
    np.save(tmp_path / "tokens.npy", tokens)
    overrides.update({"data.path": str(tmp_path / "tokens.npy"), "data.vocab_size": 5})
  if name == "tokens":  # a small prepared character corpus
    (tmp_path / "corpus.txt").write_text(text.shakespeare_text(splits.cache_dir())[:200_000])
    request = token_shards.Request(input_path=str(tmp_path / "corpus.txt"), shard_mb=0.05)
    token_shards.prepare(tmp_path / "tokens", request, workers=1, progress=False)
    overrides.update({"data.path": str(tmp_path / "tokens"), "data.tokenizer": "char"})
  return overrides


def _tiny_params(names):
  return [pytest.param(n, marks=() if n == "digits" else pytest.mark.slow) for n in names]


@pytest.mark.parametrize("name", _tiny_params(DIFFUSION_CONFIGS))
def test_tiny_preset_trains_and_distils_end_to_end(name, tmp_path):
  if name == "fashion_mnist" and not os.path.isdir(images.FASHION_MNIST_DIR):
    pytest.skip(f"Fashion-MNIST is not installed in {images.FASHION_MNIST_DIR} "
                "(apt-get install dataset-fashion-mnist)")
  overrides = _tiny_overrides(name, tmp_path)
  teacher, student = str(tmp_path / "teacher"), str(tmp_path / "student")
  config = _helpers.make_config(name, "tiny", **overrides)
  result = teacher_run.train_teacher(config, teacher)
  assert result["step"] == config.train.num_steps and np.isfinite(result["eval_bpt"])

  config = _helpers.make_config(name, "tiny", **overrides,
                                **{"distill.teacher_workdir": teacher})
  assert dmmd_run.distill_student(config, student) == {"step": config.distill.num_steps}
  rows = _helpers.read_metrics(student)
  assert all(np.isfinite(r[k]) for r in rows for k in ("gen_loss", "aux_loss") if k in r)
  assert {"gen_loss", "aux_loss"} <= {k for r in rows for k in r}

  model = trained_model.load(student)
  samples = model.sample(4)
  assert samples.shape == (4, model.setup.seq_len)
  assert samples.min() >= 0 and samples.max() < model.setup.info.vocab_size
  assert workdir_lib.load_run_info(student)["student_steps"] == config.distill.student_steps
