"""Times the gradient-moment metric: 1,024 model vs 1,024 data samples of 128 tokens.

Run: `python bench/gradient_moment.py` (optionally `--num_samples`, `--seq_len`, `--micro_batch`,
`--num_pairs`, `--width`, `--num_layers`, `--vocab_size`). Prints the wall-clock and CPU (all
threads) time of the first call (with compilation) and of a second call (compiled).
Target: ≤ 2 min on 2 CPU cores.
"""

import argparse
import functools
import time

import jax
import numpy as np

from dmmd_jax.evaluation import metrics as metrics_lib
from dmmd_jax.models import reference_lm


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--num_samples", type=int, default=1024)
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--vocab_size", type=int, default=512)
  parser.add_argument("--num_layers", type=int, default=2)
  parser.add_argument("--width", type=int, default=128)
  parser.add_argument("--num_heads", type=int, default=4)
  parser.add_argument("--micro_batch", type=int, default=64)
  parser.add_argument("--num_pairs", type=int, default=16)
  args = parser.parse_args()

  config = reference_lm.ReferenceLMConfig(args.vocab_size, args.seq_len, num_layers=args.num_layers,
                                width=args.width, num_heads=args.num_heads)
  params = reference_lm.init_params(jax.random.PRNGKey(0), config)
  num_params = sum(x.size for x in jax.tree.leaves(params))
  rng = np.random.default_rng(0)
  model = rng.integers(0, args.vocab_size, (args.num_samples, args.seq_len), dtype=np.int32)
  data = rng.integers(0, args.vocab_size, (args.num_samples, args.seq_len), dtype=np.int32)
  loglik = functools.partial(reference_lm.sequence_log_likelihood, config=config)
  print(f"{jax.devices()[0].platform}: {num_params:,} parameters, {args.num_samples} model + "
        f"{args.num_samples} data sequences of {args.seq_len} tokens, "
        f"micro_batch={args.micro_batch}, num_pairs={args.num_pairs}")
  for label in ("first call (with compilation)", "second call"):
    start, start_cpu = time.perf_counter(), time.process_time()
    result = metrics_lib.gradient_moment(loglik, params, model, data, jax.random.PRNGKey(1),
                                     args.num_pairs, args.micro_batch)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    print(f"{label}: {elapsed:.1f} s wall, {cpu:.1f} s CPU   "
          f"GM = {result.mean:.3e} ± {result.stderr:.1e}")


if __name__ == "__main__":
  main()
