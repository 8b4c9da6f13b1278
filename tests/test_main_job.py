"""The main job's student chain (`dmmd_jax.main_job.distill_students`)."""

import _helpers
import pytest

from dmmd_jax import main_job
from dmmd_jax.training import dmmd_run


@pytest.mark.parametrize("curriculum", [False, True])
def test_students_are_distilled_in_ascending_k_and_chained_by_the_curriculum(
    monkeypatch, tmp_path, curriculum):
  """Students run smallest k first; with distill.curriculum each after the first starts from the
  previous student's workdir, without it every one starts from the teacher ("")."""
  calls = []
  monkeypatch.setattr(dmmd_run, "distill_student",
                      lambda config, workdir: calls.append((config.distill, workdir)))
  config = _helpers.fast_digits(**{"distill.curriculum": curriculum})
  dir_of = lambda k: str(tmp_path / f"k{k}")  # noqa: E731
  dirs = main_job.distill_students(config, "teacher_dir", [16, 2, 4], dir_of,
                                  progress=lambda _: None)
  assert dirs == [dir_of(2), dir_of(4), dir_of(16)]
  assert [(d.student_steps, d.teacher_workdir, w) for d, w in calls] == [
      (2, "teacher_dir", dir_of(2)), (4, "teacher_dir", dir_of(4)),
      (16, "teacher_dir", dir_of(16))]
  chained = ["", dir_of(2), dir_of(4)] if curriculum else ["", "", ""]
  assert [d.init_workdir for d, _ in calls] == chained
