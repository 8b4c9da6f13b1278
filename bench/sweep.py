r"""Distillation settings × training seeds: students vs their teacher, with paired standard errors.

Choose settings on training rows and other seeds, then report fresh seeds on held-out rows:

    python bench/sweep.py --config=configs/digits.py:small --workdir=runs/sweep_digits \
        --grid="distill.learning_rate=3e-4|1e-3,distill.noise_init_scale=0.3|1.0" \
        --seeds=100,101 --split=train --output=results/digits_sweep
    python bench/sweep.py --config=configs/digits.py:small --workdir=runs/seeds_digits \
        --student_steps=4,16 --teacher_steps=4,16,256 --seeds=0,1,2 \
        --pairs=4:4,4:16,16:16,16:256 --output=results/digits_seeds

One teacher (the config's seed) in WORKDIR/teacher. For every setting of the grid (the product of
its `key=v1|v2|…` entries; none: the config as it is) and every seed s, a student per k in
WORKDIR/[SETTING/]seed{s}/student_k{k} (config.seed = s), distilled in ascending k as the main job
does (`main_job.distill_students`: with distill.curriculum each starts from the previous). The
teacher at every --teacher_steps and each student at its k are sampled with sampling seed s and
scored against the same rows (`evaluation.compare.evaluate`; --split=eval: held-out rows,
--split=train: training rows, for choosing settings). A pair K:T compares the k = K student with
the teacher at T steps per seed (`evaluation.paired`: mean difference, paired SE, verdict), per
setting.

Writes OUTPUT_rows.csv (a row per setting, seed, model and steps; appended as each finishes, so
a rerun skips what is there) and OUTPUT_paired.csv, and prints the paired table. Distillations
resume from their checkpoints. A row is named by its grid setting and seed only, so
OUTPUT_sweep.json records what else made the rows (base config, --split, --num_samples,
--metrics): a rerun with other values stops with an error instead of skipping rows made
differently.
"""

import csv
import itertools
import json
import os

from absl import app, flags
from ml_collections import config_flags

from dmmd_jax import cli, config_lib, main_job
from dmmd_jax.evaluation import compare, paired, registry, report
from dmmd_jax.infra import workdir as workdir_lib
from dmmd_jax.training import teacher_run, trained_model

_CONFIG = config_flags.DEFINE_config_file("config", "configs/digits.py:small", "")
_WORKDIR = flags.DEFINE_string("workdir", "runs/sweep", "Directory for all runs.")
_STUDENTS = flags.DEFINE_list("student_steps", ["4", "16"], "Student k.")
_TEACHER = flags.DEFINE_list("teacher_steps", ["4", "16", "256"], "Teacher sampling steps.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Student training (and sampling) seeds.")
_PAIRS = flags.DEFINE_list("pairs", ["4:4", "16:16", "16:256"],
                           "K:T = student k = K vs teacher at T steps.")
_GRID = flags.DEFINE_list("grid", [], "Settings: section.key=v1|v2|… entries (product).")
_METRICS = flags.DEFINE_list("metrics", list(registry.METRICS), "Metrics (evaluate.py's).")
_SPLIT = flags.DEFINE_enum("split", "eval", ["eval", "train"], "Rows the samples are scored "
                           "against: held-out (report) or training (choosing settings).")
_NUM = flags.DEFINE_integer("num_samples", 512, "Samples per (model, steps, seed).")
_REFERENCE_LM = flags.DEFINE_string("reference_lm", None, "Reference LM workdir (gen_ppl, gm).")
_FEATURE_NET = flags.DEFINE_string("feature_net", None, "Feature-net workdir (frechet, "
                                   "precision_recall, confidence).")
_OUTPUT = flags.DEFINE_string("output", None, "Prefix of the two CSV files.")
flags.mark_flags_as_required(["output"])


def settings(config, grid) -> list:
  """[(name, {section: {key: value}})] for the product of grid entries "section.key=v1|v2"."""
  axes = []
  for entry in grid:
    dotted, _, values = entry.partition("=")
    section, key = dotted.split(".")
    kind = type(getattr(getattr(config, section), key))
    parse = (lambda v: v.lower() == "true") if kind is bool else kind
    axes.append([(section, key, parse(v)) for v in values.split("|")])
  out = []
  for point in itertools.product(*axes):
    changes = {}
    for section, key, value in point:
      changes.setdefault(section, {})[key] = value
    out.append(("_".join(f"{key}={value}" for _, key, value in point), changes))
  return out


def seed_rows(config, teacher_dir, teacher, resources, workdir, seed, ks, teacher_steps,
              metrics, num_samples, split, teacher_rows=None):
  """Distils (or resumes) this seed's students; returns the data's, the teacher's and their flat
  rows.

  teacher: the loaded teacher model; resources: its `registry.Resources` (both loaded once per
  sweep, not per seed). teacher_rows: this seed's data and teacher rows from another setting of
  the same sweep — the same teacher, sampling seed, rows and metrics give the same numbers — or
  None to sample and score the teacher."""
  dirs = main_job.distill_students(
      config_lib.replace(config, seed=seed), teacher_dir, ks,
      lambda k: os.path.join(workdir, f"seed{seed}", f"student_k{k}"), progress=lambda _: None)
  students = [trained_model.load(d) for d in dirs]

  def steps_for(model):
    return teacher_steps if model.kind == "teacher" else [model.student_steps]

  models = students if teacher_rows else [teacher, *students]
  rows = [{"seed": seed, **r.flat(), "model": r.kind if r.kind != "student" else
           f"student_k{r.steps}"} for r in compare.evaluate(
               models, steps_for, num_samples, teacher, metrics, seed=seed, bars=False,
               split=split, resources=resources)]
  if teacher_rows:
    return [*teacher_rows, *(r for r in rows if r["model"] != "data")]
  return rows


