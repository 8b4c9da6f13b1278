"""Smoke tests of the absl binaries in experiments/, run as subprocesses on digits `tiny`.

train_teacher → distill → sample (student and teacher workdirs), a restart of train_teacher that
resumes, and user errors that must come out as one `error: …` line with a non-zero exit code.
The runs use `_helpers.FAST` (8 + 8 steps), so with the shared compilation cache they reuse the
programs compiled by the in-process tests.
"""

import json
import shutil
import signal
import subprocess
import sys
import time

import _helpers
import numpy as np
import pytest

TRAIN = _helpers.EXPERIMENTS / "train_teacher.py"
DISTILL = _helpers.EXPERIMENTS / "distill.py"
SAMPLE = _helpers.EXPERIMENTS / "sample.py"
CONFIG = "--config=configs/digits.py:tiny"


def ok(proc):
  assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-5000:])
  return proc


def error_lines(proc):
  return [line for line in proc.stderr.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
  """A teacher and a student trained through the binaries (once per module)."""
  root = tmp_path_factory.mktemp("binaries")
  teacher, student = root / "teacher", root / "student"
  proc = ok(_helpers.run_python([TRAIN, CONFIG, *_helpers.FAST_FLAGS, f"--workdir={teacher}"]))
  assert "teacher done: step 8" in proc.stdout
  proc = ok(_helpers.run_python([DISTILL, CONFIG, *_helpers.FAST_FLAGS,
                                 f"--config.distill.teacher_workdir={teacher}",
                                 f"--workdir={student}"]))
  assert "student done: step 8" in proc.stdout
  return root


def test_train_and_distill_binaries_write_their_workdirs(runs_dir):
  for name, kind in (("teacher", "teacher"), ("student", "student")):
    workdir = runs_dir / name
    assert json.loads((workdir / "run.json").read_text())["kind"] == kind
    assert json.loads((workdir / "config.json").read_text())["data"]["source"] == "digits"
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").open()]
    assert steps[:8] == list(range(1, 9))
    assert (workdir / "checkpoints" / "8").is_dir()


@pytest.mark.parametrize("which, steps", [("student", None), ("teacher", 16)])
def test_sample_binary(runs_dir, tmp_path, which, steps):
  """int32 [N, 64] tokens in [0, 17) as .npy plus a PNG grid, from a student (its k = 4 steps) or
  a teacher (--steps)."""
  output = tmp_path / "out" / "samples.npy"
  args = [SAMPLE, f"--workdir={runs_dir / which}", "--num_samples=8", f"--output={output}",
          "--batch_size=4"]  # two batches of 4: one compiled sampler
  proc = ok(_helpers.run_python(args + ([f"--steps={steps}"] if steps else [])))
  tokens = np.load(output)
  assert tokens.dtype == np.int32 and tokens.shape == (8, 64)
  assert len(np.unique(tokens, axis=0)) > 1  # the two batches use different keys
  assert tokens.min() >= 0 and tokens.max() < 17
  png = output.with_suffix(".png")
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert str(png) in proc.stdout


@pytest.mark.slow  # resume exactness is tested in-process in test_train.py
def test_restarting_train_teacher_resumes(tmp_path):
  """A workdir as a kill between the step-4 and step-8 checkpoints leaves it (checkpoint 8
  removed); rerunning the same command resumes from step 4: rows up to 4 are kept byte for byte,
  steps 5–8 are trained again, and the run ends at step 8 without error."""
  workdir = tmp_path / "teacher"
  args = [TRAIN, CONFIG, *_helpers.FAST_FLAGS, f"--workdir={workdir}"]
  ok(_helpers.run_python(args))
  rows_before = (workdir / "metrics.jsonl").read_text().splitlines()
  shutil.rmtree(workdir / "checkpoints" / "8")

  proc = ok(_helpers.run_python(args))
  assert "teacher done: step 8" in proc.stdout
  rows_after = (workdir / "metrics.jsonl").read_text().splitlines()
  assert rows_after[:4] == rows_before[:4]  # kept, not rewritten
  assert rows_after[4:] != rows_before[4:]  # steps 5–8 ran again (new throughput numbers)
  assert [json.loads(r)["step"] for r in rows_after] == [1, 2, 3, 4, 5, 6, 7, 8, 8]
  for before, after in zip(rows_before, rows_after, strict=True):  # and reproduced them exactly
    a, b = json.loads(before), json.loads(after)
    a.pop("tokens_per_s", None), b.pop("tokens_per_s", None)
    assert a == b
  assert (workdir / "checkpoints" / "8").is_dir()


@pytest.mark.slow
def test_killed_train_teacher_resumes_with_the_same_command(tmp_path):
  """SIGKILL after the first checkpoint of a 200-step run, then the same command again: it resumes
  (rows up to the checkpoint are kept byte for byte) and finishes; a third run is a no-op."""
  workdir = tmp_path / "teacher"
  args = [TRAIN, CONFIG, *_helpers.quiet_schedule_flags(200, checkpoint_every=20),
          f"--workdir={workdir}"]
  proc = subprocess.Popen([sys.executable, *map(str, args)], env=_helpers.cache_env(),
                          cwd=_helpers.REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 300
  try:
    while not any(p.name.isdigit() for p in (workdir / "checkpoints").glob("*")):
      assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
      assert time.time() < deadline
      time.sleep(0.05)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  proc.stderr.close()
  first = min(int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit())
  rows_before = (workdir / "metrics.jsonl").read_text().splitlines()
  assert first < 200

  proc = ok(_helpers.run_python(args))
  assert "teacher done: step 200" in proc.stdout
  rows_after = (workdir / "metrics.jsonl").read_text().splitlines()
  kept = [r for r in rows_before if json.loads(r)["step"] <= first]
  assert rows_after[:len(kept)] == kept  # not rewritten: the run resumed, it did not restart
  steps = [json.loads(r)["step"] for r in rows_after]
  assert steps[:200] == list(range(1, 201))

  proc = ok(_helpers.run_python(args))  # the finished command again: a no-op that succeeds
  assert "teacher done: step 200" in proc.stdout


# One case runs by default; the rest (a fresh JAX process each) are slow-marked to keep the
# default suite short (the in-process tests in tests/training/ cover their logic).
@pytest.mark.parametrize("case", ["batch_size"] + [
    pytest.param(c, marks=pytest.mark.slow)
    for c in ("num_samples", "sample_workdir", "teacher", "levels")])
def test_user_errors_are_one_line(runs_dir, tmp_path, case):
  """A bad flag value: exit code 1 and exactly one `error: …` line on stderr (no traceback, no
  log noise), and nothing written."""
  workdir = tmp_path / "new"
  if case == "batch_size":
    args = [TRAIN, CONFIG, "--config.train.batch_size=0", f"--workdir={workdir}"]
    expected = "train.batch_size"
  elif case == "levels":
    args = [TRAIN, CONFIG, "--config.data.levels=40", f"--workdir={workdir}"]
    expected = "levels"
  elif case == "num_samples":
    args = [SAMPLE, f"--workdir={runs_dir / 'student'}", "--num_samples=0",
            f"--output={workdir / 's.npy'}"]
    expected = "--num_samples"
  elif case == "sample_workdir":
    args = [SAMPLE, f"--workdir={tmp_path / 'missing'}", f"--output={workdir / 's.npy'}"]
    expected = "config.json"
  else:
    args = [DISTILL, CONFIG, f"--config.distill.teacher_workdir={tmp_path / 'missing'}",
            f"--workdir={workdir}"]
    expected = "teacher workdir"
  proc = _helpers.run_python(args, timeout=300)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = error_lines(proc)
  assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
  assert not workdir.exists()


def test_unknown_flag_fails_without_a_traceback(tmp_path):
  proc = _helpers.run_python([SAMPLE, f"--workdir={tmp_path}", "--no_such_flag=3"], timeout=300)
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr
  assert "no_such_flag" in proc.stderr


@pytest.mark.slow
def test_nan_in_a_binary_keeps_the_last_checkpoint(tmp_path):
  """A diverging run stopped by the NaN guard exits 1 with one error line, and the checkpoint of
  the step before the NaN is complete on disk after the process has exited."""
  workdir = tmp_path / "teacher"
  proc = _helpers.run_python([TRAIN, CONFIG, *_helpers.quiet_schedule_flags(20, checkpoint_every=1),
                              "--config.train.learning_rate=1e30", "--config.train.warmup_steps=0",
                              f"--workdir={workdir}"], timeout=300)
  assert proc.returncode == 1
  errors = [line for line in error_lines(proc) if line.startswith("error: ")]
  assert len(errors) == 1 and "loss_bpt became nan at step" in errors[0], proc.stderr[-3000:]
  bad_step = int(errors[0].split("at step ")[1].split(";")[0])
  entries = sorted(p.name for p in (workdir / "checkpoints").iterdir())
  assert str(bad_step - 1) in entries, entries
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_main_binary_writes_table_plot_and_sample_grid(tmp_path):
  """experiments/main.py (the Quickstart job) on digits tiny: teacher, two students, the table
  (the teacher also at every student's k), comparison.png and the sample grid."""
  main = _helpers.EXPERIMENTS / "main.py"
  proc = ok(_helpers.run_python([main, CONFIG, *_helpers.FAST_FLAGS, f"--workdir={tmp_path}",
                                 "--student_steps=2,4", "--teacher_steps=8", "--num_samples=8"]))
  rows = json.loads((tmp_path / "results.json").read_text())
  assert [(r["model"], r["steps"]) for r in rows] == [
      (rows[0]["model"], 0), ("teacher", 2), ("teacher", 4), ("teacher", 8),
      ("student_k2", 2), ("student_k4", 4)]
  for png in ("comparison.png", "samples_overview.png"):
    assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG", png
  assert "student_k4" in proc.stdout
