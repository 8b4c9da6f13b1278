r"""Streaming pre-tokenized data: prepare throughput, start-up time, peak RSS, loader tokens/s.

    python bench/data_stream.py --work_dir=/tmp/dmmd_data_bench [--size_gb=2] [--bpe_mb=256]

1. Generates a `--size_gb` text corpus under --work_dir (Shakespeare's lines, shuffled afresh for
   each repetition) and a 1 MB corpus cut from it.
2. `experiments/prepare_data.py` on both with the character tokenizer, and on the first
   `--bpe_mb` MB (0: all) with GPT-2 BPE: MB/s and tokens/s (wall clock, all stages), and per
   CPU-second of all its processes (on a shared machine, what one free core would do).
3. Start-up time (process start → step 1 logged in metrics.jsonl) and peak RSS of a short
   teacher run (`configs/shakespeare_char.py:tiny` on data.source=tokens, `--seq_len` tokens) on
   the 1 MB and the big corpus, in fresh processes sharing one compilation cache.
4. Loader throughput: `data.batch_iterator` over `TokenWindows` of the big corpus, shuffled,
   batch `--batch` × `--seq_len`, one host.

Deletes --work_dir at the end unless --keep. Prints a Markdown table.
"""

import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

from dmmd_jax.data import loader, splits, text, token_shards

_WORK = flags.DEFINE_string("work_dir", "/tmp/dmmd_data_bench", "Scratch directory (deleted).")
_SIZE = flags.DEFINE_float("size_gb", 2.0, "Size of the generated corpus in GB (1e9 bytes).")
_BPE_MB = flags.DEFINE_float("bpe_mb", 256.0, "MB of the corpus prepared with GPT-2 BPE (0: all).")
_SEQ = flags.DEFINE_integer("seq_len", 1024, "Window length of the training run and the loader.")
_BATCH = flags.DEFINE_integer("batch", 256, "Loader batch size.")
_BATCHES = flags.DEFINE_integer("batches", 200, "Timed loader batches.")
_STEPS = flags.DEFINE_integer("steps", 5, "Steps of each training run.")
_KEEP = flags.DEFINE_bool("keep", False, "Keep --work_dir.")
_PREPARE_ONLY = flags.DEFINE_bool("prepare_only", False, "Stop after the prepare measurements.")

REPO = pathlib.Path(__file__).resolve().parents[1]

# Runs in a fresh process: prints JSON {load_s, peak_rss_mb} after a short teacher run.
_TRAIN_CHILD = r"""
import json, resource, sys, time
from dmmd_jax import cli
from dmmd_jax.data import sources
from dmmd_jax.training import teacher_run
import ml_collections, importlib.util
spec = importlib.util.spec_from_file_location("c", "configs/shakespeare_char.py")
module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
config = module.get_config("tiny")
path, workdir, seq_len, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
config.data.source, config.data.path, config.data.seq_len = "tokens", path, seq_len
config.train.batch_size, config.train.num_steps, config.train.log_every = 8, steps, 1
config.train.eval_every, config.train.sample_every, config.train.eval_batches = 0, 0, 1
config.train.checkpoint_every = steps
cli.setup_jax()
start = time.perf_counter()
sources.load_dataset(config.data)
load_s = time.perf_counter() - start
teacher_run.train_teacher(config, workdir)
print(json.dumps({"load_s": load_s,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def generate(path: pathlib.Path, size: int, seed: int = 0) -> None:
  """Shakespeare's lines, shuffled afresh for each repetition, until `size` bytes."""
  lines = text.shakespeare_text(splits.cache_dir()).split("\n")
  rng = np.random.default_rng(seed)
  written = 0
  with open(path, "w", encoding="utf-8") as f:
    while written < size:
      block = "\n".join(lines[i] for i in rng.permutation(len(lines))) + "\n"
      block = block[: size - written]
      f.write(block)
      written += len(block)


