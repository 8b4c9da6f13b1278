r"""Teacher quality on real data: held-out negative ELBO (bits/token) and samples at many steps.

    python bench/teacher_quality.py --config=configs/shakespeare_char.py:small \
        --workdir=runs/bench_shk_teacher
    python bench/teacher_quality.py --config=configs/digits.py:small --workdir=runs/bench_digits

Trains (or resumes) the teacher, evaluates the EMA parameters on up to --eval_batches held-out
batches, and writes samples at --steps to WORKDIR/quality/. Reference: a unigram model of
Shakespeare's characters needs 4.1 bits/char (target ≤ 2.5 for the small teacher).
"""

import os

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from dmmd_jax import cli
from dmmd_jax.data import render
from dmmd_jax.training import teacher_run, trained_model

_CONFIG = config_flags.DEFINE_config_file("config", "configs/shakespeare_char.py:small", "")
_WORKDIR = flags.DEFINE_string("workdir", "runs/bench_teacher", "Teacher workdir.")
_STEPS = flags.DEFINE_list("steps", ["16", "64", "256", "1024"], "Sampling step counts.")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 32, "Held-out batches for the ELBO.")
_NUM = flags.DEFINE_integer("num_samples", 8, "Samples per step count.")


def unigram_bits(tokens: np.ndarray, vocab_size: int) -> float:
  counts = np.bincount(tokens.ravel(), minlength=vocab_size).astype(np.float64)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log2(p)).sum())


def run():
  config = _CONFIG.value
  teacher_run.train_teacher(config, _WORKDIR.value)
  model = trained_model.load(_WORKDIR.value)
  bits = teacher_run.heldout_bits_per_token(model.setup, model.params, config.train.batch_size,
                                      _EVAL_BATCHES.value)
  print(f"held-out negative ELBO: {bits:.4f} bits/token "
        f"(unigram entropy of the data: "
        f"{unigram_bits(model.setup.train_tokens, model.setup.info.vocab_size):.3f} bits/token)")
  out = os.path.join(_WORKDIR.value, "quality")
  os.makedirs(out, exist_ok=True)
  for steps in [int(s) for s in _STEPS.value]:
    samples = model.sample(_NUM.value, steps, seed=0)
    path = render.dump_samples(model.setup.info, samples, os.path.join(out, f"steps_{steps}"))
    print(f"samples at {steps} steps → {path}")
    if model.setup.info.kind == "text":
      print(render.decode_text(model.setup.info, samples[:1])[0][:300])


def main(argv):
  del argv
  cli.run(run)


if __name__ == "__main__":
  app.run(main)
