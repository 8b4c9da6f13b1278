"""Fault injection: workdirs survive kills, damaged files, concurrent runs and user mistakes.

- kill -9 of teacher and distillation binaries at random points (seeded) and during checkpoint
  writes, then the same command again: metrics rows and final parameters equal an uninterrupted
  run's exactly;
- every file of a checkpoint step deleted, truncated, emptied or overwritten with garbage: restore
  gives exactly that step's or the previous step's parameters (with a warning naming the step
  directory), never other values; a truncated metrics log line is dropped with a warning;
- two processes on one workdir: the second gets `error: workdir in use by PID n`;
- user mistakes (wrong kind of workdir, changed run-defining fields, missing or damaged files,
  bad sample.py flags): exit 1, exactly the expected single `error:` line, and the sha256 of every
  file under the workdirs involved unchanged (no file added, removed or modified).

docs/reliability.md lists the promises and the test of each.
"""

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import _helpers
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import dmmd_jax
from dmmd_jax.data import loader
from dmmd_jax.data import types as data_types
from dmmd_jax.infra import checkpoints, provenance, sharding, workdir_guard
from dmmd_jax.infra import workdir as workdir_lib
from dmmd_jax.training import dmmd_run, loop, teacher_run

EXP = _helpers.EXPERIMENTS
TRAIN, DISTILL, SAMPLE = EXP / "train_teacher.py", EXP / "distill.py", EXP / "sample.py"
SDTT, REF_LM, EVALUATE = EXP / "sdtt.py", EXP / "train_reference_lm.py", EXP / "evaluate.py"
CONFIG = "--config=configs/digits.py:tiny"


def tree_hash(*roots) -> dict:
  """{path: sha256} of every file under the roots (a missing root hashes as absent)."""
  out = {}
  for root in map(str, roots):
    if not os.path.exists(root):
      out[root] = "absent"
    for folder, _, files in os.walk(root):
      for name in files:
        path = os.path.join(folder, name)
        with open(path, "rb") as f:
          out[path] = hashlib.sha256(f.read()).hexdigest()
  return out


