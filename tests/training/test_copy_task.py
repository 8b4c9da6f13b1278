"""Beyond single tokens: the copy task through the real training path (train_teacher →
distill_student → trained_model.load(...).sample).

A fair coin copied to the second position. A 1-step teacher samples the two positions
independently (agreement 1/2); a 1-step D-MMD student must learn the correlation. These runs take
minutes and are marked slow; they print what they measure (`pytest -s`).
"""


import _helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmmd_jax.training import dmmd_run, teacher_run, trained_model

# ------------------------------------------------------------------------------------------------

COPY_TEACHER = {"data.vocab_size": 2, "train.batch_size": 64, "train.learning_rate": 3e-3,
                "train.ema_decay": 0.99, **_helpers.quiet_schedule("train", 600, log_every=100)}
COPY_STUDENT = {"distill.student_steps": 1, "distill.batch_size": 64,
                "distill.learning_rate": 3e-4, "distill.aux_learning_rate": 1e-3}
NUM_SAMPLES = 4000


@pytest.fixture(scope="module")
def copy_data(tmp_path_factory):
  return _helpers.copy_task_tokens(tmp_path_factory.mktemp("copy_data") / "copy.npy")


def copy_config(data_path, kind="masked", **overrides):
  return _helpers.make_config("npy_tokens", **{
      "data.path": data_path, "kernel.kind": kind, **COPY_TEACHER, **COPY_STUDENT, **overrides})


@pytest.fixture(scope="module")
def copy_teachers(copy_data, tmp_path_factory):
  """Trains (once per module, on first use) the 600-step copy-task teacher of a kernel."""
  done = {}

  def get(kind):
    if kind not in done:
      workdir = str(tmp_path_factory.mktemp(f"copy_teacher_{kind}"))
      teacher_run.train_teacher(copy_config(copy_data, kind), workdir)
      done[kind] = workdir
    return done[kind]

  return get


def distil_copy_task(copy_data, teacher, workdir, kind, num_steps, **overrides):
  config = copy_config(copy_data, kind, **{
      "distill.teacher_workdir": teacher,
      **_helpers.quiet_schedule("distill", num_steps, log_every=100), **overrides})
  assert dmmd_run.distill_student(config, workdir) == {"step": num_steps}
  return trained_model.load(workdir).sample(NUM_SAMPLES, seed=1)


def describe(name, tokens):
  freqs = [np.bincount(tokens[:, i], minlength=2) / len(tokens) for i in range(2)]
  line = (f"{name}: agree {_helpers.agreement(tokens):.3f}, value frequencies pos1 "
          f"{np.round(freqs[0], 3).tolist()} pos2 {np.round(freqs[1], 3).tolist()}")
  print(line)
  return freqs


def check_teacher(teacher):
  model = trained_model.load(teacher)
  one_step = model.sample(NUM_SAMPLES, steps=1, seed=1)
  many_steps = model.sample(NUM_SAMPLES, steps=64, seed=1)
  describe("teacher 1 step", one_step)
  describe("teacher 64 steps", many_steps)
  assert abs(_helpers.agreement(one_step) - 0.5) < 0.06  # independent guesses
  assert _helpers.agreement(many_steps) > 0.95  # the teacher did learn the copy


# Tuned through config overrides (not the library) so that the masked student converges reliably
# within the test: the recipe and its success rate over student seeds are in RESULTS.md §2
# (`python bench/copy_task.py`).
MASKED_STUDENT = {"distill.noise_init_scale": 10.0, "distill.learning_rate": 1e-3,
                  "distill.aux_learning_rate": 3e-3}
MASKED_STEPS = 1500


