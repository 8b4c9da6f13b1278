r"""Distil a few-step D-MMD student from a trained teacher (or resume distilling).

    python experiments/distill.py --config=configs/shakespeare_char.py:small \
        --workdir=runs/shk_k8 --config.distill.teacher_workdir=runs/shk_teacher \
        --config.distill.student_steps=8
    python experiments/distill.py --config=configs/shakespeare_char.py:small \
        --workdir=runs/shk_k16 --config.distill.teacher_workdir=runs/shk_teacher \
        --config.distill.student_steps=16 --config.distill.init_workdir=runs/shk_k8  # curriculum

The config must describe the same data, kernel and network as the teacher's stored config.
"""

from absl import app, flags
from ml_collections import config_flags

from dmmd_jax import cli
from dmmd_jax.training import dmmd_run

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:preset].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Student run directory.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  result = cli.run(dmmd_run.distill_student, _CONFIG.value, _WORKDIR.value)
  print(f"student done: step {result['step']}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