def stderr_lines(proc) -> list:
  return [line for line in proc.stderr.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A teacher and a D-MMD student on the canonical fast run (_helpers.FAST), trained in process."""
  root = tmp_path_factory.mktemp("fault_runs")
  teacher, student = str(root / "teacher"), str(root / "student")
  teacher_run.train_teacher(_helpers.fast_digits(), teacher)
  dmmd_run.distill_student(_helpers.fast_digits(**{"distill.teacher_workdir": teacher}), student)
  return root


def copy_run(runs, name, tmp_path, new_name=None) -> str:
  target = str(tmp_path / (new_name or name))
  shutil.copytree(runs / name, target)
  return target


# ---------------------------------------------------------------------------------------------
# User mistakes through the binaries: one exact error line, nothing changed.


def _case(case, runs, tmp_path):
  """(argv, expected error line or prefix ending in "…", paths that must not change)."""
  t, s = str(runs / "teacher"), str(runs / "student")
  new = str(tmp_path / "new")
  fast = _helpers.FAST_FLAGS
  if case == "student_into_teacher":
    return ([DISTILL, CONFIG, *fast, f"--config.distill.teacher_workdir={t}", f"--workdir={t}"],
            f"error: --workdir {t} is the teacher's workdir; a student needs its own --workdir "
            "(distilling there would overwrite the teacher).", [t])
  if case == "teacher_into_student":
    return ([TRAIN, CONFIG, *fast, f"--workdir={s}"],
            f"error: {s} holds a 'student' run, this command writes a 'teacher' run; use a new "
            f"--workdir (nothing was changed in {s}).", [s])
  if case == "sdtt_into_student":
    return ([SDTT, CONFIG, *fast, f"--config.distill.teacher_workdir={t}", "--start_steps=8",
             f"--workdir={s}"],
            f"error: {s} holds a 'student' run, this command writes a 'sdtt' run; use a new "
            f"--workdir (nothing was changed in {s}).", [s, t])
  if case == "reference_lm_into_teacher":
    return ([REF_LM, "--config=configs/reference_lm.py:tiny", f"--config.data_from={t}",
             f"--workdir={t}"],
            f"error: {t} holds a 'teacher' run, this command writes a 'reference_lm' run; use a "
            f"new --workdir (nothing was changed in {t}).", [t])
  if case == "student_other_k":
    return ([DISTILL, CONFIG, *fast, f"--config.distill.teacher_workdir={t}",
             "--config.distill.student_steps=8", f"--workdir={s}"],
            f"error: {s} holds a 'student' run with distill.student_steps=4, this command has 8; "
            "use a new --workdir, or add --config.resume_override=distill.student_steps to "
            f"continue this run with the new value (nothing was changed in {s}).", [s, t])
  if case == "student_other_teacher":
    other = copy_run(runs, "teacher", tmp_path, "other_teacher")
    info = json.loads(open(os.path.join(other, "run.json")).read())
    info["run_id"] = "another-teacher-run"
    with open(os.path.join(other, "run.json"), "w") as f:
      json.dump(info, f)
    return ([DISTILL, CONFIG, *fast, f"--config.distill.teacher_workdir={other}",
             f"--workdir={s}"],
            f"error: {s} holds a 'student' run with distill.teacher_workdir={t!r}, this command "
            f"has {other!r}; use a new --workdir, or add "
            "--config.resume_override=distill.teacher_workdir to continue this run with the new "
            f"value (nothing was changed in {s}).", [s, t, other])
  if case in ("teacher_other_seed", "teacher_other_batch"):
    field, old, value = (("seed", 0, 3) if case == "teacher_other_seed"
                         else ("train.batch_size", 8, 16))
    return ([TRAIN, CONFIG, *fast, f"--config.{field}={value}", f"--workdir={t}"],
            f"error: {t} holds a 'teacher' run with {field}={old}, this command has {value}; use "
            f"a new --workdir, or add --config.resume_override={field} to continue this run with "
            f"the new value (nothing was changed in {t}).", [t])
  if case == "missing_config_file":
    return ([TRAIN, "--config=configs/nosuch.py:tiny", f"--workdir={new}"],
            "error: cannot load the config file: [Errno 2] No such file or directory: "
            "'configs/nosuch.py'", [new])
  if case == "unknown_config_section":
    return ([TRAIN, CONFIG, "--config.nosuch.x=1", f"--workdir={new}"],
            "error: unknown config key --config.nosuch.x ('nosuch' does not exist); see the "
            "config file for the known keys", [new])
  if case in ("workdir_is_a_file", "workdir_under_a_file"):
    path = tmp_path / "a_file"
    path.write_text("x")
    if case == "workdir_is_a_file":
      return ([TRAIN, CONFIG, f"--workdir={path}"],
              f"error: workdir {path} exists and is not a directory; choose another --workdir.",
              [path])
    return ([TRAIN, CONFIG, f"--workdir={path}/run"],
            f"error: workdir {path}/run cannot be created: {path} is a file.", [path])
  if case in ("zero_byte_npy", "random_bytes_npy"):
    path = tmp_path / "tokens.npy"
    path.write_bytes(b"" if case == "zero_byte_npy" else bytes(range(256)) * 4)
    reason = ("is empty (0 bytes), not a .npy array." if case == "zero_byte_npy" else
              "is not a .npy file (it does not start with the NumPy header).")
    return ([TRAIN, "--config=configs/npy_tokens.py:tiny", f"--config.data.path={path}",
             "--config.data.vocab_size=4", f"--workdir={new}"], f"error: {path} {reason}",
            [path, new])
  if case == "empty_text_file":
    path = tmp_path / "empty.txt"
    path.write_text("")
    return ([TRAIN, "--config=configs/shakespeare_char.py:tiny", "--config.data.source=text_file",
             f"--config.data.path={path}", f"--workdir={new}"],
            f"error: text_file: {path} is empty (no text to train on).", [path, new])
  if case == "damaged_config_json":
    damaged = copy_run(runs, "teacher", tmp_path)
    with open(os.path.join(damaged, "config.json"), "r+") as f:
      f.truncate(100)
    return ([TRAIN, CONFIG, *fast, f"--workdir={damaged}"],
            f"error: {damaged}/config.json is not valid JSON (…", [damaged])
  if case == "no_readable_checkpoint":
    damaged = copy_run(runs, "teacher", tmp_path)
    for step in (4, 8):
      os.remove(biggest_blob(os.path.join(damaged, "checkpoints", str(step))))
    return ([SAMPLE, f"--workdir={damaged}", f"--output={tmp_path / 'out.npy'}"],
            f"error: no readable checkpoint in {damaged}/checkpoints (newest "
            f"{damaged}/checkpoints/8: …", [damaged, tmp_path / "out.npy"])
  if case == "sample_output_under_a_file":
    path = tmp_path / "a_file"
    path.write_text("x")
    return ([SAMPLE, f"--workdir={s}", f"--output={path}/samples.npy"],
            f"error: --output={path}/samples.npy cannot be written: {path} is a file, not a "
            "directory.", [s, path])
  if case in ("sample_steps_0", "sample_batch_size_0"):
    flag = "--steps" if case == "sample_steps_0" else "--batch_size"
    return ([SAMPLE, f"--workdir={s}", f"{flag}=0", f"--output={new}.npy"],
            f"error: {flag} must be at least 1, got 0.", [s, new + ".npy"])
  if case == "sample_too_many":
    return ([SAMPLE, f"--workdir={s}", "--num_samples=100000000000", f"--output={new}.npy"],
            "error: --num_samples=100000000000 needs about 95367.4 GiB for 64-token samples, "
            "more than the …", [s, new + ".npy"])
  if case == "evaluate_output_under_a_file":
    path = tmp_path / "a_file"
    path.write_text("x")
    return ([EVALUATE, f"--workdirs={t}", f"--output_dir={path}/eval", "--metrics=mmd2"],
            f"error: --output_dir={path}/eval cannot be created: {path} is a file.", [t, path])
  raise AssertionError(case)


FAST_CASES = ("teacher_into_student", "missing_config_file")
SLOW_CASES = ("student_into_teacher", "sdtt_into_student", "reference_lm_into_teacher",
              "student_other_k", "student_other_teacher", "teacher_other_seed",
              "teacher_other_batch", "unknown_config_section", "workdir_is_a_file",
              "workdir_under_a_file", "zero_byte_npy", "random_bytes_npy", "empty_text_file",
              "damaged_config_json", "no_readable_checkpoint", "sample_output_under_a_file",
              "sample_steps_0", "sample_batch_size_0", "sample_too_many",
              "evaluate_output_under_a_file")


@pytest.mark.parametrize("case", [*FAST_CASES, *(pytest.param(c, marks=pytest.mark.slow)
                                                 for c in SLOW_CASES)])
def test_user_mistake_is_one_error_line_and_changes_nothing(case, runs, tmp_path):
  args, expected, watched = _case(case, runs, tmp_path)
  before = tree_hash(*watched)
  proc = _helpers.run_python(args, timeout=300)
  assert proc.returncode in (1, 2), (proc.returncode, proc.stderr[-3000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  errors = [line for line in stderr_lines(proc) if not line.startswith("warning: ")]
  assert len(errors) == 1, errors
  if expected.endswith("…"):
    assert errors[0].startswith(expected[:-1]), (errors[0], expected)
  else:
    assert errors[0] == expected
  assert tree_hash(*watched) == before


@pytest.mark.slow
def test_resume_override_continues_with_the_new_value_and_keeps_the_old_config(runs, tmp_path):
  """--config.resume_override=seed lets a teacher resume with another seed; the earlier
  config.json is kept in config_history/ and the new one is in config.json."""
  workdir = copy_run(runs, "teacher", tmp_path)
  old_config = open(os.path.join(workdir, "config.json")).read()
  proc = _helpers.run_python([TRAIN, CONFIG, *_helpers.FAST_FLAGS, "--config.seed=3",
                              "--config.resume_override=seed", f"--workdir={workdir}"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert open(os.path.join(workdir, "config_history", "config_1.json")).read() == old_config
  assert json.loads(open(os.path.join(workdir, "config.json")).read())["seed"] == 3


@pytest.mark.slow
def test_sample_output_without_npy_suffix_prints_the_path_written(runs, tmp_path):
  output = tmp_path / "samples"
  proc = _helpers.run_python([SAMPLE, f"--workdir={runs / 'student'}", "--num_samples=8",
                              "--batch_size=4", f"--output={output}"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1] == f"wrote {output}.npy and {output}.png"
  assert np.load(f"{output}.npy").shape == (8, 64)
  assert sorted(os.listdir(tmp_path)) == ["samples.npy", "samples.png"]


# ---------------------------------------------------------------------------------------------
# Guard logic (in process).


def test_paths_are_compared_normalised_and_moved_data_does_not_block(tmp_path):
  stored = {"seed": 0, "data": {"path": f"{tmp_path}//a/./b.npy", "cache_dir": "/x"}}
  same = {"seed": 0, "data": {"path": f"{tmp_path}/a/b.npy", "cache_dir": "/elsewhere"}}
  moved = {"seed": 0, "data": {"path": f"{tmp_path}/c.npy", "cache_dir": "/x"}}
  assert workdir_guard.field_mismatches("teacher", stored, same, {}, {}) == []
  assert workdir_guard.field_mismatches("teacher", stored, moved, {}, {}) == [
      ("data.path", stored["data"]["path"], moved["data"]["path"])]
  fingerprint = {"data_fingerprint": "f"}
  assert workdir_guard.field_mismatches("teacher", stored, moved, fingerprint, fingerprint) == []
  assert workdir_guard.field_mismatches("teacher", stored, moved, fingerprint,
                                        {"data_fingerprint": "g"})
  assert workdir_lib.architecture_mismatch(stored, same, ignore=("data.cache_dir",)) is None


@pytest.mark.parametrize("key,default,changed", [("vocab_multiple", 1, 128),
                                                  ("absolute_positions", False, True)])
def test_configs_stored_before_a_key_existed_compare_as_its_default(key, default, changed):
  """Runs stored before a model key existed had its default behaviour (no padding, no absolute
  positions): they match the default, not another value."""
  stored = {"seed": 0, "model": {"width": 8}}
  same = {"seed": 0, "model": {"width": 8, key: default}}
  other = {"seed": 0, "model": {"width": 8, key: changed}}
  assert workdir_guard.field_mismatches("teacher", stored, same, {}, {}) == []
  assert workdir_lib.architecture_mismatch(stored, same) is None
  assert workdir_guard.field_mismatches("teacher", stored, other, {}, {}) == [
      (f"model.{key}", default, changed)]
  assert f"model.{key}" in workdir_lib.architecture_mismatch(stored, other)


def test_data_fingerprint_is_content_only():
  a = np.arange(12, dtype=np.int32).reshape(3, 4)
  assert workdir_guard.data_fingerprint(a, a[:1]) == workdir_guard.data_fingerprint(a.copy(),
                                                                                    a[:1].copy())
  assert workdir_guard.data_fingerprint(a, a[:1]) != workdir_guard.data_fingerprint(a, a[:2])
  assert workdir_guard.data_fingerprint(a, a[:1]) != workdir_guard.data_fingerprint(a + 1, a[:1])


def test_config_history_keeps_every_earlier_config(tmp_path):
  for seed in (0, 0, 1, 2):
    workdir_guard.record_config(str(tmp_path), {"seed": seed})
  assert json.loads((tmp_path / "config.json").read_text()) == {"seed": 2}
  history = sorted(os.listdir(tmp_path / "config_history"))
  assert history == ["config_1.json", "config_2.json"]
  assert [json.loads((tmp_path / "config_history" / h).read_text())["seed"] for h in history] == [
      0, 1]


def test_run_json_records_the_code_and_the_full_config(tmp_path, monkeypatch):
  """run.json names the git commit of this checkout and holds the full config; a resume from
  other code keeps the first launch's provenance and appends the new one."""
  info = {"kind": "teacher", "data_info": data_types.DataInfo("text", 8, 64)}
  workdir_guard.record_run_info(str(tmp_path), dict(info, config={"seed": 0}))
  stored = json.loads((tmp_path / "run.json").read_text())
  head = subprocess.run(["git", "-C", os.path.dirname(dmmd_jax.__file__), "rev-parse", "HEAD"],
                        capture_output=True, text=True, check=True).stdout.strip()
  assert stored["provenance"]["git_commit"] == head and "resumed_with" not in stored
  assert stored["config"] == {"seed": 0}
  other = dict(stored["provenance"], git_commit="0" * 40)
  monkeypatch.setattr(provenance, "current", lambda: other)
  workdir_guard.record_run_info(str(tmp_path), dict(info, config={"seed": 0}))
  workdir_guard.record_run_info(str(tmp_path), dict(info, config={"seed": 0}))
  resumed = json.loads((tmp_path / "run.json").read_text())
  assert resumed["provenance"]["git_commit"] == head and resumed["resumed_with"] == [other]
  assert resumed["run_id"] == stored["run_id"]


HOLD = ("import sys, time\nfrom dmmd_jax.infra import workdir_guard\n"
        "workdir_guard.lock(sys.argv[1])\n"
        "print('locked', flush=True)\ntime.sleep(600)\n")


def test_lock_names_the_holder_and_dies_with_it(tmp_path):
  """A second claimant gets `workdir in use by PID n` (n = the holder); after kill -9 of the
  holder the kernel has dropped the lock and the workdir can be taken."""
  holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE,
                            text=True, env=_helpers.cache_env())
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(workdir_lib.WorkdirError) as error:
      workdir_guard.lock(str(tmp_path))
    assert str(error.value).startswith(f"workdir in use by PID {holder.pid} ({tmp_path});")
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  workdir_guard.lock(str(tmp_path))
  assert (tmp_path / workdir_guard.LOCK_FILE).read_text().strip() == str(os.getpid())
  workdir_guard.release(str(tmp_path))


