"""The main job: train a teacher, distil D-MMD students, compare them at several step counts.

    WORKDIR/teacher/        the teacher run
    WORKDIR/student_k{K}/   one D-MMD student per K (diagnostics.png: its moment mismatch and
                            entropy per bucket of s over the updates)
    WORKDIR/results.{json,csv}, WORKDIR/comparison.png
    WORKDIR/samples_overview.{png,txt}   a row each: real data, teacher and student at every k,
                                         the teacher at its most steps

Every stage resumes: rerunning the same command skips finished runs and continues unfinished ones.
"""


import os

from dmmd_jax import config_lib
from dmmd_jax.evaluation import compare, report
from dmmd_jax.infra import workdir as workdir_lib
from dmmd_jax.training import dmmd_run, teacher_run, trained_model


def student_config(config, teacher_dir: str, k: int) -> config_lib.ExperimentConfig:
  """The config of a k-step student of the teacher in teacher_dir."""
  return config_lib.replace(config_lib.typed(config),
                            distill={"teacher_workdir": teacher_dir, "student_steps": k})


def distill_students(config, teacher_dir: str, student_steps, dir_of, progress=print) -> list:
  """Distils (or resumes) a student per k into dir_of(k) in ascending k; returns their dirs.

  With config.distill.curriculum, each student after the first starts from the previous one
  (distill.init_workdir: the k = 16 student from the finished k = 4 one).
  """
  config = config_lib.typed(config)
  dirs = []
  for i, k in enumerate(sorted(student_steps)):
    student = student_config(config, teacher_dir, k)
    if config.distill.curriculum and dirs:
      student = config_lib.replace(student, distill={"init_workdir": dirs[-1]})
    progress(f"student {i + 1}/{len(student_steps)}: k={k} → {dir_of(k)}")
    dmmd_run.distill_student(student, dir_of(k))
    dirs.append(dir_of(k))
  return dirs


def run_main_job(config, workdir: str, student_steps, teacher_steps, num_samples: int,
                 progress=print) -> list:
  """Returns the evaluation rows; writes results and the plot under workdir."""
  config = config_lib.typed(config)
  teacher_dir = os.path.join(workdir, "teacher")
  progress(f"[1/3] teacher → {teacher_dir}")
  result = teacher_run.train_teacher(config, teacher_dir)
  progress(f"      held-out negative ELBO {result['eval_bpt']:.4f} bits/token")
  student_dirs = distill_students(config, teacher_dir, student_steps,
                                 lambda k: os.path.join(workdir, f"student_k{k}"),
                                 lambda message: progress(f"[2/3] {message}"))
  for student_dir in student_dirs:
    report.plot_diagnostics(workdir_lib.read_metrics(student_dir),
                            os.path.join(student_dir, "diagnostics.png"))
  progress("[3/3] sampling and scoring")
  teacher = trained_model.load(teacher_dir)
  students = [trained_model.load(d) for d in student_dirs]

  def steps_for(model):  # the teacher also at every student's k (the comparison the job is for)
    if model.kind == "teacher":
      return sorted({*teacher_steps, *student_steps})
    return [model.student_steps]

  drawn = {}
  rows = compare.evaluate([teacher, *students], steps_for, num_samples, teacher,
                          progress=progress, on_samples=lambda name, k, t: drawn.update(
                              {(name, k): t}))
  report.write_results(rows, workdir)
  report.plot(rows, os.path.join(workdir, "comparison.png"))
  report.sample_overview(os.path.join(workdir, "samples_overview"), teacher.setup.info,
                         sample_grid(drawn, compare.reference_sets(teacher.setup, num_samples),
                                     student_steps, max(teacher_steps)))
  return rows


def sample_grid(drawn, reference_sets, student_steps, most_steps: int) -> list:
  """(label, tokens) rows of the main job's picture: real data, then per k the teacher and the
  student at k steps, then the teacher at its most steps.

  drawn: {(model name, steps): tokens `[n, L]`} from `compare.evaluate`; reference_sets: what
  `compare.reference_sets` returns (its second entry is the real data of the "data" row).
  """
  _, data_rows, data_label = reference_sets
  entries = [(data_label, data_rows)]
  for k in student_steps:
    entries += [(f"teacher {k} steps", drawn[("teacher", k)]),
                (f"student k={k}", drawn[(f"student_k{k}", k)])]
  return entries + [(f"teacher {most_steps} steps", drawn[("teacher", most_steps)])]
