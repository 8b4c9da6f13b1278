r"""Progressive-distillation baseline (SDTT style): halve the teacher's steps round by round.

    python experiments/sdtt.py --config=configs/digits.py:small --workdir=runs/digits_sdtt_k4 \
        --config.distill.teacher_workdir=runs/digits_teacher --config.distill.student_steps=4 \
        [--start_steps=64] [--config.distill.num_steps=300]

Rounds: start_steps (default config.sample.steps) → /2 → … → k, each config.distill.num_steps
steps. The workdir is a student workdir (runs.load, experiments/sample.py, experiments/evaluate.py
read it). Restarting the same command resumes. See dmmd_jax/sdtt.py for the method.
"""

from absl import app, flags
from ml_collections import config_flags

from dmmd_jax import cli
from dmmd_jax.training import sdtt_run

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:preset].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Student run directory.")
_START = flags.DEFINE_integer("start_steps", 0, "Steps of the first round's teacher "
                              "(0: config.sample.steps); k times a power of two.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  result = cli.run(sdtt_run.distill_sdtt, _CONFIG.value, _WORKDIR.value, _START.value)
  print(f"SDTT student done: {result['rounds']} rounds, {result['step']} steps")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