def test_truncated_last_metrics_line_is_dropped_with_a_warning(tmp_path, capsys):
  rows = [json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)]
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(rows) + '{"step": 4, "lo')
  workdir_lib.MetricsLog(str(tmp_path), resume_step=3).close()
  assert path.read_text() == "".join(rows)
  assert f"warning: dropped the incomplete last line of {path}" in capsys.readouterr().err
  path.write_text(rows[0] + "garbage\n" + rows[2])
  with pytest.raises(workdir_lib.WorkdirError, match="line 2 is damaged"):
    workdir_lib.MetricsLog(str(tmp_path), resume_step=3)


class LoopState(dict):
  """A minimal training state for run_loop: {"step": int32 scalar}, with a .step attribute."""

  step = property(lambda self: self["step"])


jax.tree_util.register_pytree_node(LoopState, lambda d: ((d["step"],), None),
                                   lambda _, leaves: LoopState(step=leaves[0]))


@pytest.mark.parametrize("nan_at, message", [
    (1, "loss became nan at step 1; stopping. No checkpoint was written yet; lower the learning "
        "rate or check the data."),
    (3, "loss became nan at step 3; stopping. The last good checkpoint (step 2) is kept; lower "
        "the learning rate or check the data.")])
def test_nan_message_names_the_checkpoint_really_kept(tmp_path, nan_at, message):
  """The shared loop with a stand-in step (a NaN loss at step nan_at, checkpoints every step):
  the error promises a kept checkpoint only when one is on disk, and names its step."""
  def step_fn(state, batch, index):
    step = state.step + 1
    return LoopState(step=step), {"loss": jnp.where(step == nan_at, jnp.nan, 1.0)}

  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)),
                            devices=jax.devices()[:1])
  with pytest.raises(loop.TrainingError) as error:
    loop.run_loop(state=LoopState(step=jnp.int32(0)), step_fn=step_fn,
                   iterator=loader.batch_iterator(np.zeros((8, 4), np.int32), 2, 0),
                   manager=checkpoints.checkpoint_manager(str(tmp_path), keep=2),
                   log=workdir_lib.MetricsLog(str(tmp_path)), num_steps=5, log_every=1,
                   checkpoint_every=1, mesh=mesh, tokens_per_step=8)
  assert str(error.value) == message
  assert checkpoints.saved_steps(str(tmp_path)) == list(range(1, nan_at))[-2:]


