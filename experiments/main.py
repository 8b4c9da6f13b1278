r"""The main job: teacher → D-MMD students → comparison table and plot, on one machine.

    python experiments/main.py                       # digits, small preset, 2-core CPU
    python experiments/main.py --config=configs/shakespeare_char.py:small --workdir=runs/shk \
        --student_steps=4,8,16 --teacher_steps=4,8,16,64,256

Writes WORKDIR/results.{json,csv} and WORKDIR/comparison.png, prints the table. Rerunning
resumes where it stopped.
"""

from absl import app, flags
from ml_collections import config_flags

from dmmd_jax import cli, main_job
from dmmd_jax.evaluation import report

_CONFIG = config_flags.DEFINE_config_file("config", "configs/digits.py:small",
                                          "Experiment config file[:preset].")
_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Directory for all runs and results.")
_STUDENTS = flags.DEFINE_list("student_steps", ["4", "16"], "Student step counts k.")
_TEACHER = flags.DEFINE_list("teacher_steps", ["4", "8", "16", "64", "256"],
                             "Teacher sampling step counts.")
_NUM = flags.DEFINE_integer("num_samples", 256, "Samples per (model, steps).")


def main(argv):
  del argv
  rows = cli.run(main_job.run_main_job, _CONFIG.value, _WORKDIR.value,
                 [int(k) for k in _STUDENTS.value], [int(k) for k in _TEACHER.value],
                 _NUM.value)
  print()
  print(report.format_table(rows))
  print(f"\nresults: {_WORKDIR.value}/results.csv, plot: {_WORKDIR.value}/comparison.png")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
