"""Training the image feature network (`models/feature_net.py`) on the dataset's class labels.

`train` is the one trainer (arrays in, parameters out); `train_and_save` is the run of
experiments/train_feature_net.py: data and labels, training, accuracy, `feature_net.save`.
"""

import functools

import jax
import numpy as np
import optax
from tqdm import tqdm

from dmmd_jax import config_lib
from dmmd_jax.data import images, loader, sources
from dmmd_jax.data import types as data_types
from dmmd_jax.infra import workdir_guard
from dmmd_jax.models import feature_net
from dmmd_jax.training import setup as setup_lib
from dmmd_jax.training import state as state_lib


def _loss(params, tokens, labels, config):
  logits, _ = feature_net.CNN(config).apply({"params": params}, tokens)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@functools.lru_cache(maxsize=8)
def _train_step(config: feature_net.FeatureNetConfig, optimizer):
  """Jitted (params, opt_state, tokens, labels) → (params, opt_state, loss)."""

  @jax.jit
  def step(params, opt_state, tokens, labels):
    loss, grads = jax.value_and_grad(_loss)(params, tokens, labels, config)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def accuracy(params, config: feature_net.FeatureNetConfig, tokens, labels,
             batch_size: int = 512) -> float:
  """Top-1 accuracy on int tokens `[n, H·W·C]`, labels `[n]`."""
  logits, _ = feature_net.batched_apply(params, config, tokens, batch_size)
  return float(np.mean(np.argmax(logits, axis=1) == np.asarray(labels)))


def train(tokens, labels, config: feature_net.FeatureNetConfig, *, num_steps: int, batch_size: int,
          learning_rate: float, seed: int, weight_decay: float = 1e-4, progress: bool = False):
  """Trains the classifier with AdamW (warm-up, cosine decay) on cross-entropy.

  Args:
    tokens: int `[N, H·W·C]` token images in [0, levels).
    labels: int `[N]` classes in [0, num_classes).
    config: the network.
    num_steps, batch_size, learning_rate, seed, weight_decay: optimisation; batches come from
      `data.batch_iterator` over shuffled epochs (deterministic for the seed).
    progress: show a tqdm bar.

  Returns:
    (params, final mean training loss over the last 10% of steps).
  """
  tokens, labels = np.asarray(tokens, np.int32), np.asarray(labels, np.int32)
  if len(tokens) != len(labels):
    raise data_types.DataError(f"{len(tokens)} images but {len(labels)} labels.")
  if labels.min() < 0 or labels.max() >= config.num_classes:
    raise data_types.DataError(f"labels must lie in [0, {config.num_classes}).")
  optimizer = state_lib.make_optimizer(learning_rate, max(1, num_steps // 20), max(2, num_steps),
                                       weight_decay, grad_clip=None, b2=0.999,
                                       final_fraction=0.05)
  params = feature_net.init_params(jax.random.key(seed), config)
  opt_state = optimizer.init(params)
  step = _train_step(config, optimizer)
  rows = loader.batch_iterator(np.arange(len(tokens))[:, None], min(batch_size, len(tokens)),
                               seed)
  losses = []
  for _ in tqdm(range(num_steps), desc="feature net", disable=not progress):
    idx = next(rows)[:, 0]
    params, opt_state, loss = step(params, opt_state, tokens[idx], labels[idx])
    losses.append(loss)
  tail = jax.device_get(losses[-max(1, num_steps // 10):])
  return params, float(np.mean(tail))


@workdir_guard.releases_locks
def train_and_save(config, workdir: str) -> dict:
  """What experiments/train_feature_net.py runs: load data + labels, train, evaluate, store."""
  config = config_lib.typed(config, config_lib.FeatureNetRunConfig)
  data_cfg = setup_lib.data_config_of(config)
  train_tokens, eval_tokens, info = sources.load_dataset(data_cfg)
  if info.kind != "image":
    raise data_types.DataError(f"the feature net needs image data, got {info.kind}.")
  train_labels, eval_labels = images.load_labels(data_cfg)
  if (len(train_labels), len(eval_labels)) != (len(train_tokens), len(eval_tokens)):
    raise data_types.DataError("labels and images are not aligned (different counts).")
  workdir_guard.claim_record(workdir, "feature_net")
  m, t = config.model, config.train
  net_cfg = feature_net.FeatureNetConfig(tuple(info.image_shape), info.vocab_size,
                                         int(max(train_labels.max(), eval_labels.max()) + 1),
                                         tuple(m.channels), m.feature_dim)
  params, train_loss = train(train_tokens, train_labels, net_cfg, num_steps=t.num_steps,
                             batch_size=t.batch_size, learning_rate=t.learning_rate,
                             seed=config.seed, weight_decay=t.weight_decay, progress=True)
  result = {"train_loss": train_loss,
            "train_accuracy": accuracy(params, net_cfg, train_tokens, train_labels),
            "eval_accuracy": accuracy(params, net_cfg, eval_tokens, eval_labels)}
  feature_net.save(workdir, feature_net.FeatureNet(net_cfg, params, info, workdir),
                   {"data": config_lib.to_dict(data_cfg), **result})
  return result
