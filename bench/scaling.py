r"""CPU scaling of the sharded path: teacher-step and D-MMD-update tokens/s on 1, 2, 8 devices.

    python bench/scaling.py [--config=configs/npy_tokens.py] [--presets=tiny,small] \
        [--devices=1,2,8] [--mesh=data] [--steps=10]

Each (preset, device count N) runs in its own process with
XLA_FLAGS=--xla_force_host_platform_device_count=N and the mesh axis --mesh (data or fsdp) set to
N, at the preset's batch size and sequence length; the data are synthetic tokens written to a
temporary .npy (vocabulary --vocab, --length tokens) and read by the library's own loader. The
emulated devices share the machine's cores, so more devices cannot be faster here: the table shows
what the sharded path costs (partitioning, collectives, more and smaller kernels), not a speed-up.
Compilation is excluded; the load average of the machine is printed with the table, since other
jobs on a shared machine change every number.

The distillation step is one D-MMD update (student and auxiliary updates alternate, so its time
is the mean of the two).
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]


def child(args) -> dict:
  """Time the library's steps on the devices this process has (run with XLA_FLAGS set)."""
  from dmmd_jax import cli

  cli.setup_jax()  # compilation cache
  import importlib.util

  import jax

  from dmmd_jax.infra import sharding
  from dmmd_jax.training import dmmd_run, teacher_run
  from dmmd_jax.training import setup as setup_lib
  from dmmd_jax.training import state as state_lib

  spec = importlib.util.spec_from_file_location("scaling_config", REPO / args.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(args.preset)
  config.unlock()
  if config.data.source == "npy":
    config.data.path, config.data.vocab_size = args.data, args.vocab
  for axis in ("data", "fsdp", "tensor"):
    config.mesh[axis] = jax.device_count() if axis == args.mesh else 1
  config.lock()
  batch_size = config.train.batch_size
  setup = setup_lib.build_setup(config, batch_size)
  tokens = batch_size * setup.seq_len
  batch = sharding.global_batch(setup.train_tokens[:batch_size], setup.mesh)
  result = {"preset": args.preset, "devices": jax.device_count(), "mesh": dict(setup.mesh.shape),
            "batch": batch_size, "length": setup.seq_len, "layers": config.model.num_layers,
            "width": config.model.width}

  optimizer = teacher_run.teacher_optimizer(config)
  state, shardings = teacher_run.init_teacher_state(setup, optimizer)
  step = teacher_run.compile_teacher_step(setup, optimizer, shardings)
  seconds, state = timed(lambda s: step(s, batch), state, args.steps)
  result["teacher_ms"], result["teacher_tokens_per_s"] = 1e3 * seconds, tokens / seconds
  teacher = state.ema_params
  cfg = setup_lib.estimator_config_of(config)
  student_opt, aux_opt = dmmd_run.distill_optimizers(config)
  dstate = dmmd_run.init_distill_state(teacher, student_opt, aux_opt, setup.mesh,
                                      jax.random.key(1), config.distill.noise_init_scale)
  updates = dmmd_run.compile_updates(
      setup, cfg, student_opt, aux_opt, state_lib.shardings_of(dstate),
      state_lib.shardings_of(teacher))
  per_update = []
  for update in (updates.student, updates.aux):
    seconds, dstate = timed(lambda s, u=update: u(s, teacher, batch), dstate, args.steps)
    per_update.append(seconds)
  seconds = float(np.mean(per_update))
  result["distill_ms"], result["distill_tokens_per_s"] = 1e3 * seconds, tokens / seconds
  return result


def timed(fn, state, steps: int, warmup: int = 2):
  """Seconds per call of state → fn(state)[0] after warm-up (the first call compiles)."""
  import jax

  for _ in range(warmup):
    state = fn(state)[0]
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in range(steps):
    state = fn(state)[0]
  jax.block_until_ready(state)
  return (time.perf_counter() - start) / steps, state


def run_child(args, preset: str, devices: int, data: str) -> dict:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
                 [str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
  cmd = [sys.executable, __file__, "--child", f"--preset={preset}", f"--data={data}",
         f"--config={args.config}", f"--vocab={args.vocab}", f"--mesh={args.mesh}",
         f"--steps={args.steps}"]
  proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
  lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
  if proc.returncode or not lines:
    tail = "\n".join(proc.stderr.strip().splitlines()[-10:])
    return {"preset": preset, "devices": devices, "error": f"exit {proc.returncode}: {tail}"}
  return json.loads(lines[-1].removeprefix("RESULT "))


def table(rows) -> str:
  header = ("| preset | devices | mesh (data, fsdp, tensor) | batch × length | teacher ms | "
            "teacher tokens/s | vs 1 device | distill ms | distill tokens/s | vs 1 device |")
  lines = [header, "|" + " --- |" * (header.count("|") - 1)]
  base = {}
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['preset']} | {r['devices']} | error: {r['error'][:120]} |")
      continue
    one = base.setdefault(r["preset"], r)
    mesh = ", ".join(str(r["mesh"][a]) for a in ("data", "fsdp", "tensor"))
    lines.append(
        f"| {r['preset']} | {r['devices']} | {mesh} | {r['batch']} × {r['length']} | "
        f"{r['teacher_ms']:.1f} | {r['teacher_tokens_per_s']:,.0f} | "
        f"{r['teacher_tokens_per_s'] / one['teacher_tokens_per_s']:.2f} | "
        f"{r['distill_ms']:.1f} | {r['distill_tokens_per_s']:,.0f} | "
        f"{r['distill_tokens_per_s'] / one['distill_tokens_per_s']:.2f} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/npy_tokens.py")
  parser.add_argument("--presets", default="tiny,small")
  parser.add_argument("--devices", default="1,2,8")
  parser.add_argument("--mesh", default="data", choices=("data", "fsdp"))
  parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
  parser.add_argument("--vocab", type=int, default=256)
  parser.add_argument("--length", type=int, default=128)
  parser.add_argument("--json", default="", help="also write the rows to this file")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--preset", default="tiny", help=argparse.SUPPRESS)
  parser.add_argument("--data", default="", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    print("RESULT " + json.dumps(child(args)), flush=True)
    return
  load_before = os.getloadavg()
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    data = os.path.join(tmp, "tokens.npy")
    rng = np.random.default_rng(0)
    np.save(data, rng.integers(0, args.vocab, (2048, args.length), dtype=np.int32))
    for preset in args.presets.split(","):
      for devices in map(int, args.devices.split(",")):
        start = time.monotonic()
        rows.append(run_child(args, preset, devices, data))
        print(f"[scaling] {preset} on {devices} devices: {time.monotonic() - start:.0f} s",
              file=sys.stderr, flush=True)
  load_after = os.getloadavg()
  print(table(rows))
  print(f"\nCPU: {os.cpu_count()} cores; load average (1, 5, 15 min) before "
        f"{', '.join(f'{x:.1f}' for x in load_before)}, after "
        f"{', '.join(f'{x:.1f}' for x in load_after)}; mesh axis: {args.mesh}; "
        f"{args.steps} timed steps after 2 warm-up; {args.config}.")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(
        {"rows": rows, "load_before": load_before, "load_after": load_after}, indent=2))


if __name__ == "__main__":
  main()
