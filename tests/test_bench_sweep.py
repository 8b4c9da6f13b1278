"""bench/sweep.py's paired table over settings swept with different k."""

import importlib.util
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
