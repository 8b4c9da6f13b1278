r"""D-MMD quality: teacher at many step counts vs students at k = 4/8/16/32.

    python bench/distill_quality.py --config=configs/shakespeare_char.py:small \
        --workdir=runs/bench_shk
    python bench/distill_quality.py --config=configs/digits.py:small --workdir=runs/bench_digits

The same pipeline as experiments/main.py with the benchmark's step lists and more samples.
Goal: the k = 16 student at least as good as the teacher at 256 steps; every student clearly
better than the teacher at the same k (on mmd2 to held-out data and the teacher's ELBO).
"""

from absl import app, flags
from ml_collections import config_flags

from dmmd_jax import cli, main_job
from dmmd_jax.evaluation import report

_CONFIG = config_flags.DEFINE_config_file("config", "configs/digits.py:small", "")
_WORKDIR = flags.DEFINE_string("workdir", "runs/bench_distill", "Directory for all runs.")
_STUDENTS = flags.DEFINE_list("student_steps", ["4", "8", "16", "32"], "Student k.")
_TEACHER = flags.DEFINE_list("teacher_steps", ["4", "8", "16", "32", "64", "256", "1024"],
                             "Teacher sampling steps.")
_NUM = flags.DEFINE_integer("num_samples", 512, "Samples per (model, steps).")


def main(argv):
  del argv
  rows = cli.run(main_job.run_main_job, _CONFIG.value, _WORKDIR.value,
                 [int(k) for k in _STUDENTS.value], [int(k) for k in _TEACHER.value],
                 _NUM.value)
  print(report.format_table(rows))


if __name__ == "__main__":
  app.run(main)
