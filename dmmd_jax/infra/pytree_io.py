"""Parameter pytrees as one .npz file (nested dict keys joined by "/"); atomic writes.

A *network directory* (the reference LM's, the feature net's) is DIR/<record>.json (config, data
description, results) + DIR/params.npz.
"""

import json
import os

import jax
import numpy as np

from dmmd_jax.infra import workdir as workdir_lib


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


PARAMS_FILE = "params.npz"


def save_network(path: str, record_file: str, params, record: dict) -> None:
  """Write a network directory: `record` (JSON-ready) and the parameter pytree."""
  os.makedirs(path, exist_ok=True)
  save_pytree(os.path.join(path, PARAMS_FILE), params)
  tmp = os.path.join(path, f"{record_file}.tmp{os.getpid()}")
  with open(tmp, "w") as f:
    json.dump(record, f, indent=2)
  os.replace(tmp, os.path.join(path, record_file))


def load_network(path: str, record_file: str, what: str, writer: str):
  """(record dict, parameter pytree of jax arrays) of a network directory.

  what, writer: what such a directory is and the binary that writes one (for the error).
  """
  record_path = os.path.join(path, record_file)
  if not os.path.exists(record_path):
    raise workdir_lib.WorkdirError(f"{path} has no {record_file}: not {what} ({writer} writes "
                                   "one).")
  with open(record_path) as f:
    record = json.load(f)
  params = jax.tree.map(jax.numpy.asarray, load_pytree(os.path.join(path, PARAMS_FILE)))
  return record, params