# ---------------------------------------------------------------------------------------------
# Damaged checkpoint files (in process).


def biggest_blob(step_dir: str) -> str:
  files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs]
  return max(files, key=os.path.getsize)


def damage(path: str, mode: str) -> None:
  size = os.path.getsize(path)
  if mode == "delete":
    os.remove(path)
  elif mode == "truncate":
    os.truncate(path, size // 2)
  elif mode == "empty":
    os.truncate(path, 0)
  else:  # garbage: same size, random bytes
    with open(path, "wb") as f:
      f.write(random.Random(path).randbytes(max(size, 1)))


def flat(tree) -> np.ndarray:
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def _check_damaged_restore(runs, tmp_path, relative: str, mode: str, capsys) -> str:
  """Damage checkpoints/8/<relative> of a teacher copy; restore must give step 8's or step 4's
  exact parameters, the latter with a warning naming checkpoints/8. Returns which."""
  workdir = copy_run(runs, "teacher", tmp_path, f"t_{mode}_{relative.replace('/', '_')}")
  want = {s: flat(checkpoints.load_params(workdir, "ema_params", step=s)) for s in (4, 8)}
  capsys.readouterr()
  damage(os.path.join(workdir, "checkpoints", "8", relative), mode)
  got = flat(checkpoints.load_params(workdir, "ema_params"))
  err = capsys.readouterr().err
  if np.array_equal(got, want[8]):
    return "8"
  assert np.array_equal(got, want[4]), (relative, mode)
  assert f"warning: checkpoint {workdir}/checkpoints/8 could not be read" in err, err
  return "4"


def test_deleted_checkpoint_blob_falls_back_to_the_previous_step(runs, tmp_path, capsys):
  step_dir = str(runs / "teacher" / "checkpoints" / "8")
  relative = os.path.relpath(biggest_blob(step_dir), step_dir)
  assert _check_damaged_restore(runs, tmp_path, relative, "delete", capsys) == "4"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["delete", "truncate", "empty", "garbage"])
