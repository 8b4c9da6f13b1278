"""Multi-host: two processes on loopback (jax.distributed, gloo CPU collectives, 2 devices each).

- A teacher run and a distillation run on 2 processes × 2 CPU devices, each interrupted after its
  checkpoint at step 2 and resumed in the same processes, equal an uninterrupted single-process
  run on 4 devices (same mesh, same global batch): per-step losses and final parameters.
- A process killed mid-run makes the other exit non-zero with a clear error (ours after a failed
  collective, or JAX's "another task died" after missed heartbeats) instead of hanging.
- An unreachable coordinator, a taken port and bad settings give one-line errors.

This file is also the worker:
`python tests/infra/test_multihost.py ROOT STOP_AT teacher[,student] MESH` runs the teacher (and
the distillation) under the multi-host settings in the environment (see
dmmd_jax/infra/distributed.py); MESH is "data,fsdp,tensor".
"""

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from dmmd_jax.infra import checkpoints, distributed

REPO = pathlib.Path(__file__).resolve().parents[2]
HEARTBEAT = 10  # seconds; the kill test waits for about this long
RELIABLE_HEARTBEAT = 120  # seconds; runs where no process is killed
PAIR_TIMEOUT = 1500  # seconds per group of processes (measured 6.5 min at load 13 on 2 cores)
# A one-layer model on sklearn digits (64 pixel tokens). Mesh (data, fsdp, tensor) = (1, 4, 1):
# parameters, optimizer states, the frozen teacher and the checkpoints are split across both
# processes, and each process loads its own half of every batch.
MESH = "1,4,1"
OVERRIDES = {
    "model.num_layers": 1, "model.width": 32, "model.num_heads": 2, "model.cond_dim": 16,
    "model.noise_dim": 6, "train.batch_size": 8,
    "train.num_steps": 4, "train.log_every": 1, "train.checkpoint_every": 2,
    "train.eval_batches": 1, "distill.batch_size": 8, "distill.num_steps": 4,
    "distill.log_every": 1, "distill.checkpoint_every": 2, "distill.student_steps": 4,
}


class Interrupted(Exception):
  """Raised by the worker right after the checkpoint it should stop at (a simulated preemption)."""


def run_worker(root: str, stop_at: int, phases: str, mesh: str) -> None:
  """Teacher (then distillation) in `root`; with stop_at > 0 each stops after that checkpoint and
  is resumed by calling it again (same processes, new checkpoint manager, restore from disk)."""
  from dmmd_jax import cli  # jax.distributed must start before other JAX use

  cli.setup_jax()
  import jax

  from configs import digits
  from dmmd_jax.training import dmmd_run, teacher_run

  config = digits.get_config("tiny")
  config.unlock()
  data, fsdp, tensor = map(int, mesh.split(","))
  overrides = {**OVERRIDES, "distill.teacher_workdir": f"{root}/teacher", "mesh.data": data,
               "mesh.fsdp": fsdp, "mesh.tensor": tensor}
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  config.lock()
  save = checkpoints.save_checkpoint

  def save_then_stop(manager, step, state, data_state):
    save(manager, step, state, data_state)
    if step == stop_at:
      manager.wait_until_finished()
      manager.close()
      raise Interrupted

  checkpoints.save_checkpoint = save_then_stop
  runs = {"teacher": teacher_run.train_teacher, "student": dmmd_run.distill_student}
  for fn, workdir in [(runs[p], f"{root}/{p}") for p in phases.split(",")]:
    try:
      fn(config, workdir)
      assert not stop_at, "the run was not interrupted"
    except Interrupted:
      print(f"process {jax.process_index()}: interrupted at step {stop_at}, resuming", flush=True)
      fn(config, workdir)
  print(f"process {jax.process_index()}/{jax.process_count()} done", flush=True)


# ----------------------------------------------------------------------------------------------
# Helpers.


def free_port() -> int:
  try:
    import portpicker

    return portpicker.pick_unused_port()
  except ImportError:
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      return s.getsockname()[1]


def worker_env(devices: int, **settings) -> dict:
  settings_vars = ("DMMD_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS", "DMMD_NUM_PROCESSES",
                   "DMMD_PROCESS_ID", "DMMD_LOCAL_DEVICE_COUNT", "DMMD_DISTRIBUTED_TIMEOUT",
                   "DMMD_HEARTBEAT_TIMEOUT", "DMMD_JAX_DISTRIBUTED")
  env = {k: v for k, v in os.environ.items() if k not in settings_vars}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", PYTHONUNBUFFERED="1",
             PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}", JAX_PLATFORMS="cpu")
  env.update({k: str(v) for k, v in settings.items()})
  return env