def _child_cpu_s() -> float:
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def prepare(source: pathlib.Path, out: pathlib.Path, tokenizer: str) -> dict:
  """Wall-clock rates, and MB per CPU-second of all its processes (what one free core does)."""
  start, cpu = time.perf_counter(), _child_cpu_s()
  subprocess.run([sys.executable, "experiments/prepare_data.py", f"--input={source}",
                  f"--output_dir={out}", f"--tokenizer={tokenizer}"], check=True, cwd=REPO,
                 stderr=subprocess.DEVNULL)
  seconds, cpu = time.perf_counter() - start, _child_cpu_s() - cpu
  index = json.loads((out / "index.json").read_text())
  tokens = sum(index["num_tokens"].values())
  size = source.stat().st_size
  return {"MB": size / 1e6, "s": seconds, "MB/s": size / 1e6 / seconds,
          "tokens": tokens, "tokens/s": tokens / seconds, "cpu_s": cpu,
          "MB/cpu_s": size / 1e6 / cpu, "tokens/cpu_s": tokens / cpu}


def train_run(prepared: pathlib.Path, workdir: pathlib.Path, env: dict) -> dict:
  """Start-up (process start → step 1 in metrics.jsonl) and peak RSS of a short teacher run."""
  metrics = workdir / "metrics.jsonl"
  start = time.perf_counter()
  proc = subprocess.Popen(
      [sys.executable, "-c", _TRAIN_CHILD, str(prepared), str(workdir), str(_SEQ.value),
       str(_STEPS.value)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
      text=True)
  first_step = None
  while proc.poll() is None:
    if first_step is None and metrics.exists() and metrics.read_text().strip():
      first_step = time.perf_counter() - start
    time.sleep(0.02)
  out, _ = proc.communicate()
  if proc.returncode:
    raise RuntimeError(f"training run on {prepared} failed")
  return {"first_step_s": first_step, **json.loads(out.strip().splitlines()[-1])}


def loader_throughput(prepared: pathlib.Path) -> float:
  cfg = dict(source="tokens", path=str(prepared), tokenizer="char", seq_len=_SEQ.value)
  train, _, _ = token_shards.load_dataset(cfg)
  it = loader.batch_iterator(train, _BATCH.value, seed=0)
  for _ in range(5):
    next(it)
  start = time.perf_counter()
  for _ in range(_BATCHES.value):
    next(it)
  return _BATCHES.value * _BATCH.value * _SEQ.value / (time.perf_counter() - start)


def main(argv):
  del argv
  work = pathlib.Path(_WORK.value)
  work.mkdir(parents=True, exist_ok=True)
  big, small, bpe = work / "big.txt", work / "small.txt", work / "bpe.txt"
  rows = {}
  try:
    start = time.perf_counter()
    generate(big, int(_SIZE.value * 1e9))
    print(f"generated {big} ({big.stat().st_size / 1e9:.2f} GB) in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    with open(big, "rb") as f:
      small.write_bytes(f.read(1_000_000).rsplit(b"\n", 1)[0] + b"\n")
    rows["prepare char (big)"] = prepare(big, work / "big_char", "char")
    print(rows, flush=True)
    rows["prepare char (1 MB)"] = prepare(small, work / "small_char", "char")
    if _BPE_MB.value:
      with open(big, "rb") as f:
        bpe.write_bytes(f.read(int(_BPE_MB.value * 1e6)).rsplit(b"\n", 1)[0] + b"\n")
    rows["prepare gpt2"] = prepare(bpe if _BPE_MB.value else big, work / "bpe", "gpt2")
    print(rows, flush=True)
    if _PREPARE_ONLY.value:
      return
    env = dict(os.environ, PYTHONPATH=str(REPO),
               DMMD_JAX_COMPILATION_CACHE=str(work / "xla_cache"))
    runs = (("1 MB", "small_char"), ("big", "big_char"), ("1 MB again", "small_char"),
            ("big again", "big_char"))
    for name, prepared in runs:
      rows[f"train ({name})"] = train_run(work / prepared, work / f"run_{len(rows)}", env)
      print(rows[f"train ({name})"], flush=True)
    rows["loader tokens/s"] = loader_throughput(work / "big_char")
  finally:
    if not _KEEP.value:
      shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(rows, indent=1))
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
  app.run(main)
