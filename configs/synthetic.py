r"""The exact-likelihood synthetic source (dmmd_jax/synthetic.py): a Markov chain and its mirror.

Sequences of length L over V symbols whose second half is the reversed first half, so position i
must equal position L − 1 − i. Copy rate and exact NLL (experiments/evaluate.py
--metrics=copy_rate,exact_nll) then measure exactly whether a few-step sampler keeps the
long-range constraint.

    python experiments/train_teacher.py --config=configs/synthetic.py:small --workdir=runs/syn
    python experiments/distill.py --config=configs/synthetic.py:small --workdir=runs/syn_k4 \
        --config.distill.teacher_workdir=runs/syn --config.distill.student_steps=4

The preset string may change the source: `configs/synthetic.py:small,vocab=32,length=64,seed=3,
examples=50000,concentration=0.3`. The data are written when the config is built, as
$DMMD_JAX_CACHE/synthetic/<name>.npy (default cache ~/.cache/dmmd_jax) plus the source
description <name>.synthetic.json, and read through data.source="npy" — so change the source
through the preset string, not through --config.data.* flags.
"""

import os
import pathlib

from dmmd_jax import config_lib
from dmmd_jax.data import synthetic

SOURCES = {
    "tiny": dict(vocab=8, length=16, examples=4096, seed=0, concentration=0.1),
    "small": dict(vocab=16, length=32, examples=20_000, seed=0, concentration=0.1),
    "base": dict(vocab=64, length=128, examples=50_000, seed=0, concentration=0.1),
}

SIZES = {
    "tiny": dict(config_lib.TINY_LOOP),
    "small": {"model.num_layers": 4, "model.width": 128, "model.num_heads": 4,
              "model.cond_dim": 64, "model.noise_dim": 16, "train.batch_size": 64,
              "train.num_steps": 3000, "train.learning_rate": 1e-3, "train.ema_decay": 0.99,
              "train.eval_every": 500, "train.checkpoint_every": 500, "sample.steps": 64,
              # Distillation: joint updates, batch 32, lr 1e-3 and a teacher at temperature 0.9,
              # the settings the seed-100 training-row sweeps preferred (BENCHMARKS.md), as many
              # updates as fit 15 minutes on 2 CPU cores.
              "distill.batch_size": 32, "distill.joint_updates": True, "distill.num_steps": 3200,
              "distill.learning_rate": 1e-3, "distill.aux_learning_rate": 1e-3,
              "distill.teacher_temperature": 0.9,
              "distill.checkpoint_every": 500, "distill.eval_every": 500},
    "base": {"model.num_layers": 8, "model.width": 512, "model.num_heads": 8,
             "model.cond_dim": 128, "model.noise_dim": 48, "train.batch_size": 256,
             "train.num_steps": 50_000, "train.learning_rate": 5e-4, "train.warmup_steps": 1000,
             "train.ema_decay": 0.9995, "train.eval_every": 5000, "sample.steps": 256,
             "train.checkpoint_every": 5000, "distill.batch_size": 256,
             "distill.num_steps": 10_000, "distill.checkpoint_every": 2000},
}


def parse_preset(spec: str):
  """"small,vocab=32,length=64" → ("small", {"vocab": 32, "length": 64, …} with defaults)."""
  preset, *pairs = (spec or "small").split(",")
  preset = config_lib.check_preset(preset)
  source = dict(SOURCES[preset])
  for pair in pairs:
    key, _, value = pair.partition("=")
    if key not in source or not value:
      raise config_lib.ConfigError(f"Unknown synthetic option {pair!r}; use key=value with key "
                                   f"in {sorted(source)}.")
    source[key] = type(source[key])(value)
  return preset, source


def data_path(options: dict) -> pathlib.Path:
  root = pathlib.Path(os.environ.get("DMMD_JAX_CACHE", "") or "~/.cache/dmmd_jax").expanduser()
  name = (f"mirror_v{options['vocab']}_l{options['length']}_n{options['examples']}"
          f"_s{options['seed']}_c{options['concentration']:g}")
  return root / "synthetic" / f"{name}.npy"


def get_config(spec: str = "small"):
  preset, options = parse_preset(spec)
  try:
    source = synthetic.SyntheticSource(options["vocab"], options["length"], options["seed"],
                                       options["concentration"])
  except synthetic.SyntheticError as e:
    raise config_lib.ConfigError(str(e)) from None
  path = synthetic.write_dataset(source, options["examples"], data_path(options))
  config = config_lib.base_config()
  config.data.source = "npy"
  config.data.path = str(path)
  config.data.vocab_size = source.vocab_size
  config.data.seq_len = source.seq_len
  config.data.eval_fraction = 0.1
  # Position i must equal position L − 1 − i: an attention offset that depends on i, which rotary
  # positions alone (relative offsets) find only slowly; a learned absolute table gives it.
  config.model.absolute_positions = True
  config_lib.apply_overrides(config, SIZES[preset])
  return config_lib.finish(config, preset)
