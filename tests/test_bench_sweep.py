"""bench/sweep.py: its paired table over settings swept with different k, its teacher-row cache
and its refusal to mix rows of differently made sweeps in one output."""

import importlib.util
import os
import pathlib

import _helpers
import pytest

SWEEP = pathlib.Path(__file__).resolve().parents[1] / "bench" / "sweep.py"


@pytest.fixture(scope="module")
def sweep():
  spec = importlib.util.spec_from_file_location("dmmd_bench_sweep", SWEEP)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _rows(setting, models, seeds=(0, 1, 2)):
  return [{"setting": setting, "seed": s, "model": name, "kind": name.split("_")[0],
           "steps": steps, "mmd2": value + 0.01 * s, "mmd2_se": 0.0}
          for s in seeds for name, steps, value in models]


def test_pairs_a_setting_was_not_swept_for_are_skipped(sweep):
  """A setting with only k = 16 students (and teacher at 16 and 256) next to one with k = 4 and
  16: the pair 4:16 is reported for the second only, with the right differences."""
  rows = (_rows("both", [("teacher", 16, 0.5), ("teacher", 256, 0.2), ("student_k4", 4, 0.3),
                         ("student_k16", 16, 0.1)])
          + _rows("k16_only", [("teacher", 16, 0.5), ("teacher", 256, 0.2),
                               ("student_k16", 16, 0.4)]))
  table = sweep.paired_rows(rows, [(4, 16), (16, 256)])
  assert [(r["setting"], r["a"], r["b"]) for r in table] == [
      ("both", "student_k4@4", "teacher@16"), ("both", "student_k16@16", "teacher@256"),
      ("k16_only", "student_k16@16", "teacher@256")]
  assert [round(r["diff"], 6) for r in table] == [-0.2, -0.1, 0.2]


@pytest.mark.slow  # ≈ 30 s: trains and distils twice; a bench tool's cache, not the library
def test_teacher_rows_are_scored_once_and_equal_an_uncached_run(sweep, tmp_path, monkeypatch):
  """Two settings, one seed: the teacher is sampled for the first setting only, and the second
  setting's rows (teacher rows from the cache) equal those of a sweep of that setting alone."""
  from dmmd_jax.training import trained_model
  config = _helpers.fast_digits()
  sampled = []
  original = trained_model.Model.sample

  def sample(model, *args, **kwargs):
    sampled.append(model.kind)
    return original(model, *args, **kwargs)

  monkeypatch.setattr(trained_model.Model, "sample", sample)
  common = dict(config=config, workdir=str(tmp_path / "runs"), ks=[2], teacher_steps=[2, 4],
                seeds=[0], pairs=[(2, 2)], metrics=["mmd2", "unique"], num_samples=16,
                split="eval")
  sweep.run(grid=["distill.learning_rate=1e-3|2e-3"], output=str(tmp_path / "both"), **common)
  assert sampled == ["teacher", "teacher", "student", "student"]
  sweep.run(grid=["distill.learning_rate=2e-3"], output=str(tmp_path / "alone"), **common)
  both = sweep.read_rows(str(tmp_path / "both_rows.csv"))
  alone = sweep.read_rows(str(tmp_path / "alone_rows.csv"))
  assert [r for r in both if r["setting"] == "learning_rate=0.002"] == alone
  assert len(alone) == 4  # data, teacher at 2 and 4 steps, the student


def _snapshot(root):
  return {p: p.read_bytes() for p in pathlib.Path(root).rglob("*") if p.is_file()}


def test_a_rerun_made_differently_is_refused_before_training_and_changes_nothing(sweep, tmp_path):
  """Rows of a --split=train sweep in OUTPUT: the same command with --split=eval would skip
  them as done (a row is named by setting and seed only); it stops with the reason instead,
  before the teacher is trained, and leaves every file as it was."""
  from dmmd_jax import config_lib
  config = _helpers.fast_digits()
  output = str(tmp_path / "out")
  made = sweep.sweep_identity(config_lib.typed(config), "train", 16, ["mmd2"])
  sweep.check_same_sweep(output, made)  # no rows yet: records how they are made
  sweep.report.write_csv(f"{output}_rows.csv", _rows("", [("teacher", 2, 0.5)], seeds=(0,)))
  before = _snapshot(tmp_path)
  with pytest.raises(ValueError, match=r"split: 'train' there, 'eval' now.*new --output"):
    sweep.run(config=config, workdir=str(tmp_path / "runs"), ks=[2], teacher_steps=[2],
              seeds=[0], pairs=[(2, 2)], grid=[], metrics=["mmd2"], num_samples=16,
              split="eval", output=output)
  assert _snapshot(tmp_path) == before
  assert not os.path.exists(tmp_path / "runs")


def test_only_what_made_the_rows_decides_a_resume(sweep, tmp_path):
  """The identity that wrote the rows resumes; a changed base config value is named."""
  from dmmd_jax import config_lib
  config = config_lib.typed(_helpers.fast_digits())
  output = str(tmp_path / "out")
  sweep.check_same_sweep(output, sweep.sweep_identity(config, "eval", 16, ["mmd2"]))
  sweep.report.write_csv(f"{output}_rows.csv", _rows("", [("teacher", 2, 0.5)], seeds=(0,)))
  sweep.check_same_sweep(output, sweep.sweep_identity(config, "eval", 16, ["mmd2"]))
  other = config_lib.replace(config, distill={"batch_size": config.distill.batch_size + 1})
  with pytest.raises(ValueError, match=r"distill\.batch_size"):
    sweep.check_same_sweep(output, sweep.sweep_identity(other, "eval", 16, ["mmd2"]))
