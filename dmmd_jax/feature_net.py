"""A small CNN classifier trained in the project; its penultimate layer is the image feature space.

No Inception weights are reachable offline, so the image metrics (Fréchet distance,
precision/recall; `metrics.frechet_distance`, `metrics.precision_recall`) use this network
trained on the same dataset's class labels (Fashion-MNIST, scikit-learn digits). It reads the
*token* images exactly as the diffusion models see them: `data.load_dataset` quantises the pixels
to `data.levels` grey levels, and the network takes those tokens (rescaled to [0, 1]).

**The numbers are not comparable to Inception-FID** (or to any FID in a paper): the feature
space is a different, much smaller network (default 64 features, not 2,048), trained on different
data, at a different resolution and quantisation. They are comparable only between models scored
with the same feature-net directory and the same number of samples (FD is biased upwards at small
sample sizes, by roughly d²/n).

Architecture: three 3×3 convolutions (ReLU; strides 1, 2, 2), a dense layer of `feature_dim`
ReLU units (the features), and a linear classifier. Stored as DIR/feature_net.json (config, data
description, accuracy) + DIR/params.npz (the flattened parameter pytree).
"""

import dataclasses
import functools
import gzip
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from dmmd_jax import data as data_lib
from dmmd_jax import workdir as workdir_lib
from dmmd_jax import workdir_guard

CONFIG_FILE = "feature_net.json"
PARAMS_FILE = "params.npz"
LABEL_SOURCES = ("digits", "fashion_mnist")


@dataclasses.dataclass(frozen=True)
class FeatureNetConfig:
  """Static network description (hashable: a jit static argument).

  Attributes:
    image_shape: (H, W, C) of the token images.
    levels: grey levels K of the tokens (inputs are token / (K − 1)).
    num_classes: classifier outputs.
    channels: output channels of the three convolutions.
    feature_dim: width of the penultimate (feature) layer.
  """

  image_shape: tuple
  levels: int
  num_classes: int = 10
  channels: tuple = (32, 64, 64)
  feature_dim: int = 64

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, fields: dict) -> "FeatureNetConfig":
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


class CNN(nn.Module):
  """int tokens `[b, H·W·C]` → (logits `[b, num_classes]`, features `[b, feature_dim]`)."""

  config: FeatureNetConfig

  @nn.compact
  def __call__(self, tokens):
    cfg = self.config
    x = tokens.reshape((tokens.shape[0],) + tuple(cfg.image_shape)).astype(jnp.float32)
    x = x / (cfg.levels - 1)
    for i, channels in enumerate(cfg.channels):
      x = nn.relu(nn.Conv(channels, (3, 3), strides=1 if i == 0 else 2, name=f"conv_{i}")(x))
    features = nn.relu(nn.Dense(cfg.feature_dim, name="features")(x.reshape(x.shape[0], -1)))
    return nn.Dense(cfg.num_classes, name="classifier")(features), features


@functools.partial(jax.jit, static_argnames=("config",))
def init_params(key, config: FeatureNetConfig):
  dummy = jnp.zeros((1, int(np.prod(config.image_shape))), jnp.int32)
  return CNN(config).init(key, dummy)["params"]


@functools.partial(jax.jit, static_argnames=("config",))
def apply(params, tokens, *, config: FeatureNetConfig):
  """(logits `[b, classes]`, features `[b, feature_dim]`) of int tokens `[b, H·W·C]`."""
  return CNN(config).apply({"params": params}, tokens)


# ---------------------------------------------------------------------------------------------
# Labels aligned with data.load_dataset's rows.


def _read_idx_labels(path: str) -> np.ndarray:
  """uint8 labels `[n]` of a gzipped idx1 file."""
  with gzip.open(path, "rb") as f:
    raw = f.read()
  if raw[2] != 0x08 or raw[3] != 1:
    raise data_lib.DataError(f"{path} is not an idx1 unsigned-byte label file.")
  count = int.from_bytes(raw[4:8], "big")
  return np.frombuffer(raw, np.uint8, count=count, offset=8).astype(np.int32)


