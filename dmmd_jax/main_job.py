"""The main job: train a teacher, distil D-MMD students, compare them at several step counts.

    WORKDIR/teacher/        the teacher run
    WORKDIR/student_k{K}/   one D-MMD student per K
    WORKDIR/results.{json,csv}, WORKDIR/comparison.png

Every stage resumes: rerunning the same command skips finished runs and continues unfinished ones.
"""


import os

from dmmd_jax import config_lib
from dmmd_jax.evaluation import compare, report
from dmmd_jax.training import dmmd_run, teacher_run, trained_model


def student_config(config, teacher_dir: str, k: int) -> config_lib.ExperimentConfig:
  """The config of a k-step student of the teacher in teacher_dir."""
  return config_lib.replace(config_lib.typed(config),
                            distill={"teacher_workdir": teacher_dir, "student_steps": k})


def run_main_job(config, workdir: str, student_steps, teacher_steps, num_samples: int,
                 progress=print) -> list:
  """Returns the evaluation rows; writes results and the plot under workdir."""
  config = config_lib.typed(config)
  teacher_dir = os.path.join(workdir, "teacher")
  progress(f"[1/3] teacher → {teacher_dir}")
  result = teacher_run.train_teacher(config, teacher_dir)
  progress(f"      held-out negative ELBO {result['eval_bpt']:.4f} bits/token")
  student_dirs = []
  for i, k in enumerate(student_steps):
    student_dir = os.path.join(workdir, f"student_k{k}")
    progress(f"[2/3] student {i + 1}/{len(student_steps)}: k={k} → {student_dir}")
    dmmd_run.distill_student(student_config(config, teacher_dir, k), student_dir)
    student_dirs.append(student_dir)
  progress("[3/3] sampling and scoring")
  teacher = trained_model.load(teacher_dir)
  students = [trained_model.load(d) for d in student_dirs]

  def steps_for(model):
    return list(teacher_steps) if model.kind == "teacher" else [model.student_steps]

  rows = compare.evaluate([teacher, *students], steps_for, num_samples, teacher,
                          progress=progress)
  report.write_results(rows, workdir)
  report.plot(rows, os.path.join(workdir, "comparison.png"))
  return rows