def test_every_damaged_checkpoint_file_restores_exact_parameters(runs, tmp_path, capsys, mode):
  """Each file of the step directory in turn: exact step-8 or step-4 parameters, never others;
  the parameter blobs themselves must fall back."""
  step_dir = str(runs / "teacher" / "checkpoints" / "8")
  files = sorted(os.path.relpath(os.path.join(d, f), step_dir)
                 for d, _, fs in os.walk(step_dir) for f in fs)
  outcome = {f: _check_damaged_restore(runs, tmp_path, f, mode, capsys) for f in files}
  print(mode, outcome)
  blob = os.path.relpath(biggest_blob(step_dir), step_dir)
  assert outcome[blob] == "4"


@pytest.mark.slow
def test_training_resumes_from_the_previous_checkpoint_when_the_newest_is_damaged(runs, tmp_path):
  """A deleted blob in checkpoints/8: the same command warns, sets the directory aside as
  8.unreadable, retrains steps 5–8 and reproduces the undamaged rows exactly."""
  workdir = copy_run(runs, "teacher", tmp_path)
  rows = _helpers.timing_free(_helpers.read_metrics(workdir))
  os.remove(biggest_blob(os.path.join(workdir, "checkpoints", "8")))
  proc = _helpers.run_python([TRAIN, CONFIG, *_helpers.FAST_FLAGS, f"--workdir={workdir}"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  warnings = [line for line in stderr_lines(proc) if line.startswith("warning: ")]
  assert warnings[0].startswith(f"warning: checkpoint {workdir}/checkpoints/8 could not be read")
  assert warnings[1] == (f"warning: moved the unreadable {workdir}/checkpoints/8 to "
                         f"{workdir}/checkpoints/8.unreadable; training resumes from the "
                         "previous checkpoint.")
  assert _helpers.timing_free(_helpers.read_metrics(workdir)) == rows
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8", "8.unreadable"]


# ---------------------------------------------------------------------------------------------
# kill -9 and concurrent processes (binaries).

LONG_STEPS, LONG_EVERY = 120, 3


def long_args(binary, workdir, teacher=None) -> list:
  prefix = "train" if teacher is None else "distill"
  args = [binary, CONFIG, *_helpers.quiet_schedule_flags(LONG_STEPS, LONG_EVERY, prefix),
          f"--workdir={workdir}"]
  return args + ([f"--config.distill.teacher_workdir={teacher}"] if teacher else [])


def start(args) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, *map(str, args)], env=_helpers.cache_env(),
                          cwd=_helpers.REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)