def load_labels(data_cfg):
  """Class labels (train `[N]`, eval `[M]`) aligned with `data.load_dataset(data_cfg)`'s rows.

  digits: sklearn's targets, split like data.py (eval = the last eval_fraction); fashion_mnist:
  the Debian package's idx label files (train / t10k). Both capped by max_examples.
  """
  source, cap = data_cfg.source, int(data_cfg.max_examples or 0)
  if source == "digits":
    from sklearn.datasets import load_digits  # noqa: PLC0415

    labels = load_digits().target.astype(np.int32)
    n_eval = int(len(labels) * float(data_cfg.eval_fraction))
    train, evals = labels[:len(labels) - n_eval], labels[len(labels) - n_eval:]
  elif source == "fashion_mnist":
    files = [os.path.join(data_lib.FASHION_MNIST_DIR, f"{p}-labels-idx1-ubyte.gz")
             for p in ("train", "t10k")]
    if not all(os.path.isfile(f) for f in files):
      raise data_lib.DataError(f"Fashion-MNIST labels need {files[0]} and {files[1]} "
                               "(apt-get install dataset-fashion-mnist).")
    train, evals = (_read_idx_labels(f) for f in files)
  else:
    raise data_lib.DataError(f"the feature net needs class labels; data.source must be one of "
                             f"{LABEL_SOURCES}, got {source!r}.")
  return (train[:cap], evals[:cap]) if cap > 0 else (train, evals)


# ---------------------------------------------------------------------------------------------
# Training.


def _loss(params, tokens, labels, config):
  logits, _ = CNN(config).apply({"params": params}, tokens)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@functools.lru_cache(maxsize=8)
def _train_step(config: FeatureNetConfig, optimizer):
  """Jitted (params, opt_state, tokens, labels) → (params, opt_state, loss)."""

  @jax.jit
  def step(params, opt_state, tokens, labels):
    loss, grads = jax.value_and_grad(_loss)(params, tokens, labels, config)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def batched_apply(params, config: FeatureNetConfig, tokens, batch_size: int = 512):
  """(logits `[n, classes]`, features `[n, feature_dim]`) as numpy, `batch_size` rows per call,
  every call padded to `batch_size` rows (one compile for any n)."""
  tokens = np.asarray(tokens, np.int32)
  logits, features = [], []
  for i in range(0, len(tokens), batch_size):
    batch = tokens[i:i + batch_size]
    padded = np.concatenate([batch, np.zeros((batch_size - len(batch),) + batch.shape[1:],
                                              np.int32)])
    out = jax.device_get(apply(params, padded, config=config))
    logits.append(out[0][:len(batch)])
    features.append(out[1][:len(batch)])
  return np.concatenate(logits), np.concatenate(features)


def accuracy(params, config: FeatureNetConfig, tokens, labels, batch_size: int = 512) -> float:
  """Top-1 accuracy on int tokens `[n, H·W·C]`, labels `[n]`."""
  logits, _ = batched_apply(params, config, tokens, batch_size)
  return float(np.mean(np.argmax(logits, axis=1) == np.asarray(labels)))


