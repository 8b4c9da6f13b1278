"""Tests of the image feature network: it classifies, and its features separate data from noise."""

import importlib.util
import os
import pathlib

import numpy as np
import pytest

from dmmd_jax.data import images, sources
from dmmd_jax.data import types as data_types
from dmmd_jax.evaluation import metrics as metrics_lib
from dmmd_jax.infra import pytree_io
from dmmd_jax.models import feature_net
from dmmd_jax.training import feature_net_run

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _config(preset="tiny"):
  spec = importlib.util.spec_from_file_location("fn_config", ROOT / "configs/feature_net.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """The tiny preset trained on digits through the binary's code path, stored and reloaded."""
  workdir = str(tmp_path_factory.mktemp("feature_net"))
  config = _config()
  result = feature_net_run.train_and_save(config, workdir)
  train, evals, info = sources.load_dataset(config.data)
  return result, feature_net.load(workdir), train, evals, info


def test_digits_accuracy_above_90_percent(trained):
  result, net, _, evals, _ = trained
  _, eval_labels = images.load_labels(_config().data)
  assert result["eval_accuracy"] > 0.9
  assert feature_net_run.accuracy(net.params, net.config, evals, eval_labels) == pytest.approx(
      result["eval_accuracy"])


def test_frechet_distance_separates_data_from_noise(trained):
  _, net, train, _, info = trained
  rng = np.random.default_rng(0)
  rows = train[rng.permutation(len(train))[:800]]
  real_a, real_b = net.features(rows[:400]), net.features(rows[400:])
  noise = net.features(rng.integers(0, info.vocab_size, (400, info.seq_len)))
  assert real_a.shape == (400, net.config.feature_dim)
  same, different = metrics_lib.frechet_distance(real_a,
                                                 real_b), metrics_lib.frechet_distance(real_a,
                                                                                      noise)
  assert same < 0.2 * different
  precision, recall = metrics_lib.precision_recall(real_a, real_b)
  noise_precision, noise_recall = metrics_lib.precision_recall(real_a, noise)
  assert min(precision, recall) > 0.8
  assert noise_precision < 0.5 * precision and noise_recall < 0.3


def test_features_are_batch_independent_and_reload_exactly(trained, tmp_path):
  _, net, train, _, _ = trained
  whole = net.features(train[:70])
  np.testing.assert_allclose(net.features(train[:70], batch_size=32), whole, rtol=1e-5,
                             atol=1e-6)
  feature_net.save(str(tmp_path), net, {})
  np.testing.assert_array_equal(feature_net.load(str(tmp_path)).features(train[:70]), whole)


def test_compatibility_checks(trained):
  _, net, _, _, info = trained
  net.check_compatible(info)
  with pytest.raises(ValueError, match="grey levels"):
    net.check_compatible(data_types.DataInfo("image", 4, 64, (8, 8, 1)))
  with pytest.raises(ValueError, match="scores images"):
    net.check_compatible(data_types.DataInfo("text", 17, 64))


def test_digit_labels_align_with_the_token_rows():
  config = _config().data
  train, evals, _ = sources.load_dataset(config)
  train_labels, eval_labels = images.load_labels(config)
  assert (len(train_labels), len(eval_labels)) == (len(train), len(evals))
  assert set(np.unique(train_labels)) == set(range(10))


@pytest.mark.skipif(not os.path.isdir(images.FASHION_MNIST_DIR), reason="no Fashion-MNIST")
def test_fashion_mnist_labels_align_with_the_token_rows():
  config = _config().data
  config.source, config.max_examples, config.levels = "fashion_mnist", 300, 16
  train, evals, _ = sources.load_dataset(config)
  train_labels, eval_labels = images.load_labels(config)
  assert (len(train_labels), len(eval_labels)) == (len(train), len(evals)) == (300, 300)
  assert train_labels.max() == 9 and eval_labels.min() == 0


def test_text_data_is_rejected(tmp_path):
  config = _config()
  config.data.source = "npy"
  np.save(tmp_path / "t.npy", np.zeros((10, 4), np.int32))
  config.data.path, config.data.vocab_size = str(tmp_path / "t.npy"), 3
  with pytest.raises(data_types.DataError):
    feature_net_run.train_and_save(config, str(tmp_path / "out"))


def test_pytree_round_trip(tmp_path):
  tree = {"a": {"b": np.arange(3.0), "c": {"d": np.ones((2, 2), np.float32)}}, "e": np.int32(4)}
  pytree_io.save_pytree(str(tmp_path / "p.npz"), tree)
  back = pytree_io.load_pytree(str(tmp_path / "p.npz"))
  np.testing.assert_array_equal(back["a"]["c"]["d"], tree["a"]["c"]["d"])
  np.testing.assert_array_equal(back["a"]["b"], tree["a"]["b"])
  assert back["e"] == 4
