"""bench/mirror_errors.py on a tiny synthetic teacher and student: every mirrored pair is counted
once, its copy rate is the sampler's, and a model of another source is refused in one line."""

import json

import _helpers
import numpy as np
import pytest

from dmmd_jax.training import dmmd_run, teacher_run, trained_model

TINY = {"model.num_layers": 1, "model.width": 32, "model.cond_dim": 16, "train.num_steps": 4,
        "train.eval_every": 0, "train.checkpoint_every": 4, "train.log_every": 2,
        "train.eval_batches": 1, "distill.num_steps": 1, "distill.checkpoint_every": 1,
        "distill.log_every": 1, "distill.student_steps": 3, "distill.eval_every": 0}


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("mirror")
  teacher, student = str(root / "teacher"), str(root / "student")
  teacher_run.train_teacher(_helpers.make_config("synthetic", "tiny", **TINY), teacher)
  dmmd_run.distill_student(_helpers.make_config(
      "synthetic", "tiny", **TINY, **{"distill.teacher_workdir": teacher}), student)
  return root, teacher, student


def _bench(*flags):
  return _helpers.run_python(["bench/mirror_errors.py", *flags],
                             env=_helpers.cache_env({"JAX_PLATFORMS": "cpu"}))


def test_every_pair_is_counted_once_at_the_step_that_completed_it(workdirs):
  root, teacher, student = workdirs
  out = root / "rows.json"
  done = _bench(f"--workdirs={teacher},{student}", "--steps=5,2", "--num_samples=64",
                f"--output={out}")
  assert done.returncode == 0, done.stderr[-2000:]
  rows = json.loads(out.read_text())
  assert [(r["kind"], r["steps"]) for r in rows] == [("teacher", 5), ("teacher", 2), ("student", 3)]
  for row in rows:
    seq_len = trained_model.load(row["workdir"]).setup.seq_len
    pairs = np.add(row["together"], row["after"])
    assert pairs.sum() == 64 * seq_len // 2 and row["after"][0] == 0
    assert np.all(np.less_equal(row["together_wrong"], row["together"]))
    assert np.all(np.less_equal(row["after_wrong"], row["after"]))
    # No pair broken ⇔ copied: the copy rate bounds the broken pairs.
    wrong = sum(row["together_wrong"]) + sum(row["after_wrong"])
    assert (64 * (1 - row["copy_rate"]) <= wrong <= 64 * seq_len // 2 * (1 - row["copy_rate"]))
  assert f"copy rate {rows[2]['copy_rate']:.3f}" in done.stdout


def test_bad_input_is_refused_in_one_line_before_any_sampling(workdirs, tmp_path):
  """A model of another source, no workdir, bad --steps: one error line, no output file."""
  _, teacher, _ = workdirs
  digits = str(tmp_path / "digits")
  teacher_run.train_teacher(_helpers.make_config("digits", "tiny", **TINY), digits)
  for flags, message in (([f"--workdirs={teacher},{digits}"], "not trained on the synthetic"),
                         ([f"--workdirs={teacher},{tmp_path}/missing"], "no config.json"),
                         ([f"--workdirs={teacher}", "--steps=4,x"], "positive integers")):
    done = _bench(*flags, f"--output={tmp_path / 'rows.json'}")
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, last
    assert not (tmp_path / "rows.json").exists()