def spawn(args, env, log_path) -> subprocess.Popen:
  with open(log_path, "w") as log:  # the child keeps its own copy of the file descriptor
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def finish(procs, timeout: float) -> list:
  """Wait for all; kill what is left after timeout (so a hang fails the test, not the suite)."""
  deadline = time.monotonic() + timeout
  codes = []
  for p in procs:
    try:
      codes.append(p.wait(max(1.0, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
      os.killpg(p.pid, signal.SIGKILL)
      codes.append(p.wait())
  return codes


def tail(path, n=25) -> str:
  lines = [x for x in pathlib.Path(path).read_text(errors="replace").splitlines()
           if not x.lstrip().startswith("@ ")]  # drop C++ stack frames
  return "\n".join(lines[-n:])


def two_processes(args, tmp_path, name, use_flags=False, heartbeat=HEARTBEAT):
  """Launch processes 0 and 1 of a 2-process run with 2 CPU devices each.

  The settings go in through the environment, or with use_flags through the absl flags of an
  experiments/ binary (devices then through --local_device_count instead of XLA_FLAGS).
  Returns (procs, log paths).
  """
  port = free_port()
  procs, logs = [], []
  for pid in range(2):
    log = tmp_path / f"{name}_{pid}.log"
    settings = dict(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                    heartbeat_timeout=heartbeat, distributed_timeout=120)
    if use_flags:
      env = worker_env(1)
      extra = [f"--{k}={v}" for k, v in settings.items()] + ["--local_device_count=2"]
    else:
      env = worker_env(2, **{f"DMMD_{k.upper()}": v for k, v in settings.items()})
      extra = []
    procs.append(spawn([*args, *extra], env, log))
    logs.append(log)
  return procs, logs


def metrics(workdir) -> dict:
  """{step: row} of metrics.jsonl (rows still being written are skipped)."""
  path, rows = workdir / "metrics.jsonl", {}
  for line in (path.read_text().splitlines() if path.exists() else []):
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue
    rows.setdefault(row["step"], {}).update(row)  # the final eval is a second row of its step
  return rows


def flat(tree) -> dict:
  import jax

  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in
          jax.tree_util.tree_leaves_with_path(tree)}


# ----------------------------------------------------------------------------------------------
# (a) Two processes equal one: teacher and distillation steps, checkpoint save and resume.


def run_pair_and_reference(tmp_path, phases: str):
  """Interrupted-and-resumed 2-process run and uninterrupted 1-process 4-device reference."""
  multi, single = tmp_path / "multi", tmp_path / "single"
  # Under load (CI runs two test workers on 2 cores) nothing here may depend on timing: nobody is
  # killed, so a heartbeat delayed by a starved process must not end the run (RELIABLE_HEARTBEAT);
  # the reference starts only after the pair (two JAX processes at a time, not three); the time
  # limit is generous.
  procs, logs = two_processes([__file__, multi, 2, phases, MESH], tmp_path, "worker",
                              heartbeat=RELIABLE_HEARTBEAT)
  codes = finish(procs, timeout=PAIR_TIMEOUT)
  ref_log = tmp_path / "reference.log"
  codes += finish([spawn([__file__, single, 0, phases, MESH], worker_env(4), ref_log)],
                  timeout=PAIR_TIMEOUT)
  for code, log in zip(codes, [*logs, ref_log], strict=True):
    assert code == 0, f"{log.name} exited {code}:\n{tail(log)}"
  for log in logs:
    assert log.read_text().count("interrupted at step 2, resuming") == len(phases.split(","))
  return multi, single


def assert_same_run(multi, single, run, loss_keys, param_names):
  """Same logged losses at every step and same final parameters (float tolerance)."""

  got, want = metrics(multi / run), metrics(single / run)
  assert sorted(got) == sorted(want) and {1, 2, 3, 4} <= set(got), (sorted(got), sorted(want))
  for step, row in want.items():
    for key in [k for k in (*loss_keys, "final_eval_bpt") if k in row]:
      np.testing.assert_allclose(got[step][key], row[key], rtol=2e-4, atol=1e-6,
                                 err_msg=f"{run} step {step} {key}")
  for name in param_names:
    got = flat(checkpoints.load_params(str(multi / run), name))
    want = flat(checkpoints.load_params(str(single / run), name))
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=2e-5,
                                 err_msg=f"{run} {name}{key}")


def test_two_processes_teacher_steps_match_one_process(tmp_path):
  multi, single = run_pair_and_reference(tmp_path, "teacher")
  assert_same_run(multi, single, "teacher", ("loss_bpt", "grad_norm"), ("params", "ema_params"))
  first, last = metrics(multi / "teacher")[1], metrics(multi / "teacher")[4]
  assert last["loss_bpt"] < first["loss_bpt"]  # it trained


@pytest.mark.slow
def test_two_processes_distillation_matches_one_process(tmp_path):

  multi, single = run_pair_and_reference(tmp_path, "teacher,student")
  assert_same_run(multi, single, "teacher", ("loss_bpt",), ("ema_params",))
  assert_same_run(multi, single, "student", ("aux_loss", "gen_loss", "student_entropy"),
                  ("student", "student_ema", "aux"))
  # The student really moved away from the teacher it was copied from.
  teacher = flat(checkpoints.load_params(str(multi / "teacher"), "ema_params"))
  student = flat(checkpoints.load_params(str(multi / "student"), "student"))
  assert any(not np.allclose(student[k], teacher[k]) for k in teacher if "noise_proj" not in k)


# ----------------------------------------------------------------------------------------------
# (b) A killed process stops the other one.


def test_killed_process_stops_the_other_with_an_error(tmp_path):
  workdir = tmp_path / "run"
  args = [REPO / "experiments" / "train_teacher.py", "--config=configs/digits.py:tiny",
          f"--workdir={workdir}", "--config.train.num_steps=100000",
          "--config.train.log_every=1", "--config.train.checkpoint_every=100000",
          "--config.train.eval_every=0", "--config.model.num_layers=1",
          "--config.model.width=32", "--config.model.cond_dim=16", "--config.mesh.data=2",
          "--config.mesh.fsdp=2"]  # needs all 4 devices: --local_device_count=2 works
  procs, logs = two_processes(args, tmp_path, "kill", use_flags=True)
  try:
    deadline = time.monotonic() + 600
    while len(metrics(workdir)) < 2:
      assert all(p.poll() is None for p in procs), "\n\n".join(map(tail, logs))
      assert time.monotonic() < deadline, "no training steps within 600 s"
      time.sleep(0.5)
    os.killpg(procs[1].pid, signal.SIGKILL)
    killed = time.monotonic()
    code = finish(procs[:1], timeout=HEARTBEAT + 110)[0]
    waited = time.monotonic() - killed
  finally:
    finish(procs, timeout=1)
  log = logs[0].read_text(errors="replace")
  print(f"survivor exited {code} {waited:.1f} s after the kill")  # shown with pytest -s
  assert code != 0, tail(logs[0])
  assert waited < HEARTBEAT + 100, f"survivor took {waited:.0f} s to stop"
  assert re.search(r"error: process 0 of 2 stopped: .* another process died|another task died",
                   log), tail(logs[0])


# ----------------------------------------------------------------------------------------------
# (c) Start-up errors: one line naming the value to change.


def test_unreachable_coordinator_is_one_line_error_from_the_cli(tmp_path):
  port = free_port()  # nothing listens there
  args = [REPO / "experiments" / "train_teacher.py", "--config=configs/digits.py:tiny",
          f"--workdir={tmp_path / 'run'}", f"--coordinator_address=127.0.0.1:{port}",
          "--num_processes=2", "--process_id=1", "--distributed_timeout=3"]
  start = time.monotonic()
  result = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=worker_env(1),
                          capture_output=True, text=True, timeout=300)
  elapsed = time.monotonic() - start
  errors = [x for x in result.stderr.splitlines() if x.strip()]
  assert result.returncode == 1, result.stderr[-3000:]
  assert errors and errors[-1].startswith("error: coordinator 127.0.0.1:"), result.stderr[-3000:]
  assert "--coordinator_address" in errors[-1] and "Traceback" not in result.stderr
  assert not (tmp_path / "run").exists()  # failed before anything was written
  assert elapsed < 120


