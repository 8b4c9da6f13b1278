"""Parameter pytrees as one .npz file (nested dict keys joined by "/"); atomic writes."""

import os

import jax
import numpy as np


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
