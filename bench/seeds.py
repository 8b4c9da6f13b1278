r"""Students vs their teacher across training seeds, with paired standard errors.

    python bench/seeds.py --config=configs/digits.py:small --workdir=runs/seeds_digits \
        --student_steps=4,16 --teacher_steps=4,16,256 --seeds=0,1,2 \
        --pairs=4:4,16:16,16:256 --output=results/digits_seeds

One teacher (the config's seed) in WORKDIR/teacher; for every seed s a student per k in
WORKDIR/seed{s}/student_k{k} (config.seed = s). Then, for every seed s, the teacher at every
--teacher_steps and each student at its k are sampled with sampling seed s and scored against the
same held-out rows (`evaluation.compare.evaluate`). A pair K:T compares the k = K student with the
teacher at T steps per seed (`evaluation.paired`: mean difference, paired SE, verdict).
Writes OUTPUT_rows.csv (every row, with its seed) and OUTPUT_paired.csv, prints both. Resumable:
finished runs are skipped, unfinished ones continue.
"""

import csv
import os

from absl import app, flags
from ml_collections import config_flags

from dmmd_jax import cli, config_lib, main_job
from dmmd_jax.evaluation import compare, paired, registry
from dmmd_jax.training import dmmd_run, teacher_run, trained_model

_CONFIG = config_flags.DEFINE_config_file("config", "configs/digits.py:small", "")
_WORKDIR = flags.DEFINE_string("workdir", "runs/seeds", "Directory for all runs.")
_STUDENTS = flags.DEFINE_list("student_steps", ["4", "16"], "Student k.")
_TEACHER = flags.DEFINE_list("teacher_steps", ["4", "16", "256"], "Teacher sampling steps.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Student training (and sampling) seeds.")
_PAIRS = flags.DEFINE_list("pairs", ["4:4", "16:16", "16:256"],
                           "K:T = student k = K vs teacher at T steps.")
_METRICS = flags.DEFINE_list("metrics", list(registry.METRICS), "Metrics (evaluate.py's).")
_NUM = flags.DEFINE_integer("num_samples", 512, "Samples per (model, steps, seed).")
_OUTPUT = flags.DEFINE_string("output", None, "Prefix of the two CSV files.")
flags.mark_flags_as_required(["output"])


def seed_rows(config, workdir, seed, ks, teacher_steps, metrics, num_samples):
  """Distils (or resumes) this seed's students; returns its flat rows."""
  teacher_dir = os.path.join(workdir, "teacher")
  students = []
  for k in ks:
    student_dir = os.path.join(workdir, f"seed{seed}", f"student_k{k}")
    dmmd_run.distill_student(config_lib.replace(
        main_job.student_config(config, teacher_dir, k), seed=seed), student_dir)
    students.append(trained_model.load(student_dir))
  teacher = trained_model.load(teacher_dir)

  def steps_for(model):
    return teacher_steps if model.kind == "teacher" else [model.student_steps]

  rows = compare.evaluate([teacher, *students], steps_for, num_samples, teacher, metrics,
                          seed=seed, bars=False)
  return [{"seed": seed, **r.flat(), "model": r.kind if r.kind != "student" else
           f"student_k{r.steps}"} for r in rows]


def paired_rows(rows, pairs, seeds) -> list:
  """One `paired.Paired.row()` per (pair, metric column)."""
  def values(model, steps, column):
    found = {r["seed"]: r[column] for r in rows if r["model"] == model and r["steps"] == steps}
    return [found[s] for s in seeds]

  columns = [c for c in rows[0] if c not in ("seed", "model", "kind", "steps")
             and not c.endswith("_se")]
  out = []
  for k, t in pairs:
    for c in columns:
      p = paired.compare(c, f"student_k{k}@{k}", values(f"student_k{k}", k, c),
                         f"teacher@{t}", values("teacher", t, c),
                         lower_is_better=c not in registry.HIGHER_IS_BETTER)
      out.append({**p.row(), **({"verdict": "(no better side)", "at_least_as_good": ""}
                                if c in registry.UNORDERED else {})})
  return out


def write_csv(path, rows):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)


def run(config, workdir, ks, teacher_steps, seeds, pairs, metrics, num_samples, output):
  config = config_lib.typed(config)
  registry.check_metric_names(metrics)
  teacher_run.train_teacher(config, os.path.join(workdir, "teacher"))
  rows = [r for s in seeds
          for r in seed_rows(config, workdir, s, ks, teacher_steps, metrics, num_samples)]
  write_csv(f"{output}_rows.csv", rows)
  summary = paired_rows(rows, pairs, seeds)
  write_csv(f"{output}_paired.csv", summary)
  for p in summary:
    print(f"{p['metric']:>16s} {p['a']:>16s} − {p['b']:<12s} {p['mean_a']:10.4g} "
          f"{p['mean_b']:10.4g} diff {p['diff']:+.4g} ± {p['se']:.2g} (n={p['n']}) {p['verdict']}")
  return summary


def main(argv):
  del argv
  ints = lambda values: [int(v) for v in values]  # noqa: E731
  pairs = [tuple(ints(p.split(":"))) for p in _PAIRS.value]
  cli.run(run, _CONFIG.value, _WORKDIR.value, ints(_STUDENTS.value), ints(_TEACHER.value),
          ints(_SEEDS.value), pairs, _METRICS.value, _NUM.value, _OUTPUT.value)


if __name__ == "__main__":
  app.run(main)
