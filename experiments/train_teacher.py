r"""Train (or resume) a discrete diffusion teacher.

    python experiments/train_teacher.py --config=configs/shakespeare_char.py:small \
        --workdir=runs/shk_teacher [--config.kernel.kind=uniform] [--config.train.num_steps=N]

Restarting the same command resumes from the last checkpoint exactly.
"""

from absl import app, flags
from ml_collections import config_flags

from dmmd_jax import cli
from dmmd_jax.training import teacher_run

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:preset].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, samples).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  result = cli.run(teacher_run.train_teacher, _CONFIG.value, _WORKDIR.value)
  print(f"teacher done: step {result['step']}, held-out {result['eval_bpt']:.4f} bits/token")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
