"""Where a few-step sampler breaks the palindrome (issue 11, target 1): mirror errors by step.

For each workdir (teacher or D-MMD student of `configs/synthetic.py`), draws samples with the
masked sampler recording the step that unmasked each position (`sampling.sample(...,
return_order=True)`) and counts, per step, the mirrored pairs (i, L − 1 − i) completed there: both
positions drawn in the same step ("together": only a joint draw keeps them equal) or the second
copied from a visible partner ("after"), and how many of each disagree
(`synthetic.mirror_errors_by_step`). Prints a table and writes it as JSON. Seconds on a CPU.

    python bench/mirror_errors.py --workdirs=runs/syn,runs/syn_k4 --steps=4,64 \
        --output=results/mirror_errors.json

A teacher is sampled with each of --steps (default: its sample.steps); a student with its own k.
"""

import argparse
import json
import sys

import jax
import numpy as np

from dmmd_jax.data import synthetic
from dmmd_jax.diffusion import sampling
from dmmd_jax.evaluation import compare
from dmmd_jax.infra import outputs
from dmmd_jax.training import setup as setup_lib
from dmmd_jax.training import trained_model


def mirror_rows(model: trained_model.Model, steps: int, num_samples: int, seed: int) -> dict:
  """The JSON row of one model: copy rate and per-step pair counts (lists of length steps)."""
  setup = model.setup
  cfg = setup_lib.sampler_config_of(setup.config, steps)
  tokens, order = sampling.sample(jax.random.key(seed), setup.apply_fn, model.params,
                                  setup.kernel, cfg, num_samples, setup.seq_len,
                                  model.noise_fn(), return_order=True)
  errors = synthetic.mirror_errors_by_step(tokens, order, steps)
  return {"workdir": model.workdir, "kind": model.kind, "steps": steps,
          "num_samples": num_samples, "seed": seed,
          "copy_rate": synthetic.copy_rate(np.asarray(tokens)).rate,
          **{name: value.tolist() for name, value in errors._asdict().items()}}


def check_model(model: trained_model.Model) -> None:
  setup = model.setup
  if not setup.kernel.is_masked:
    raise ValueError(f"{model.workdir}: mirror errors by step need a masked kernel.")
  if synthetic.source_for_data_config(setup.config.data) is None:
    raise ValueError(f"{model.workdir}: not trained on the synthetic mirror source "
                     "(configs/synthetic.py).")
  if setup.is_block:
    raise ValueError(f"{model.workdir}: block models are not supported here.")


def print_table(row: dict) -> None:
  print(f"{row['workdir']} ({row['kind']}, {row['steps']} steps): copy rate "
        f"{row['copy_rate']:.3f}")
  print("  step | pairs drawn together | of them wrong | pairs copied from a visible partner | "
        "of them wrong")
  for i in range(row["steps"]):
    together, after = row["together"][i], row["after"][i]
    print(f"  {i:4d} | {together:20d} | {_fraction(row['together_wrong'][i], together):>13} | "
          f"{after:35d} | {_fraction(row['after_wrong'][i], after):>13}")


def _fraction(part: int, whole: int) -> str:
  return f"{part / whole:.4f}" if whole else "–"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdirs", required=True, help="Comma-separated teacher/student workdirs.")
  parser.add_argument("--steps", default="",
                      help="Comma-separated teacher sampling steps (default its sample.steps; "
                      "students use their k).")
  parser.add_argument("--num_samples", type=int, default=2048)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--output", default=None, help="JSON file for the rows.")
  args = parser.parse_args()
  try:
    if args.output:
      outputs.check_writable_file(args.output)
    steps = args.steps.split(",") if args.steps else []
    if steps:
      compare.parse_steps(steps)  # ValueError unless all are positive integers
    steps = [int(k) for k in steps]  # in the given order (parse_steps sorts)
    if args.num_samples <= 0:
      raise ValueError(f"--num_samples must be positive, got {args.num_samples}.")
    models = [trained_model.load(w) for w in args.workdirs.split(",")]
    for model in models:
      check_model(model)
  except (ValueError, OSError) as e:
    sys.exit(f"error: {e}")
  rows = []
  for model in models:
    for k in [model.student_steps] if model.student_steps else steps or [model.default_steps]:
      rows.append(mirror_rows(model, k, args.num_samples, args.seed))
      print_table(rows[-1])
  if args.output:
    with open(args.output, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
