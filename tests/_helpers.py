"""Shared helpers of the end-to-end tests (distill, train, sharding, configs, binaries).

`jax_compilation_cache` (made autouse for every module by conftest.py) gives the session a
persistent XLA compilation cache under pytest's cache directory; small end-to-end runs then start
several times faster on the second run.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from dmmd_jax import config_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
EXPERIMENTS = REPO / "experiments"


@pytest.fixture(scope="session", autouse=True)
def jax_compilation_cache(request, tmp_path_factory):
  """Persistent compilation cache for the whole session (pytest cache dir, else a tmp dir)."""
  cache = getattr(request.config, "cache", None)
  path = cache.mkdir("jax_compilation_cache") if cache else tmp_path_factory.mktemp("jax_cache")
  if jax.config.jax_compilation_cache_dir != str(path):
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    try:  # an earlier compile may have settled "no cache" for this process
      from jax.experimental.compilation_cache import compilation_cache as cc
      cc.reset_cache()
    except ImportError:  # pragma: no cover
      pass
  return path


def cache_env(extra=None) -> dict:
  """Environment for subprocesses: this repo importable, a shared XLA compilation cache."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
  cache = jax.config.jax_compilation_cache_dir
  if cache:
    env["DMMD_JAX_COMPILATION_CACHE"] = cache
  env.pop("XLA_FLAGS", None)
  env.update(extra or {})
  return env


def load_config_module(name: str):
  """The module of `configs/<name>.py` (configs/ is not a package)."""
  spec = importlib.util.spec_from_file_location(f"dmmd_test_configs_{name}", CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def config_names() -> list:
  return sorted(p.stem for p in CONFIGS.glob("*.py") if not p.stem.startswith("_"))


def make_config(name: str, preset: str = "tiny", **overrides):
  """`configs/<name>.py:<preset>` with {"section.key": value} overrides (and "seed")."""
  config = load_config_module(name).get_config(preset)
  seed = overrides.pop("seed", None)
  if seed is not None:
    config.seed = seed
  config_lib.apply_overrides(config, overrides)
  return config


def quiet_schedule(prefix: str, num_steps: int, log_every: int = 1, checkpoint_every=None):
  """Overrides that run `num_steps` steps of `train` or `distill` without periodic evaluation."""
  out = {f"{prefix}.num_steps": num_steps, f"{prefix}.log_every": log_every,
         f"{prefix}.checkpoint_every": checkpoint_every or num_steps,
         f"{prefix}.eval_every": 0}
  if prefix == "train":
    out["train.sample_every"] = 0
  return out


def quiet_schedule_flags(num_steps: int, checkpoint_every=None, prefix: str = "train") -> list:
  """`quiet_schedule` as --config.* flags of a binary."""
  return [f"--config.{k}={v}" for k, v in
          quiet_schedule(prefix, num_steps, checkpoint_every=checkpoint_every).items()]


# The canonical fast run: the digits `tiny` preset, 8 teacher steps and 8 distillation updates
# (checkpoints every 4). Tests that use exactly these values (plus keys that do not enter the
# compiled programs: log/eval/checkpoint periods, workdirs) share compiled programs through the
# persistent compilation cache, in-process and in subprocesses alike.
FAST = {**quiet_schedule("train", 8, checkpoint_every=4), "train.eval_every": 4,
        **quiet_schedule("distill", 8, checkpoint_every=4)}
FAST_FLAGS = [f"--config.{k}={v}" for k, v in FAST.items()]


def fast_digits(**overrides):
  """The digits tiny config with the FAST schedule and `overrides`."""
  return make_config("digits", "tiny", **{**FAST, **overrides})


def copy_task_tokens(path, num_rows: int = 4096, seed: int = 0) -> str:
  """A fair coin copied to the second position: int32 `[num_rows, 2]` saved as .npy."""
  coin = np.random.default_rng(seed).integers(0, 2, size=(num_rows, 1))
  np.save(path, np.concatenate([coin, coin], axis=1).astype(np.int32))
  return str(path)


def read_metrics(workdir) -> list:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def timing_free(rows: list) -> list:
  """metrics.jsonl rows without wall-clock entries (throughput differs between runs)."""
  return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


def run_python(args, *, env=None, timeout=600, cwd=None) -> subprocess.CompletedProcess:
  """`python ARGS` in a subprocess (text output captured)."""
  return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                        env=env or cache_env(), timeout=timeout, cwd=cwd or REPO, check=False)


def agreement(tokens: np.ndarray) -> float:
  return float(np.mean(tokens[:, 0] == tokens[:, 1]))


def frequencies(tokens: np.ndarray, vocab: int = 2) -> np.ndarray:
  return np.bincount(np.asarray(tokens).ravel(), minlength=vocab) / np.asarray(tokens).size


def tree_max_abs_diff(a, b) -> float:
  diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)
  return max(jax.tree.leaves(diffs), default=0.0)


class Interrupted(Exception):
  """Stands for a killed process (raised right after the checkpoint a test stops at)."""


def run_until_first_checkpoint(run, monkeypatch) -> None:
  """Calls run() with `checkpoints.save_checkpoint` patched to raise Interrupted right after the
  first checkpoint is fully written (a simulated kill), then restores the real function."""
  from dmmd_jax.infra import checkpoints

  save = checkpoints.save_checkpoint

  def save_then_die(manager, step, state, data_state):
    save(manager, step, state, data_state)
    manager.wait_until_finished()
    raise Interrupted(step)

  monkeypatch.setattr(checkpoints, "save_checkpoint", save_then_die)
  with pytest.raises(Interrupted):
    run()
  monkeypatch.setattr(checkpoints, "save_checkpoint", save)
