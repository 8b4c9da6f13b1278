"""Tests for `dmmd_jax.train`: the teacher training run (resume, learning, input errors).

Runs use the digits `tiny` preset (2 layers, width 64; 64 pixel tokens, 17 grey levels), mostly
with the canonical fast schedule `_helpers.FAST` so that they share compiled programs, and small
.npy token arrays for the data errors.
"""

import json
import os

import _helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmmd_jax import config_lib
from dmmd_jax.data import types as data_types
from dmmd_jax.infra import checkpoints
from dmmd_jax.infra import workdir as workdir_lib
from dmmd_jax.training import loop, teacher_run, trained_model


def digits_config(**overrides):
  return _helpers.make_config("digits", "tiny", **overrides)


@pytest.mark.parametrize("kind", ["masked", pytest.param("uniform", marks=pytest.mark.slow)])
def test_teacher_resume_is_exact(tmp_path, monkeypatch, kind):
  """8 steps in one go vs. killed right after the step-4 checkpoint and restarted with the same
  call: the metrics.jsonl rows (losses, gradient norms, held-out bits/token at steps 4 and 8)
  are identical for every step, and so are the final parameters and EMA parameters."""
  overrides = {"kernel.kind": kind}
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  result = teacher_run.train_teacher(_helpers.fast_digits(**overrides), straight)

  _helpers.run_until_first_checkpoint(
      lambda: teacher_run.train_teacher(_helpers.fast_digits(**overrides), resumed), monkeypatch)
  assert [r["step"] for r in _helpers.read_metrics(resumed)] == [1, 2, 3, 4]
  assert teacher_run.train_teacher(_helpers.fast_digits(**overrides), resumed) == result

  rows_a = _helpers.timing_free(_helpers.read_metrics(straight))
  rows_b = _helpers.timing_free(_helpers.read_metrics(resumed))
  assert [r["step"] for r in rows_a] == [1, 2, 3, 4, 5, 6, 7, 8, 8]  # + the final evaluation
  assert rows_a == rows_b
  assert "eval_bpt" in rows_a[3] and "eval_bpt" in rows_a[7]
  for name in ("params", "ema_params"):
    a, b = checkpoints.load_params(straight, name), checkpoints.load_params(resumed, name)
    assert _helpers.tree_max_abs_diff(a, b) <= 1e-6, name


def test_teacher_learns_digits(tmp_path):
  """The negative ELBO falls on real data within 60 steps: training loss (bits/token) and the
  held-out bound of the EMA parameters both improve clearly."""
  config = digits_config(**{**_helpers.quiet_schedule("train", 60, log_every=5),
                            "train.eval_every": 10, "train.ema_decay": 0.9,
                            "train.learning_rate": 3e-3, "train.batch_size": 32})
  result = teacher_run.train_teacher(config, str(tmp_path))
  rows = _helpers.read_metrics(tmp_path)
  losses = [r["loss_bpt"] for r in rows if "loss_bpt" in r]
  evals = [r["eval_bpt"] for r in rows if "eval_bpt" in r]
  print(f"digits tiny: train bits/token {losses[0]:.3f} → {losses[-1]:.3f}, held-out "
        f"{evals[0]:.3f} → {evals[-1]:.3f} (log2 17 = {np.log2(17):.3f})")
  assert np.mean(losses[-3:]) < np.mean(losses[:2]) - 0.3
  assert evals[-1] < evals[0] - 0.2
  assert result == {"step": 60, "eval_bpt": pytest.approx(evals[-1])}
  assert all(np.isfinite(r["grad_norm"]) for r in rows if "grad_norm" in r)
  # The trained workdir loads as a model whose chunked sampling does not depend on batch_size for
  # the first chunk, and whose chunks use their own seeds.
  model = trained_model.load(str(tmp_path))
  whole, chunks = model.sample(6, 4, seed=3), []
  chunked = model.sample(10, 4, seed=3, batch_size=6, on_chunk=chunks.append)
  np.testing.assert_array_equal(chunked[:6], whole)
  np.testing.assert_array_equal(chunked[6:], model.sample(4, 4, seed=3 + 1_000_003))
  assert chunks == [6, 4] and chunked.shape == (10, 64) and chunked.dtype == np.int32


@pytest.mark.parametrize("override, key", [
    ({"train.batch_size": 0}, "train.batch_size"),
    ({"train.num_steps": 0}, "train.num_steps"),
    ({"model.width": 0}, "model.width"),
    ({"model.num_layers": -1}, "model.num_layers"),
    ({"train.learning_rate": -1e-3}, "train.learning_rate"),
    ({"train.checkpoint_every": 0}, "train.checkpoint_every"),
    ({"data.seq_len": -4}, "data.seq_len"),
    ({"train.ema_decay": 1.0}, "ema_decay"),
])
def test_non_positive_sizes_fail_before_anything_is_written(tmp_path, override, key):
  workdir = tmp_path / "run"
  with pytest.raises(config_lib.ConfigError, match=key.replace(".", r"\.")) as info:
    teacher_run.train_teacher(digits_config(**override), str(workdir))
  assert "\n" not in str(info.value)
  assert not workdir.exists()