def test_unreachable_coordinator_times_out(monkeypatch):
  monkeypatch.setenv("DMMD_COORDINATOR_ADDRESS", f"127.0.0.1:{free_port()}")
  monkeypatch.setenv("DMMD_NUM_PROCESSES", "2")
  monkeypatch.setenv("DMMD_PROCESS_ID", "1")
  monkeypatch.setenv("DMMD_DISTRIBUTED_TIMEOUT", "2")
  options = distributed.options_from_flags_and_env()
  start = time.monotonic()
  with pytest.raises(distributed.DistributedError, match=r"not reachable after 2 s") as e:
    distributed.initialize(options)
  assert 1.5 < time.monotonic() - start < 10
  assert "$DMMD_COORDINATOR_ADDRESS" in str(e.value) and "\n" not in str(e.value)


def test_unresolvable_coordinator_host():
  options = distributed.Options(coordinator_address="no-such-host.invalid:1234",
                                num_processes=2, process_id=1, timeout=5)
  with pytest.raises(distributed.DistributedError, match="cannot be resolved"):
    distributed.initialize(options)


def test_coordinator_port_in_use():
  with socket.socket() as busy:
    busy.bind(("0.0.0.0", 0))
    busy.listen()
    port = busy.getsockname()[1]
    options = distributed.Options(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                                  process_id=0, timeout=5)
    with pytest.raises(distributed.DistributedError, match=f"port {port} .* already in use"):
      distributed.initialize(options)