def wait_for(condition, proc, timeout=300):
  deadline = time.time() + timeout
  while not condition():
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    assert time.time() < deadline
    time.sleep(0.002)


def kill_run(args, workdir, *, delay=None) -> bool:
  """Start the binary; once training has logged a row, SIGKILL it after `delay` seconds, or
  (delay None) as soon as a checkpoint is being written. Returns whether a checkpoint write was
  in flight (an orbax temporary directory) when it died."""
  proc = start(args)
  metrics = os.path.join(workdir, "metrics.jsonl")
  checkpoints = os.path.join(workdir, "checkpoints")
  try:
    wait_for(lambda: os.path.exists(metrics) and os.path.getsize(metrics) > 0, proc)
    if delay is None:
      wait_for(lambda: any("tmp" in n for n in _listdir(checkpoints)), proc)
    else:
      time.sleep(delay)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
  return any("tmp" in n for n in _listdir(checkpoints))


def _listdir(path):
  try:
    return os.listdir(path)
  except FileNotFoundError:
    return []


@pytest.fixture(scope="module")
def straight_runs(runs, tmp_path_factory):
  """Uninterrupted LONG_STEPS runs of both binaries (the references of the kill tests)."""
  root = tmp_path_factory.mktemp("straight")
  teacher = runs / "teacher"
  for name, binary, t in (("teacher", TRAIN, None), ("student", DISTILL, teacher)):
    proc = _helpers.run_python(long_args(binary, root / name, t))
    assert proc.returncode == 0, proc.stderr[-3000:]
  return root


