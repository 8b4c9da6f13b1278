"""The main job: train a teacher, distil D-MMD students, compare them at several step counts.

    WORKDIR/teacher/        the teacher run
    WORKDIR/student_k{K}/   one D-MMD student per K
    WORKDIR/results.{json,csv}, WORKDIR/comparison.png

Every stage resumes: rerunning the same command skips finished runs and continues unfinished ones.
"""

import copy
import os

from dmmd_jax import distill, evaluation, runs, train


def student_config(config, teacher_dir: str, k: int):
  c = copy.deepcopy(config)
  c.unlock()
  c.distill.teacher_workdir = teacher_dir
  c.distill.student_steps = k
  c.lock()
  return c


def run_main_job(config, workdir: str, student_steps, teacher_steps, num_samples: int,
                 progress=print) -> list:
  """Returns the evaluation rows; writes results and the plot under workdir."""
  teacher_dir = os.path.join(workdir, "teacher")
  progress(f"[1/3] teacher → {teacher_dir}")
  result = train.train_teacher(config, teacher_dir)
  progress(f"      held-out negative ELBO {result['eval_bpt']:.4f} bits/token")
  student_dirs = []
  for i, k in enumerate(student_steps):
    student_dir = os.path.join(workdir, f"student_k{k}")
    progress(f"[2/3] student {i + 1}/{len(student_steps)}: k={k} → {student_dir}")
    distill.distill(student_config(config, teacher_dir, k), student_dir)
    student_dirs.append(student_dir)
  progress("[3/3] sampling and scoring")
  teacher = runs.load(teacher_dir)
  students = [runs.load(d) for d in student_dirs]

  def steps_for(model):
    return list(teacher_steps) if model.kind == "teacher" else [model.student_steps]

  rows = evaluation.evaluate([teacher, *students], steps_for, num_samples, teacher,
                             progress=progress)
  evaluation.write_results(rows, workdir)
  evaluation.plot(rows, os.path.join(workdir, "comparison.png"))
  return rows
