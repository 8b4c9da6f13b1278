"""A D-MMD distillation run (`dmmd_jax.training.dmmd_run`): resume exactness, diagnostics, and
the errors of a run, on the canonical fast digits run (_helpers.FAST)."""

import functools
import json
import math
import os
import shutil

import _helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmmd_jax import config_lib
from dmmd_jax.infra import checkpoints, sharding
from dmmd_jax.infra import workdir as workdir_lib
from dmmd_jax.training import dmmd_run, loop, teacher_run
from dmmd_jax.training import setup as setup_lib
from dmmd_jax.training import state as state_lib

# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_teacher(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("small_teacher"))
  teacher_run.train_teacher(_helpers.fast_digits(), workdir)
  return workdir


def student_config(teacher, **overrides):
  return _helpers.fast_digits(**{"distill.teacher_workdir": teacher, **overrides})


def test_distill_resume_is_exact(small_teacher, tmp_path, monkeypatch):
  """8 updates in one go vs. killed right after the step-4 checkpoint and restarted with the same
  call: identical metrics rows (all steps) and identical final student / auxiliary parameters."""
  overrides = _helpers.quiet_schedule("distill", 8, log_every=1, checkpoint_every=4)
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  dmmd_run.distill_student(student_config(small_teacher, **overrides), straight)

  _helpers.run_until_first_checkpoint(
      lambda: dmmd_run.distill_student(student_config(small_teacher, **overrides), resumed),
      monkeypatch)
  assert [r["step"] for r in _helpers.read_metrics(resumed)] == [1, 2, 3, 4]
  assert dmmd_run.distill_student(student_config(small_teacher, **overrides),
                                  resumed) == {"step": 8}

  rows_a = _helpers.timing_free(_helpers.read_metrics(straight))
  rows_b = _helpers.timing_free(_helpers.read_metrics(resumed))
  assert [r["step"] for r in rows_b] == list(range(1, 9))
  assert rows_a == rows_b
  assert {"gen_loss", "aux_loss"} <= set(rows_a[-1])
  for name in ("student", "aux", "student_ema"):
    a, b = checkpoints.load_params(straight, name), checkpoints.load_params(resumed, name)
    assert _helpers.tree_max_abs_diff(a, b) <= 1e-6, name
  # The student really moved away from the teacher (so equal parameters mean something).
  teacher = checkpoints.load_params(small_teacher, "ema_params")
  student = checkpoints.load_params(straight, "student")
  shared = [k for k in teacher if k != "noise_proj"]
  assert _helpers.tree_max_abs_diff({k: student[k] for k in shared},
                                    {k: teacher[k] for k in shared}) > 1e-4


def test_distill_logs_per_bucket_diagnostics_at_eval(small_teacher, tmp_path):
  """At every eval step metrics.jsonl holds moment_mismatch/b{b} ∈ [0, 2] and
  student_entropy/b{b} ∈ [0, log K] for each of distill.diagnostic_buckets buckets of s."""
  workdir = tmp_path / "student"
  config = student_config(small_teacher, **{
      **_helpers.quiet_schedule("distill", 4, log_every=2), "distill.eval_every": 2,
      "distill.diagnostic_buckets": 3})
  dmmd_run.distill_student(config, str(workdir))
  rows = [r for r in _helpers.read_metrics(workdir) if "mmd2_to_data" in r]
  assert [r["step"] for r in rows] == [2, 4]
  vocab = workdir_lib.load_run_info(str(workdir))["data_info"].vocab_size
  for row in rows:
    for b in range(3):
      assert 0.0 <= row[f"moment_mismatch/b{b}"] <= 2.0
      assert 0.0 <= row[f"student_entropy/b{b}"] <= math.log(vocab) + 1e-5
    assert "moment_mismatch/b3" not in row
  assert any(row[f"moment_mismatch/b{b}"] > 0 for row in rows for b in range(3))


@pytest.mark.parametrize("teacher_dir, message", [
    ("", "teacher_workdir is empty"),
    ("missing", "has no config.json"),
])
def test_distill_refuses_a_missing_teacher(tmp_path, teacher_dir, message):
  teacher = str(tmp_path / teacher_dir) if teacher_dir else ""
  workdir = tmp_path / "student"
  with pytest.raises(dmmd_run.DistillError, match=message):
    dmmd_run.distill_student(student_config(teacher), str(workdir))
  assert not workdir.exists()