def paired_rows(rows, pairs) -> list:
  """One `paired.Paired.row()` per (setting, pair, metric column) the setting has rows for."""
  out = []
  for setting in dict.fromkeys(r["setting"] for r in rows):
    mine = [r for r in rows if r["setting"] == setting]
    scored = {(r["model"], int(r["steps"])) for r in mine}
    columns = [c for c in mine[0] if c not in ("setting", "seed", "model", "kind", "steps")
               and not c.endswith("_se")]
    for (k, t), c in itertools.product(pairs, columns):
      if not {(f"student_k{k}", k), ("teacher", t)} <= scored:
        continue  # a setting swept with other k or teacher steps than this pair's
      p = paired.compare_rows(mine, c, (f"student_k{k}", k), ("teacher", t),
                              lower_is_better=c not in registry.HIGHER_IS_BETTER)
      out.append({"setting": setting, **p.row(), **(
          {"verdict": "(no better side)", "at_least_as_good": ""}
          if c in registry.UNORDERED else {})})
  return out


def read_rows(path) -> list:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [{**r, "seed": int(r["seed"]), "steps": int(r["steps"])} for r in csv.DictReader(f)]


def sweep_identity(config, split, num_samples, metrics) -> dict:
  """What, besides a row's setting and seed, decides its numbers: flat `section.key` → value."""
  identity = {**config_lib.flatten(config_lib.to_dict(config)), "split": split,
              "num_samples": num_samples, "metrics": list(metrics)}
  return json.loads(json.dumps(identity))  # tuples → lists, as read back


def check_same_sweep(output, identity) -> None:
  """Rows already in OUTPUT_rows.csv were made with this identity (OUTPUT_sweep.json), else a
  one-line ValueError naming what differs; with no rows yet, records the identity."""
  path, rows_path = f"{output}_sweep.json", f"{output}_rows.csv"
  if os.path.exists(rows_path) and os.path.exists(path):
    stored = workdir_lib.read_json(path)
    differ = sorted(k for k in stored.keys() | identity.keys() if stored.get(k) != identity.get(k))
    if differ:
      shown = ", ".join(f"{k}: {stored.get(k)!r} there, {identity.get(k)!r} now"
                        for k in differ[:3])
      raise ValueError(f"{rows_path} holds rows of another sweep ({shown}"
                       f"{', …' if len(differ) > 3 else ''}); choose a new --output")
  elif not os.path.exists(rows_path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
      json.dump(identity, f, indent=1, sort_keys=True)


def run(config, workdir, ks, teacher_steps, seeds, pairs, grid, metrics, num_samples, split,
        output, scorers=(None, None)):
  """scorers: (reference LM workdir, feature-net workdir), each or None."""
  config = config_lib.typed(config)
  registry.check_metric_names(metrics)
  points = settings(config, grid)  # a bad grid entry fails before any training
  check_same_sweep(output, sweep_identity(config, split, num_samples, metrics))
  teacher_dir = os.path.join(workdir, "teacher")
  teacher_run.train_teacher(config, teacher_dir)
  teacher = trained_model.load(teacher_dir)
  resources = compare.resources_for(teacher, *scorers)
  rows_path = f"{output}_rows.csv"
  rows = read_rows(rows_path)
  teacher_rows = {}  # seed → its data and teacher rows, scored once per sweep run
  for (name, changes), seed in itertools.product(points, seeds):
    if any(r["setting"] == name and r["seed"] == seed for r in rows):
      continue
    scored = seed_rows(config_lib.replace(config, **changes), teacher_dir, teacher, resources,
                       os.path.join(workdir, name), seed, ks, teacher_steps, metrics,
                       num_samples, split, teacher_rows.get(seed))
    teacher_rows[seed] = [r for r in scored if r["model"] in ("data", "teacher")]
    new = [{"setting": name, **r} for r in scored]
    report.write_csv(rows_path, new, append=True)
    rows += new
  summary = paired_rows(rows, pairs)
  report.write_csv(f"{output}_paired.csv", summary)
  for p in summary:
    print(f"{p['setting']:>24s} {p['metric']:>14s} {p['a']:>14s} − {p['b']:<12s} "
          f"{p['mean_a']:9.4g} {p['mean_b']:9.4g} diff {p['diff']:+.4g} ± {p['se']:.2g} "
          f"(n={p['n']}) {p['verdict']}")
  return summary


def main(argv):
  del argv
  ints = lambda values: [int(v) for v in values]  # noqa: E731
  pairs = [tuple(ints(p.split(":"))) for p in _PAIRS.value]
  cli.run(run, _CONFIG.value, _WORKDIR.value, ints(_STUDENTS.value), ints(_TEACHER.value),
          ints(_SEEDS.value), pairs, _GRID.value, _METRICS.value, _NUM.value, _SPLIT.value,
          _OUTPUT.value, (_REFERENCE_LM.value, _FEATURE_NET.value))


if __name__ == "__main__":
  app.run(main)