@pytest.mark.parametrize("env, message", [
    ({"DMMD_COORDINATOR_ADDRESS": "10.0.0.1"}, r"must be host:port"),
    ({"DMMD_COORDINATOR_ADDRESS": "10.0.0.1:99999"}, r"must be host:port"),
    ({"DMMD_COORDINATOR_ADDRESS": "10.0.0.1:1234", "DMMD_PROCESS_ID": "0"},
     r"needs --num_processes \(or \$DMMD_NUM_PROCESSES\)"),
    ({"DMMD_COORDINATOR_ADDRESS": "h:1", "DMMD_NUM_PROCESSES": "2", "DMMD_PROCESS_ID": "2"},
     r"\$DMMD_PROCESS_ID=2 must lie in \[0, 2\)"),
    ({"DMMD_COORDINATOR_ADDRESS": "h:1", "DMMD_NUM_PROCESSES": "two", "DMMD_PROCESS_ID": "0"},
     r"\$DMMD_NUM_PROCESSES='two' is not an integer"),
    ({"DMMD_NUM_PROCESSES": "2", "DMMD_PROCESS_ID": "0"}, r"no coordinator address"),
    ({"DMMD_HEARTBEAT_TIMEOUT": "0"}, r"\$DMMD_HEARTBEAT_TIMEOUT must be positive"),
])
def test_bad_settings_name_the_value_to_change(env, message):
  with pytest.raises(distributed.DistributedError, match=message):
    distributed.options_from_flags_and_env(environ=env)


def test_settings_from_environment():
  assert not distributed.options_from_flags_and_env(environ={}).multi_process
  options = distributed.options_from_flags_and_env(environ={
      "JAX_COORDINATOR_ADDRESS": "[::1]:5000", "DMMD_NUM_PROCESSES": "4",
      "DMMD_PROCESS_ID": "3", "DMMD_LOCAL_DEVICE_COUNT": "2", "DMMD_HEARTBEAT_TIMEOUT": "30"})
  assert options.multi_process and not options.auto_detect
  assert (options.num_processes, options.process_id, options.local_device_count) == (4, 3, 2)
  assert options.heartbeat_timeout == 30 and options.timeout == distributed.DEFAULT_TIMEOUT
  assert distributed.split_address(options.coordinator_address) == ("::1", 5000)
  assert options.name("coordinator_address") == "$JAX_COORDINATOR_ADDRESS"
  auto = distributed.options_from_flags_and_env(environ={"DMMD_JAX_DISTRIBUTED": "1"})
  assert auto.multi_process and auto.auto_detect
  # A DMMD_ variable wins over JAX's own.
  both = distributed.options_from_flags_and_env(environ={
      "DMMD_COORDINATOR_ADDRESS": "a:1", "JAX_COORDINATOR_ADDRESS": "b:2",
      "DMMD_NUM_PROCESSES": "1", "DMMD_PROCESS_ID": "0"})
  assert both.coordinator_address == "a:1"


if __name__ == "__main__":
  sys.path.insert(0, str(REPO))
  run_worker(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
