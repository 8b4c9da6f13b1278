r"""How reliably the copy-task tests' students pass, over student seeds (RESULTS.md §2).

    python bench/copy_task.py --variants=masked,uniform_noise,uniform_plain --seeds=0,1,2,3 \
        --output=results/copy_task_seeds.jsonl

Runs exactly the recipes of tests/training/test_copy_task.py (imported from there): one teacher
per kernel (the test's, 600 steps), then per variant and seed a k = 1 student, sampled 4,000
times. A JSON line per run (agreement, value frequencies, whether it meets the test's bounds);
a rerun skips runs already in --output. Variants: masked (the masked test's recipe),
uniform_noise (uniform with the noise input), uniform_plain (the paper's uniform student, no
noise: the test expects agreement ≥ 0.65 but not the with-noise bounds). --overrides (JSON, config
keys → values) and --updates change the recipe, for choosing one:

    python bench/copy_task.py --variants=masked --seeds=0,1,2,3 --updates=1500 \
        --overrides='{"distill.learning_rate": 6e-4, "distill.aux_learning_rate": 1e-3}' \
        --output=results/copy_task_recipes.jsonl
"""

import hashlib
import json
import os
import pathlib
import sys
import tempfile

from absl import app, flags

sys.path[:0] = [str(pathlib.Path(__file__).resolve().parents[1] / "tests" / d)
                for d in ("", "training")]
import _helpers  # noqa: E402
import test_copy_task as recipe  # noqa: E402

from dmmd_jax.training import teacher_run  # noqa: E402

_VARIANTS = flags.DEFINE_list("variants", ["masked", "uniform_noise", "uniform_plain"],
                              "Which tests' recipes.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2", "3"], "Student seeds.")
_OUTPUT = flags.DEFINE_string("output", "results/copy_task_seeds.jsonl", "JSON lines file.")
_WORKDIR = flags.DEFINE_string("workdir", "", "Runs directory (default: a temporary one).")
_OVERRIDES = flags.DEFINE_string("overrides", "{}", "JSON config overrides on top of the recipe.")
_UPDATES = flags.DEFINE_integer("updates", 0, "D-MMD updates (0: the recipe's).")


def learns_the_copy(agreement, freqs) -> bool:
  """The with-noise tests' bounds: agreement ≥ 0.95 with every value frequency in [0.35, 0.65]."""
  return agreement >= 0.95 and all(0.35 <= x <= 0.65 for x in freqs)


# variant → (kernel, updates, overrides, bounds check on (agreement, frequencies))
VARIANTS = {
    "masked": ("masked", recipe.MASKED_STEPS, recipe.MASKED_STUDENT, learns_the_copy),
    "uniform_noise": ("uniform", 1500, recipe.UNIFORM_STUDENT, learns_the_copy),
    "uniform_plain": ("uniform", 1500, {},
                      lambda a, f: a >= 0.65 and not learns_the_copy(a, f)),
}


def main(argv):
  del argv
  root = pathlib.Path(_WORKDIR.value or tempfile.mkdtemp(prefix="copy_task_"))
  root.mkdir(parents=True, exist_ok=True)
  data = _helpers.copy_task_tokens(root / "copy.npy")
  extra = json.loads(_OVERRIDES.value)
  done = set()
  if os.path.exists(_OUTPUT.value):
    done = {(r["variant"], r["seed"], json.dumps(r["overrides"], sort_keys=True), r["updates"])
            for r in map(json.loads, open(_OUTPUT.value))}
  teachers = {}
  for variant in _VARIANTS.value:
    kind, updates, overrides, passes = VARIANTS[variant]
    updates, overrides = _UPDATES.value or updates, {**overrides, **extra}
    if kind not in teachers:
      teachers[kind] = str(root / f"teacher_{kind}")
      teacher_run.train_teacher(recipe.copy_config(data, kind), teachers[kind])
    for seed in map(int, _SEEDS.value):
      if (variant, seed, json.dumps(overrides, sort_keys=True), updates) in done:
        continue
      tag = hashlib.sha1(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:8]
      run_dir = root / f"{variant}_s{seed}_{tag}_{updates}"
      tokens = recipe.distil_copy_task(data, teachers[kind], str(run_dir), kind, updates,
                                       seed=seed, **overrides)
      freqs = [float(f) for pos in recipe.describe(f"{variant} seed {seed}", tokens) for f in pos]
      agree = _helpers.agreement(tokens)
      line = {"variant": variant, "seed": seed, "updates": updates, "overrides": overrides,
              "agreement": agree,
              "frequencies": freqs, "meets_test_bounds": bool(passes(agree, freqs))}
      with open(_OUTPUT.value, "a") as f:
        f.write(json.dumps(line) + "\n")
      print(json.dumps(line), flush=True)


if __name__ == "__main__":
  app.run(main)