@pytest.mark.slow
@pytest.mark.parametrize("which", ["teacher", "student"])
@pytest.mark.parametrize("when", ["random0", "random1", "during_checkpoint_write"])
def test_kill_9_then_the_same_command_resumes_exactly(runs, straight_runs, tmp_path, which,
                                                      when):
  """SIGKILL at a seeded random time after training started, or while orbax writes a checkpoint;
  rerunning the same command gives the uninterrupted run's metrics rows (without throughput)
  and its final parameters, exactly."""
  workdir = tmp_path / which
  binary, teacher = (TRAIN, None) if which == "teacher" else (DISTILL, runs / "teacher")
  args = long_args(binary, workdir, teacher)
  if when == "during_checkpoint_write":
    assert kill_run(args, str(workdir), delay=None)  # the fault really hit a write in flight
  else:
    kill_run(args, str(workdir), delay=random.Random(f"{which}{when}").uniform(0.0, 1.5))
  proc = _helpers.run_python(args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  reference = straight_runs / which
  assert (_helpers.timing_free(_helpers.read_metrics(workdir))
          == _helpers.timing_free(_helpers.read_metrics(reference)))
  name = "ema_params" if which == "teacher" else "student_ema"
  assert np.array_equal(flat(checkpoints.load_params(str(workdir), name)),
                        flat(checkpoints.load_params(str(reference), name)))


@pytest.mark.slow
def test_second_process_on_a_workdir_is_refused(tmp_path):
  """Two teacher runs on one workdir: the second exits 1 with `error: workdir in use by PID n`
  (n = the first); the first finishes with one metrics row per step."""
  workdir = tmp_path / "teacher"
  args = long_args(TRAIN, workdir)
  first = start(args)
  lock = workdir / workdir_guard.LOCK_FILE
  wait_for(lambda: lock.exists() and lock.read_text().strip() == str(first.pid), first)
  second = _helpers.run_python(args)
  assert second.returncode == 1
  assert stderr_lines(second) == [
      f"error: workdir in use by PID {first.pid} ({workdir}); wait for it to finish or stop it, "
      "or use another --workdir."]
  assert first.wait(timeout=600) == 0, first.stderr.read()[-3000:]
  first.stderr.close()
  steps = [row["step"] for row in _helpers.read_metrics(workdir)]
  assert steps == [*range(1, LONG_STEPS + 1), LONG_STEPS]


def test_restore_with_no_checkpoint_names_the_workdir(tmp_path):
  with pytest.raises(workdir_lib.WorkdirError, match="has no checkpoint"):
    checkpoints.newest_readable(str(tmp_path), [], lambda step: step)
