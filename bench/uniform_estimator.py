"""Which uniform-kernel student estimator trains better: Rao-Blackwell or soft (issue 11).

Runs `distill/toy.py` (copy data, K tokens, L = 2, exact teacher, tabular student and auxiliary)
with the same seeds for both values of distill.uniform_estimator and prints, per number of updates,
the exact moment mismatch and copy rate of the 1-step student (mean over seeds, and the paired
difference rb − soft with its standard error). Seconds on a CPU.

    python bench/uniform_estimator.py --seeds 8 --updates 300,1000,3000
"""

import argparse
import math

import jax.numpy as jnp
import numpy as np

from dmmd_jax.diffusion import forward_process
from dmmd_jax.distill import dmmd, toy

ESTIMATORS = ("rao_blackwell", "soft")


def run(problem, estimator, seed, updates, args):
  cfg = dmmd.EstimatorConfig(student_steps=1, uniform_estimator=estimator)
  student, aux, key = toy.initial_state(problem, seed, 1.0)
  student, _ = toy.train(problem, cfg, student, aux, key, num_updates=updates,
                              batch_size=args.batch_size, learning_rate=args.lr,
                              aux_learning_rate=args.aux_lr)
  grid = (jnp.arange(8) + 0.5) / 8
  return (float(toy.exact_mismatch(problem, student, grid)),
          float(toy.copy_rate(problem, student)))


def mean_se(values):
  values = np.asarray(values)
  return values.mean(), values.std(ddof=1) / math.sqrt(len(values))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, default=8)
  parser.add_argument("--updates", default="300,1000,3000")
  parser.add_argument("--vocab", type=int, default=3)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--lr", type=float, default=3e-2)
  parser.add_argument("--aux_lr", type=float, default=1e-1)
  args = parser.parse_args()
  problem = toy.ToyProblem(forward_process.ForwardProcess("uniform", args.vocab))
  print(f"uniform copy task K={args.vocab} L=2, {args.seeds} seeds, batch {args.batch_size}, "
        f"lr {args.lr}, aux lr {args.aux_lr}")
  print("updates | mismatch rb | mismatch soft | rb − soft (SE) | copy rb | copy soft | "
        "rb − soft (SE)")
  for updates in (int(u) for u in args.updates.split(",")):
    out = {e: np.array([run(problem, e, seed, updates, args) for seed in range(args.seeds)])
           for e in ESTIMATORS}
    cells = [str(updates)]
    for col in range(2):
      rb, soft = out["rao_blackwell"][:, col], out["soft"][:, col]
      diff, se = mean_se(rb - soft)
      cells += [f"{rb.mean():.4f}", f"{soft.mean():.4f}", f"{diff:+.4f} ({se:.4f})"]
    print(" | ".join(cells), flush=True)


if __name__ == "__main__":
  main()
