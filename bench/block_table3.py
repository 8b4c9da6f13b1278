r"""Paper Table 3: the block student at k steps per block vs the block teacher at k and at 256.

    python bench/block_table3.py [--config=configs/shakespeare_char.py:block_small] \
        [--workdir=runs/block_table3] [--seeds=0,1,2] [--k=4] [--num_samples=256] \
        [--output=results/block_table3]

Trains (or resumes) the block teacher of --config, the reference LM (configs/reference_lm.py
--reference_lm preset, on the teacher's data) and one D-MMD student per seed at k steps per
block, then scores, for every seed s, the student at k and the teacher at k and at
--teacher_steps (default 256 per block) with sampling seed s against the same held-out rows
(gen_ppl, gm, entropy). Paired differences per seed, student − teacher, with their paired
standard errors and verdicts come from `evaluation.paired` (lower is better for gen_ppl and gm;
higher for entropy, the collapse diagnostic). Writes OUTPUT/rows.csv (one row per seed, model
and steps) and OUTPUT/summary.json (`paired.Paired.row()` per comparison and metric).
"""

import json
import os

from absl import app, flags
from ml_collections import config_flags

from dmmd_jax import cli, config_lib, main_job
from dmmd_jax.evaluation import compare, paired, registry, report
from dmmd_jax.models import reference_lm
from dmmd_jax.training import dmmd_run, reference_lm_run, teacher_run, trained_model

_CONFIG = config_flags.DEFINE_config_file("config", "configs/shakespeare_char.py:block_small",
                                          "Block teacher/student config.")
_REF_CONFIG = config_flags.DEFINE_config_file("reference_lm", "configs/reference_lm.py:small",
                                              "Reference-LM config (its data: the teacher's).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/block_table3", "Directory for all runs.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Student training and sampling seeds.")
_K = flags.DEFINE_integer("k", 4, "Student steps per block.")
_TEACHER_STEPS = flags.DEFINE_integer("teacher_steps", 256, "The teacher's many steps per block.")
_NUM = flags.DEFINE_integer("num_samples", 256, "Samples per (seed, model, steps).")
_OUTPUT = flags.DEFINE_string("output", "results/block_table3", "Where rows.csv, summary.json go.")

LOWER_IS_BETTER = {"gen_ppl": True, "gm": True, "entropy": False}
METRICS = tuple(LOWER_IS_BETTER)


def train_all(config, ref_config, workdir: str, seeds, k: int):
  """(teacher dir, reference-LM dir, {seed: student dir}); every stage resumes."""
  teacher_dir = os.path.join(workdir, "teacher")
  teacher_run.train_teacher(config, teacher_dir)
  ref_dir = os.path.join(workdir, "reference_lm")
  if not os.path.exists(os.path.join(ref_dir, reference_lm.RECORD_FILE)):
    ref_config.data_from = teacher_dir
    reference_lm_run.train_reference(ref_config, ref_dir)
  students = {}
  for seed in seeds:
    students[seed] = os.path.join(workdir, f"student_k{k}_seed{seed}")
    student = config_lib.replace(main_job.student_config(config, teacher_dir, k), seed=seed)
    dmmd_run.distill_student(student, students[seed])
  return teacher_dir, ref_dir, students


def score_seeds(teacher, students, lm, k: int, teacher_steps: int, num_samples: int) -> list:
  """Flat rows (with a "seed" column): per seed, teacher at k and teacher_steps, student at k."""
  resources = registry.Resources(reference_lm=lm)
  out = []
  for seed, student in students.items():
    steps_for = lambda m: [k, teacher_steps] if m.kind == "teacher" else [k]
    rows = compare.evaluate([teacher, student], steps_for, num_samples, teacher, METRICS, seed,
                            resources=resources, bars=False)
    out += [{"seed": seed, **row.flat()} for row in rows]
  return out


def paired_differences(rows, k: int, teacher_steps: int) -> list:
  """`paired.Paired.row()`s: student@k (A) vs teacher@s (B), s = k and teacher_steps."""
  return [paired.compare_rows(rows, metric, ("student", k), ("teacher", steps),
                              LOWER_IS_BETTER[metric], key="kind").row()
          for steps in (k, teacher_steps) for metric in METRICS]


def write(rows, summary, output: str) -> None:
  report.write_csv(os.path.join(output, "rows.csv"), rows)
  with open(os.path.join(output, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)


def run():
  config = config_lib.typed(_CONFIG.value)
  if not config.model.block_size:
    raise ValueError("--config must be a block preset (model.block_size > 0).")
  seeds = [int(s) for s in _SEEDS.value]
  if len(seeds) < 2:
    raise ValueError("--seeds needs at least 2 seeds for a paired standard error.")
  teacher_dir, ref_dir, student_dirs = train_all(config, _REF_CONFIG.value, _WORKDIR.value,
                                                 seeds, _K.value)
  teacher = trained_model.load(teacher_dir)
  students = {s: trained_model.load(d) for s, d in student_dirs.items()}
  rows = score_seeds(teacher, students, reference_lm.load(ref_dir), _K.value,
                     _TEACHER_STEPS.value, _NUM.value)
  summary = paired_differences(rows, _K.value, _TEACHER_STEPS.value)
  write(rows, summary, _OUTPUT.value)
  for r in summary:
    print(f"{r['a']} - {r['b']}: {r['metric']} {r['diff']:+.4g} ± {r['se']:.2g} ({r['verdict']}, "
          f"A at least as good: {r['at_least_as_good']})")


def main(argv):
  del argv
  cli.run(run)


if __name__ == "__main__":
  app.run(main)