@pytest.mark.parametrize("override, key", [
    ({"data.levels": 8}, "data.levels"),
    ({"kernel.kind": "uniform"}, "kernel.kind"),
    ({"model.width": 32}, "model.width"),
    ({"model.num_layers": 1}, "model.num_layers"),
])
def test_distill_refuses_a_teacher_of_another_architecture(small_teacher, tmp_path, override,
                                                           key):
  """A different vocabulary (8 grey levels instead of 17), kernel, width or depth: a DistillError
  naming the key, before the student workdir is created."""
  workdir = tmp_path / "student"
  with pytest.raises(dmmd_run.DistillError, match=key.replace(".", r"\.")) as info:
    dmmd_run.distill_student(student_config(small_teacher, **override), str(workdir))
  assert "\n" not in str(info.value)
  assert not workdir.exists()


@pytest.mark.parametrize("steps", [0, -2])
def test_distill_refuses_non_positive_student_steps(small_teacher, tmp_path, steps):
  config = student_config(small_teacher, **{"distill.student_steps": steps})
  with pytest.raises(config_lib.ConfigError, match="distill.student_steps"):
    dmmd_run.distill_student(config, str(tmp_path / "student"))
  assert not (tmp_path / "student").exists()


def _biggest_state_files(workdir):
  """The largest array file of every checkpoint step (damaging only the newest would not stop a
  consumer: it falls back to the previous step, tests/infra/test_faults.py)."""
  steps = [p for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
  return [max((p for p in (step / "state").rglob("*") if p.is_file()),
              key=lambda p: p.stat().st_size) for step in steps]


@pytest.mark.parametrize("damage", ["delete_data", "garble_data", "delete_metadata",
                                    "no_checkpoints"])
def test_distill_reports_a_corrupt_teacher_checkpoint(small_teacher, tmp_path, damage):
  """Teacher checkpoints with a deleted or overwritten data file, no _METADATA, or no checkpoint
  at all: one-line WorkdirError naming the teacher's checkpoint path."""
  teacher = tmp_path / "teacher"
  shutil.copytree(small_teacher, teacher)
  if damage == "delete_data":
    for path in _biggest_state_files(teacher):
      path.unlink()
  elif damage == "garble_data":
    for path in _biggest_state_files(teacher):
      path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))
  elif damage == "delete_metadata":
    for path in (teacher / "checkpoints").glob("*/state/_METADATA"):
      path.unlink()
  else:
    shutil.rmtree(teacher / "checkpoints")
  message = "has no checkpoint" if damage == "no_checkpoints" else "no readable checkpoint"
  with pytest.raises(workdir_lib.WorkdirError, match=message) as info:
    dmmd_run.distill_student(student_config(str(teacher)), str(tmp_path / "student"))
  assert str(teacher) in str(info.value)
  assert "\n" not in str(info.value)


def _check_nan_stop(workdir, info, loss_names):
  message = str(info.value)
  print("distill NaN:", message)
  name, step = message.split(" became nan at step ")
  assert name in loss_names
  bad_step = int(step.split(";")[0])
  # Checked at once: the checkpoint of the step before was written asynchronously, and it must be
  # complete when the error reaches the caller (a CLI process exits right after it).
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps and steps[-1] == bad_step - 1, (bad_step, os.listdir(workdir / "checkpoints"))
  params = checkpoints.load_params(str(workdir), "student")
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))
  assert all(r["step"] < bad_step for r in _helpers.read_metrics(workdir))
  return bad_step


def test_distill_stops_on_a_nan_loss_and_keeps_the_last_good_checkpoint(small_teacher, tmp_path,
                                                                        monkeypatch):
  """An auxiliary loss that turns NaN at update 6 (injected into the compiled update's metrics):
  TrainingError naming aux_loss and step 6; checkpoint 5 is on disk and loads."""
  compile_updates = dmmd_run.compile_updates

  def poisoned(*args, **kwargs):
    calls = [0]

    def wrap(update):
      def run(state, teacher, batch):
        state, metrics = update(state, teacher, batch)
        calls[0] += 1
        if calls[0] == 6:
          metrics = dict(metrics, aux_loss=jnp.float32(jnp.nan))
        return state, metrics
      return run

    return dmmd_run.Updates(*map(wrap, compile_updates(*args, **kwargs)))

  monkeypatch.setattr(dmmd_run, "compile_updates", poisoned)
  workdir = tmp_path / "student"
  config = student_config(small_teacher, **_helpers.quiet_schedule("distill", 8, log_every=1,
                                                                   checkpoint_every=1))
  with pytest.raises(loop.TrainingError, match="aux_loss became nan at step 6") as info:
    dmmd_run.distill_student(config, str(workdir))
  assert _check_nan_stop(workdir, info, ["aux_loss"]) == 6