def test_out_of_vocabulary_npy_tokens_fail_before_anything_is_written(tmp_path):
  tokens = np.array([[0, 1, 2], [3, 5, 1]] * 20, np.int32)
  np.save(tmp_path / "tokens.npy", tokens)
  config = _helpers.make_config("npy_tokens", **{"data.path": str(tmp_path / "tokens.npy"),
                                                 "data.vocab_size": 4})
  with pytest.raises(data_types.DataError, match=r"outside the vocabulary \[0, 4\)"):
    teacher_run.train_teacher(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("config_name", ["npy_tokens", "text_file"])
def test_missing_data_path_fails_before_anything_is_written(tmp_path, config_name):
  overrides = {"data.path": str(tmp_path / "nope.npy"), "data.vocab_size": 4}
  if config_name == "text_file":
    config = _helpers.make_config("shakespeare_char", **{"data.path": str(tmp_path / "nope.txt")})
    config.data.source = "text_file"
  else:
    config = _helpers.make_config("npy_tokens", **overrides)
  with pytest.raises(data_types.DataError, match="no file at path"):
    teacher_run.train_teacher(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_workdir_of_a_different_run_is_refused_and_left_alone(tmp_path):
  workdir = str(tmp_path / "run")
  teacher_run.train_teacher(_helpers.fast_digits(), workdir)
  before = {name: (tmp_path / "run" / name).read_text() for name in ("config.json", "run.json",
                                                                     "metrics.jsonl")}
  for override, key in [({"model.width": 32}, "model.width"),
                        ({"kernel.kind": "uniform"}, "kernel.kind"),
                        ({"data.levels": 8}, "data.levels")]:
    with pytest.raises(workdir_lib.WorkdirError, match=key.replace(".", r"\.")):
      teacher_run.train_teacher(_helpers.fast_digits(**override), workdir)
  after = {name: (tmp_path / "run" / name).read_text() for name in before}
  assert after == before
  assert json.loads(after["config.json"])["model"]["width"] == 64


def _check_nan_stop(workdir, info):
  message = str(info.value)
  print("teacher NaN:", message)
  bad_step = int(message.split("at step ")[1].split(";")[0])
  # Checked at once: the step before the NaN was checkpointed asynchronously, and that save must
  # be complete when the error reaches the caller (a CLI process exits right after it).
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps and steps[-1] == bad_step - 1, (bad_step, os.listdir(workdir / "checkpoints"))
  assert all(r["step"] < bad_step for r in _helpers.read_metrics(workdir))
  params = checkpoints.load_params(str(workdir), "ema_params")
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))
  return bad_step


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  """A loss that turns NaN at step 6 (injected into the compiled step's metrics): TrainingError
  names loss_bpt and step 6, nothing is logged for it, and checkpoint 5 is on disk and loads."""
  compile_teacher_step = teacher_run.compile_teacher_step

  def poisoned(*args, **kwargs):
    step_fn, calls = compile_teacher_step(*args, **kwargs), [0]

    def run(state, batch):
      state, metrics = step_fn(state, batch)
      calls[0] += 1
      return state, (dict(metrics, loss_bpt=jnp.float32(jnp.nan)) if calls[0] == 6 else metrics)

    return run

  monkeypatch.setattr(teacher_run, "compile_teacher_step", poisoned)
  workdir = tmp_path / "run"
  config = _helpers.fast_digits(**{"train.checkpoint_every": 1})
  with pytest.raises(loop.TrainingError, match="loss_bpt became nan at step 6") as info:
    teacher_run.train_teacher(config, str(workdir))
  assert _check_nan_stop(workdir, info) == 6


@pytest.mark.slow
def test_diverging_learning_rate_stops_with_a_nan_loss(tmp_path):
  """learning_rate = 1e30: a real divergence after a couple of steps."""
  workdir = tmp_path / "run"
  config = digits_config(**_helpers.quiet_schedule("train", 20, checkpoint_every=1),
                         **{"train.learning_rate": 1e30, "train.warmup_steps": 0})
  with pytest.raises(loop.TrainingError, match=r"loss_bpt became nan at step \d+") as info:
    teacher_run.train_teacher(config, str(workdir))
  _check_nan_stop(workdir, info)


def test_unknown_config_key_is_a_one_line_flag_error(tmp_path):
  """--config.train.bogus=1 must fail in the flag parser (the config is locked), before anything is
  written, with one line naming the key — not a Python traceback."""
  workdir = tmp_path / "run"
  proc = _helpers.run_python([_helpers.EXPERIMENTS / "train_teacher.py",
                              "--config=configs/digits.py:tiny", "--config.train.bogus=1",
                              f"--workdir={workdir}"], timeout=300)
  assert proc.returncode != 0
  assert not workdir.exists()
  lines = [line for line in proc.stderr.splitlines()
           if line.strip() and not line.startswith("Pass --helpshort")]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert len(lines) == 1 and "bogus" in lines[0], proc.stderr[-3000:]


def test_checkpoints_keep_only_the_newest(tmp_path):
  config = _helpers.fast_digits(**{"train.checkpoint_every": 1, "train.keep_checkpoints": 2})
  teacher_run.train_teacher(config, str(tmp_path))
  kept = sorted(int(p) for p in os.listdir(tmp_path / "checkpoints") if p.isdigit())
  assert kept == [7, 8]


def test_a_non_finite_gradient_norm_stops_training_even_when_the_loss_is_finite():
  """Hard top-p gives a finite but huge generator loss (≈ 4e29) with an infinite gradient norm;
  that must stop the run like a NaN loss does."""
  diverged = [{"gen_loss": 3.9e29, "student_grad_norm": np.inf}]
  with pytest.raises(loop.TrainingError, match="student_grad_norm became inf at step 7"):
    loop._check_and_average(diverged, 7)
  fine = [{"loss": 1.0, "grad_norm": 2.0}, {"loss": 3.0, "grad_norm": 4.0}]
  assert loop._check_and_average(fine, 0) == {"grad_norm": 3.0, "loss": 2.0}
