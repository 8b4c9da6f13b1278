r"""Paper ablations on one teacher: noise input on/off, zero-init noise, hard vs soft top-p.

    python bench/ablations.py --config=configs/digits.py:small --workdir=runs/ablations \
        --student_steps=4 [--variants="hard top-p 0.8" --output=results/hard_top_p.json]

Trains (or reuses) the teacher in WORKDIR/teacher, distils one student per variant with the same
budget, and prints a table of kernel MMD² to held-out data, the teacher's ELBO of the samples,
sample entropy, and the final generator loss (NaN/huge = diverged).
"""

import copy
import json
import math
import os

from absl import app, flags
from ml_collections import config_flags

from dmmd_jax import cli
from dmmd_jax.evaluation import compare, registry, report
from dmmd_jax.infra import workdir as workdir_lib
from dmmd_jax.training import dmmd_run, loop, teacher_run, trained_model

_CONFIG = config_flags.DEFINE_config_file("config", "configs/digits.py:small", "")
_WORKDIR = flags.DEFINE_string("workdir", "runs/ablations", "Directory for all runs.")
_K = flags.DEFINE_integer("student_steps", 4, "Student steps k.")
_NUM = flags.DEFINE_integer("num_samples", 256, "Samples per model.")
_OUTPUT = flags.DEFINE_string("output", "", "Also write the rows here (JSON).")


VARIANTS = {
    "noise (default)": {},
    "no noise input": {"distill.use_noise": False},
    "zero-init noise": {"distill.noise_init_scale": 0.0},
    "soft top-p 0.8": {"distill.teacher_top_p": 0.8},
    "hard top-p 0.8": {"distill.teacher_top_p": 0.8, "distill.top_p_mode": "hard",
                       "distill.allow_hard_top_p": True},
}
_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), "Which variants (names above).")


def variant_config(config, teacher_dir, overrides):
  c = copy.deepcopy(config)
  c.unlock()
  c.distill.teacher_workdir = teacher_dir
  c.distill.student_steps = _K.value
  for dotted, value in overrides.items():
    section, key = dotted.split(".")
    c[section][key] = value
  c.lock()
  return c


def run():
  config = _CONFIG.value
  teacher_dir = os.path.join(_WORKDIR.value, "teacher")
  teacher_run.train_teacher(config, teacher_dir)
  teacher = trained_model.load(teacher_dir)
  rows, statuses = [], []
  unknown = [v for v in _VARIANTS.value if v not in VARIANTS]
  if unknown:
    raise ValueError(f"unknown --variants {unknown}; choose from {list(VARIANTS)}.")
  for name in _VARIANTS.value:
    overrides = VARIANTS[name]
    out = os.path.join(_WORKDIR.value, name.split(" (")[0].replace(" ", "_").replace(".", ""))
    try:
      dmmd_run.distill_student(variant_config(config, teacher_dir, overrides), out)
      status = "trained"
    except loop.TrainingError as e:
      status = f"stopped: {e}"
    last = workdir_lib.read_metrics(out)[-1] if os.path.exists(f"{out}/metrics.jsonl") else {}
    metrics = {"final_gen_loss": last.get("gen_loss", math.nan)}
    if status == "trained":
      samples = trained_model.load(out).sample(_NUM.value, seed=0)
      metrics.update(registry.score(samples, teacher.setup.eval_tokens[:_NUM.value], teacher,
                                      teacher.setup.info.vocab_size))
    rows.append(compare.Row(name, status[:40], _K.value, metrics))
    statuses.append(status)
    print(name, status, json.dumps(metrics))
  print(report.format_table(rows))
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      json.dump([{**{k: None if isinstance(v, float) and math.isnan(v) else v
                      for k, v in r.flat().items()}, "kind": "student", "status": status}
                 for r, status in zip(rows, statuses, strict=True)], f, indent=2)


def main(argv):
  del argv
  cli.run(run)


if __name__ == "__main__":
  app.run(main)