@pytest.mark.slow
def test_distill_diverging_learning_rate_stops_with_a_nan_loss(small_teacher, tmp_path):
  """learning_rate = 1e30 (a real divergence, not an injected NaN)."""
  workdir = tmp_path / "student"
  config = student_config(small_teacher, **{
      "distill.learning_rate": 1e30, "distill.aux_learning_rate": 1e30,
      "distill.warmup_steps": 0,
      **_helpers.quiet_schedule("distill", 20, log_every=1, checkpoint_every=1)})
  with pytest.raises(loop.TrainingError, match=r"(gen|aux)_loss became nan at step \d+") as info:
    dmmd_run.distill_student(config, str(workdir))
  _check_nan_stop(workdir, info, ["gen_loss", "aux_loss"])


@pytest.mark.slow
def test_student_may_choose_its_own_noise_input(small_teacher, tmp_path):
  """The noise input is the student's own: a noise size other than the teacher's is allowed, and
  its projection starts random (noise_init_scale) while everything else copies the teacher."""
  config = student_config(small_teacher, **{"model.noise_dim": 3,
                                            **_helpers.quiet_schedule("distill", 2)})
  assert dmmd_run.distill_student(config, str(tmp_path / "student")) == {"step": 2}
  student = checkpoints.load_params(str(tmp_path / "student"), "student")
  assert student["noise_proj"]["kernel"].shape == (3, 64)


def test_joint_update_is_a_student_and_an_aux_update_from_the_same_state():
  """distill.joint_updates: one draw, both networks. From one state and key, the joint update's
  student (and its EMA and optimizer state) equals the student-only update's and its auxiliary
  equals the auxiliary-only update's — the same two gradient estimators, so the same fixed point.
  (Fails if the generator loss's log-ratio lets gradient into the auxiliary; with the default
  hard targets the auxiliary loss has no path into the student to leak through.)"""
  config = config_lib.typed(_helpers.make_config(
      "digits", "tiny", **{"model.num_layers": 1, "model.width": 32, "distill.warmup_steps": 0}))
  setup = setup_lib.build_setup(config, 8)
  teacher = teacher_run.init_teacher_state(setup, teacher_run.teacher_optimizer(config))[0].params
  student_opt, aux_opt = dmmd_run.distill_optimizers(config)
  state = dmmd_run.init_distill_state(teacher, student_opt, aux_opt, setup.mesh,
                                      jax.random.key(1), 1.0)
  updates = dmmd_run.compile_updates(setup, setup_lib.estimator_config_of(config), student_opt,
                                     aux_opt, state_lib.shardings_of(state),
                                     state_lib.shardings_of(teacher))
  batch = sharding.global_batch(setup.train_tokens[:8], setup.mesh)
  state, _ = updates.aux(state, teacher, batch)  # auxiliary ≠ teacher: a non-zero student signal
  copy = functools.partial(jax.tree.map, jnp.copy)
  student_only, _ = updates.student(copy(state), teacher, batch)
  aux_only, _ = updates.aux(copy(state), teacher, batch)
  joint, metrics = updates.joint(copy(state), teacher, batch)
  assert {"student_grad_norm", "aux_grad_norm", "gen_loss", "aux_loss"} <= set(metrics)
  assert _helpers.tree_max_abs_diff(student_only.student, state.student) > 1e-6
  assert _helpers.tree_max_abs_diff(aux_only.aux, state.aux) > 1e-6
  for name, expected in (("student", student_only), ("student_ema", student_only),
                         ("student_opt", student_only), ("aux", aux_only),
                         ("aux_opt", aux_only)):
    assert _helpers.tree_max_abs_diff(getattr(joint, name), getattr(expected, name)) <= 1e-6, name
  assert int(joint.step) == int(state.step) + 1


def test_joint_updates_run_count_both_networks_each_update(small_teacher, tmp_path):
  """A joint-update run: every logged row has both losses and both gradient norms, and each
  network's schedule is sized to all num_steps updates."""
  config = student_config(small_teacher, **_helpers.quiet_schedule("distill", 4),
                          **{"distill.joint_updates": True})
  assert dmmd_run.update_counts(4, 1, joint=True) == (4, 4)
  dmmd_run.distill_student(config, str(tmp_path / "joint"))
  rows = _helpers.read_metrics(tmp_path / "joint")
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert all({"student_grad_norm", "aux_grad_norm"} <= set(r) for r in rows)


def _initial_state(config, workdir, monkeypatch):
  """The DistillState distill_student hands to the training loop (no update is run)."""
  seen = {}

  def capture(state, **kwargs):
    del kwargs
    seen["state"] = state
    return state

  monkeypatch.setattr(loop, "run_loop", capture)
  dmmd_run.distill_student(config, workdir)
  return seen["state"]


