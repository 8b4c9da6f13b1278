r"""Block-autoregressive models: training-step cost and block sampling with and without the cache.

    python bench/block.py --config=configs/shakespeare_char.py:block [--steps=10] [--k=8]

Prints (a) the block teacher step (two-stream forward, noisy and clean streams side by side) vs
the whole-sequence step of the same network at equal tokens (same batch and length; goal ≤ 2.2×),
and (b) block sampling throughput (sequences/s) with the clean context's keys/values cached and
with the full two-stream forward at every step, k steps per block, over the trained length.
The parameters are the freshly initialised teacher's (speed does not depend on training), and the
machine's load average is printed before and after.
"""

import copy
import os
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from dmmd_jax.infra import sharding
from dmmd_jax.models import blocks
from dmmd_jax.training import setup as setup_lib
from dmmd_jax.training import teacher_run

_CONFIG = config_flags.DEFINE_config_file("config", "configs/shakespeare_char.py:block", "")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed rounds (one step of each model per round).")
_K = flags.DEFINE_integer("k", 8, "Sampling steps per block.")
_SAMPLES = flags.DEFINE_integer("num_samples", 16, "Sequences per sampler call.")


class Stepper:
  """A compiled teacher step of `config` with its state and one batch (two warm-up steps)."""

  def __init__(self, config):
    self.setup = setup_lib.build_setup(config, config.train.batch_size)
    self.batch = sharding.global_batch(self.setup.train_tokens[:config.train.batch_size],
                                       self.setup.mesh)
    optimizer = teacher_run.teacher_optimizer(config)
    self.state, shardings = teacher_run.init_teacher_state(self.setup, optimizer)
    self.step = teacher_run.compile_teacher_step(self.setup, optimizer, shardings)
    self.seconds(2)

  def seconds(self, steps: int) -> float:
    """Mean seconds per step over `steps` steps."""
    start = time.perf_counter()
    for _ in range(steps):
      self.state, _ = self.step(self.state, self.batch)
    jax.block_until_ready(self.state)
    return (time.perf_counter() - start) / steps


def sampling_rate(setup, params, kv_cache: bool, k: int, n: int) -> float:
  """Sequences per second of the block sampler (second call; the first compiles)."""
  scfg = setup_lib.sampler_config_of(setup.config, k)
  run = lambda: blocks.sample(jax.random.key(0), params, setup.kernel, scfg, setup.model_cfg, n,
                              setup.seq_len, None, kv_cache)
  jax.block_until_ready(run())
  start = time.perf_counter()
  jax.block_until_ready(run())
  return n / (time.perf_counter() - start)


def main(argv):
  del argv
  config = _CONFIG.value
  if not config.model.block_size:
    raise SystemExit("error: this benchmark needs a block preset (model.block_size > 0).")
  print(f"load average {os.getloadavg()}, devices {jax.devices()}")
  tokens = config.train.batch_size * config.data.seq_len
  whole = copy.deepcopy(config)
  whole.model.block_size = 0
  block_step, whole_step = Stepper(config), Stepper(whole)
  # Alternate the two (one step each, _STEPS rounds) so that load changes hit both alike.
  times = np.array([[whole_step.seconds(1), block_step.seconds(1)] for _ in range(_STEPS.value)])
  whole_s, block_s = np.median(times, axis=0)
  setup, state = block_step.setup, block_step.state
  print(f"preset={config.preset} batch={config.train.batch_size} length={config.data.seq_len} "
        f"block={config.model.block_size}")
  print(f"whole-sequence step {whole_s * 1e3:8.1f} ms  {tokens / whole_s:10.0f} tokens/s")
  print(f"block step          {block_s * 1e3:8.1f} ms  {tokens / block_s:10.0f} tokens/s")
  ratios = times[:, 1] / times[:, 0]
  print(f"block / whole-sequence step time: {block_s / whole_s:.2f}x (medians of "
        f"{_STEPS.value} alternating steps; per-round ratio median {np.median(ratios):.2f}, "
        f"min {np.min(ratios):.2f}; goal <= 2.2)")

  rates = {cache: sampling_rate(setup, state.ema_params, cache, _K.value, _SAMPLES.value)
           for cache in (True, False)}
  blocks_per_seq = config.data.seq_len // config.model.block_size
  print(f"block sampling, {blocks_per_seq} blocks x {_K.value} steps, {_SAMPLES.value} sequences:"
        f" cached {rates[True]:.2f} seq/s, uncached {rates[False]:.2f} seq/s "
        f"({rates[True] / rates[False]:.1f}x)")
  print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
  app.run(main)