@pytest.mark.slow
def test_copy_task_masked_student_learns_the_correlation(copy_data, copy_teachers, tmp_path):
  """Masked kernel, k = 1: the student agrees ≥ 95% while both values keep frequency in
  [0.35, 0.65] (the 1-step teacher agrees only ≈ 1/2)."""
  teacher = copy_teachers("masked")
  check_teacher(teacher)
  tokens = distil_copy_task(copy_data, teacher, str(tmp_path / "student"), "masked",
                            MASKED_STEPS, **MASKED_STUDENT)
  freqs = describe(f"masked student ({MASKED_STEPS} updates)", tokens)
  assert _helpers.agreement(tokens) >= 0.95
  assert all(0.35 <= f <= 0.65 for pos in freqs for f in pos)


UNIFORM_STUDENT = {"distill.uniform_noise": True, "distill.noise_init_scale": 10.0,
                   "distill.learning_rate": 1e-3, "distill.aux_learning_rate": 3e-3}


@pytest.mark.slow
def test_copy_task_uniform_student_learns_the_correlation(copy_data, copy_teachers, tmp_path):
  """Uniform kernel, k = 1, with the student's noise input (distill.uniform_noise): the student
  agrees ≥ 95% while both values keep frequency in [0.35, 0.65] (recipe and success rate over
  seeds: RESULTS.md §2)."""
  teacher = copy_teachers("uniform")
  check_teacher(teacher)
  tokens = distil_copy_task(copy_data, teacher, str(tmp_path / "student"), "uniform", 1500,
                            **UNIFORM_STUDENT)
  freqs = describe("uniform student with noise input (1500 updates)", tokens)
  assert _helpers.agreement(tokens) >= 0.95
  assert all(0.35 <= f <= 0.65 for pos in freqs for f in pos)


@pytest.mark.slow
def test_copy_task_uniform_student_without_noise_misses_the_bounds(copy_data, copy_teachers,
                                                                   tmp_path):
  """Finding: the paper's uniform student (no noise input; its randomness is z_1 alone) learns
  part of the correlation (agreement well above the 1-step teacher's ≈ 1/2) but does not reach
  what the student with the noise input reaches (agreement ≥ 0.95 with balanced values). How it
  misses depends on the seed: low agreement with balanced values, or a map z_1 → x that sends
  z_1 = 01 and 10 to the same value (an OR / AND of the noise tokens, frequencies ≈ 1/4 : 3/4);
  RESULTS.md §2 has the runs."""
  teacher = copy_teachers("uniform")
  workdir = str(tmp_path / "student")
  tokens = distil_copy_task(copy_data, teacher, workdir, "uniform", 1500)
  freqs = describe("uniform student without noise (1500 updates)", tokens)
  model = trained_model.load(workdir)
  z_1 = jnp.array([[0, 0], [0, 1], [1, 0], [1, 1]], jnp.int32)
  p_one = jax.nn.softmax(model.setup.apply_fn(model.params, z_1, jnp.ones(4)), -1)[..., 1]
  print("uniform student P(x_i = 1 | z_1) for z_1 = 00, 01, 10, 11:",
        np.round(np.asarray(p_one), 3).tolist())
  agreement = _helpers.agreement(tokens)
  assert agreement >= 0.65
  assert not (agreement >= 0.95 and all(0.35 <= f <= 0.65 for pos in freqs for f in pos))


@pytest.mark.slow
def test_copy_task_zero_noise_init_collapses(copy_data, copy_teachers, tmp_path):
  """Finding (documented, reproducible here): with the paper's zero-initialised noise projection
  (noise_init_scale = 0) the expected gradient on the projection is zero at the start, and the
  masked student collapses to a single value (agreement ≈ 1 but one value ≈ always) before it
  learns to use its noise."""
  teacher = copy_teachers("masked")
  tokens = distil_copy_task(copy_data, teacher, str(tmp_path / "student"), "masked", 800,
                            **{"distill.noise_init_scale": 0.0})
  freqs = describe("masked student, noise_init_scale=0 (800 updates)", tokens)
  assert _helpers.agreement(tokens) > 0.95
  assert max(freqs[0]) > 0.95 and max(freqs[1]) > 0.95