def test_warm_start_begins_at_the_given_students_parameters(small_teacher, tmp_path, monkeypatch):
  """distill.init_workdir (a curriculum over k): a k = 8 run starting from a trained k = 4
  student begins at that student's student / EMA / auxiliary parameters, at step 0; without it,
  the student and the auxiliary begin as copies of the teacher."""
  first = str(tmp_path / "k4")
  dmmd_run.distill_student(student_config(small_teacher, **_helpers.quiet_schedule("distill", 4),
                                          **{"distill.student_steps": 4,
                                             "distill.joint_updates": True}), first)
  warm = _initial_state(student_config(small_teacher, **{"distill.student_steps": 8,
                                                         "distill.init_workdir": first}),
                        str(tmp_path / "warm"), monkeypatch)
  cold = _initial_state(student_config(small_teacher, **{"distill.student_steps": 8}),
                        str(tmp_path / "cold"), monkeypatch)
  assert int(warm.step) == 0
  for name in ("student", "student_ema", "aux"):
    assert _helpers.tree_max_abs_diff(getattr(warm, name),
                                      checkpoints.load_params(first, name)) == 0.0, name
  teacher = checkpoints.load_params(small_teacher, "ema_params")
  shared = [k for k in teacher if k != "noise_proj"]
  assert _helpers.tree_max_abs_diff({k: cold.student[k] for k in shared},
                                    {k: teacher[k] for k in shared}) == 0.0
  assert _helpers.tree_max_abs_diff({k: warm.student[k] for k in shared},
                                    {k: teacher[k] for k in shared}) > 1e-5


def test_a_warm_started_run_resumes_without_its_init_workdir(small_teacher, tmp_path):
  """The starting student is read only before the first checkpoint: once the run has one, a
  rerun resumes from it even after the starting student's workdir is gone."""
  first, second = str(tmp_path / "k4"), str(tmp_path / "k8")
  dmmd_run.distill_student(student_config(small_teacher, **_helpers.quiet_schedule("distill", 1),
                                          **{"distill.student_steps": 4}), first)
  config = student_config(small_teacher, **_helpers.quiet_schedule("distill", 2),
                          **{"distill.student_steps": 8, "distill.init_workdir": first})
  assert dmmd_run.distill_student(config, second) == {"step": 2}
  shutil.rmtree(first)
  assert dmmd_run.distill_student(config, second) == {"step": 2}


@pytest.mark.parametrize("which, message", [
    ("missing", "does not exist"),
    ("teacher", "is a teacher run, not a D-MMD student"),
    ("other_teacher", "not this run's teacher"),
])
def test_warm_start_refuses_what_is_not_a_student_of_this_teacher(small_teacher, tmp_path, which,
                                                                  message):
  """One DistillError line, before the student workdir exists."""
  init = {"missing": str(tmp_path / "nothing"), "teacher": small_teacher}.get(which)
  if which == "other_teacher":  # another teacher run: a copy given its own run id
    other = _copy_teacher(small_teacher, str(tmp_path / "other_teacher"), run_id="another-run")
    init = str(tmp_path / "student_of_other")
    dmmd_run.distill_student(student_config(other, **_helpers.quiet_schedule("distill", 1)), init)
  workdir = tmp_path / "student"
  with pytest.raises(dmmd_run.DistillError, match=message) as info:
    dmmd_run.distill_student(student_config(small_teacher, **{"distill.init_workdir": init}),
                             str(workdir))
  assert "\n" not in str(info.value)
  assert not workdir.exists()


def _copy_teacher(teacher, destination, run_id=None):
  shutil.copytree(teacher, destination, ignore=shutil.ignore_patterns("lock"))
  if run_id is not None:
    path = os.path.join(destination, "run.json")
    info = {**workdir_lib.read_json(path), "run_id": run_id}
    with open(path, "w") as f:
      json.dump(info, f)
  return destination


def test_warm_start_accepts_a_student_of_the_same_teacher_moved(small_teacher, tmp_path):
  """The starting student was distilled from the teacher at another path (moved or copied: the
  same run id), as workdir_guard accepts on resume; its parameters are taken."""
  moved = _copy_teacher(small_teacher, str(tmp_path / "moved_teacher"))
  first = str(tmp_path / "k4")
  dmmd_run.distill_student(student_config(moved, **_helpers.quiet_schedule("distill", 1)), first)
  config = student_config(small_teacher, **_helpers.quiet_schedule("distill", 1),
                          **{"distill.student_steps": 8, "distill.init_workdir": first})
  assert dmmd_run.distill_student(config, str(tmp_path / "k8")) == {"step": 1}
