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

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dmmd_jax.data import types as data_types
from dmmd_jax.infra import pytree_io

CONFIG_FILE = "feature_net.json"


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


@dataclasses.dataclass
class FeatureNet:
  """A trained feature network and the data it was trained on."""

  config: FeatureNetConfig
  params: dict
  info: data_types.DataInfo
  path: str = ""

  def features(self, tokens, batch_size: int = 512) -> np.ndarray:
    """Penultimate-layer features, float32 `[n, feature_dim]`, of int tokens `[n, H·W·C]`."""
    return self.outputs(tokens, batch_size)[1]

  def outputs(self, tokens, batch_size: int = 512):
    """(class logits `[n, classes]`, features `[n, feature_dim]`) of int tokens `[n, H·W·C]`."""
    return batched_apply(self.params, self.config, tokens, batch_size)

  def check_compatible(self, info: data_types.DataInfo) -> None:
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
  """Store a trained feature net in directory `workdir`; `extra` (JSON-ready) joins its record."""
  pytree_io.save_network(workdir, CONFIG_FILE, net.params, {
      "kind": "feature_net", "config": net.config.to_json(), "data_info": net.info.to_json(),
      **extra})


def load(workdir: str) -> FeatureNet:
  """The feature net stored in `workdir` by experiments/train_feature_net.py."""
  record, params = pytree_io.load_network(workdir, CONFIG_FILE, "a feature-net directory",
                                          "experiments/train_feature_net.py")
  return FeatureNet(FeatureNetConfig.from_json(record["config"]), params,
                    data_types.DataInfo.from_json(record["data_info"]), workdir)