def train(tokens, labels, config: FeatureNetConfig, *, num_steps: int, batch_size: int,
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
    raise data_lib.DataError(f"{len(tokens)} images but {len(labels)} labels.")
  if labels.min() < 0 or labels.max() >= config.num_classes:
    raise data_lib.DataError(f"labels must lie in [0, {config.num_classes}).")
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(1, num_steps // 20),
                                                max(2, num_steps), 0.05 * learning_rate)
  optimizer = optax.adamw(schedule, weight_decay=weight_decay)
  params = init_params(jax.random.key(seed), config)
  opt_state = optimizer.init(params)
  step = _train_step(config, optimizer)
  rows = data_lib.batch_iterator(np.arange(len(tokens))[:, None], min(batch_size, len(tokens)),
                                 seed)
  losses = []
  for _ in tqdm(range(num_steps), desc="feature net", disable=not progress):
    idx = next(rows)[:, 0]
    params, opt_state, loss = step(params, opt_state, tokens[idx], labels[idx])
    losses.append(loss)
  tail = jax.device_get(losses[-max(1, num_steps // 10):])
  return params, float(np.mean(tail))


# ---------------------------------------------------------------------------------------------
# Storage.


def save_pytree(path: str, tree) -> None:
  """A nested dict of arrays → one .npz with "/"-joined keys."""
  flat = {}

  def walk(prefix, node):
    for key, value in node.items():
      name = f"{prefix}/{key}" if prefix else str(key)
      if isinstance(value, dict):
        walk(name, value)
      else:
        flat[name] = np.asarray(value)

  walk("", jax.device_get(tree))
  tmp = f"{path}.tmp{os.getpid()}.npz"
  np.savez(tmp, **flat)
  os.replace(tmp, path)


def load_pytree(path: str) -> dict:
  """Inverse of `save_pytree`: a nested dict of numpy arrays."""
  tree = {}
  with np.load(path) as flat:
    for name in flat.files:
      node = tree
      *parents, leaf = name.split("/")
      for key in parents:
        node = node.setdefault(key, {})
      node[leaf] = flat[name]
  return tree


@dataclasses.dataclass
class FeatureNet:
  """A trained feature network and the data it was trained on."""

  config: FeatureNetConfig
  params: dict
  info: data_lib.DataInfo
  path: str = ""

  def features(self, tokens, batch_size: int = 512) -> np.ndarray:
    """Penultimate-layer features, float32 `[n, feature_dim]`, of int tokens `[n, H·W·C]`."""
    return batched_apply(self.params, self.config, tokens, batch_size)[1]

  def check_compatible(self, info: data_lib.DataInfo) -> None:
    """ValueError unless samples described by `info` are images this network reads."""
    if info.kind != "image":
      raise ValueError(f"the feature net {self.path} scores images; these samples are "
                       f"{info.kind}.")
    if tuple(info.image_shape) != tuple(self.config.image_shape) or (
        info.vocab_size != self.config.levels):
      raise ValueError(f"the feature net {self.path} was trained on {self.config.image_shape} "
                       f"images with {self.config.levels} grey levels; the samples are "
                       f"{tuple(info.image_shape)} with {info.vocab_size} levels.")


def save(workdir: str, net: FeatureNet, extra: dict) -> None:
  os.makedirs(workdir, exist_ok=True)
  save_pytree(os.path.join(workdir, PARAMS_FILE), net.params)
  record = {"kind": "feature_net", "config": net.config.to_json(), "data_info": net.info.to_json(),
            **extra}
  with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
    json.dump(record, f, indent=2)


def load(workdir: str) -> FeatureNet:
  """The feature net stored in `workdir` by experiments/train_feature_net.py."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise workdir_lib.WorkdirError(f"{workdir} has no {CONFIG_FILE}: not a feature-net "
                                   "directory (experiments/train_feature_net.py writes one).")
  record = workdir_lib.read_json(path)
  config = FeatureNetConfig.from_json(record["config"])
  params = jax.tree.map(jnp.asarray, load_pytree(os.path.join(workdir, PARAMS_FILE)))
  return FeatureNet(config, params, data_lib.DataInfo.from_json(record["data_info"]), workdir)


def data_config(config) -> ml_collections.ConfigDict:
  """config.data, or the data section of the workdir named by config.data_from."""
  if config.get("data_from"):
    return workdir_lib.load_config(config.data_from).data
  return config.data


@workdir_guard.releases_locks
def train_and_save(config, workdir: str) -> dict:
  """What experiments/train_feature_net.py runs: load data + labels, train, evaluate, store."""
  data_cfg = data_config(config)
  train_tokens, eval_tokens, info = data_lib.load_dataset(data_cfg)
  if info.kind != "image":
    raise data_lib.DataError(f"the feature net needs image data, got {info.kind}.")
  train_labels, eval_labels = load_labels(data_cfg)
  if (len(train_labels), len(eval_labels)) != (len(train_tokens), len(eval_tokens)):
    raise data_lib.DataError("labels and images are not aligned (different counts).")
  workdir_guard.claim_record(workdir, "feature_net")
  m, t = config.model, config.train
  net_cfg = FeatureNetConfig(tuple(info.image_shape), info.vocab_size,
                             int(max(train_labels.max(), eval_labels.max()) + 1),
                             tuple(m.channels), m.feature_dim)
  params, train_loss = train(train_tokens, train_labels, net_cfg, num_steps=t.num_steps,
                             batch_size=t.batch_size, learning_rate=t.learning_rate,
                             seed=config.seed, weight_decay=t.weight_decay, progress=True)
  result = {"train_loss": train_loss,
            "train_accuracy": accuracy(params, net_cfg, train_tokens, train_labels),
            "eval_accuracy": accuracy(params, net_cfg, eval_tokens, eval_labels)}
  save(workdir, FeatureNet(net_cfg, params, info, workdir),
       {"data": workdir_lib.config_to_dict(ml_collections.ConfigDict(data_cfg)), **result})
  return result
