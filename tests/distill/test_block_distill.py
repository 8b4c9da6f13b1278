"""D-MMD for block-autoregressive models: all three networks read the data as clean context, and
the Shakespeare-char `block_tiny` preset trains a teacher, distils a student (masked and uniform,
with the noise input) and samples with prompts beyond the trained length, end to end."""

import _helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmmd_jax.data import prompts
from dmmd_jax.diffusion import forward_process
from dmmd_jax.distill import dmmd
from dmmd_jax.training import dmmd_run, teacher_run, trained_model

_CONTEXTS = []


def _record(clean):
  _CONTEXTS.append(np.asarray(clean))


def spy_apply(params, tokens, t, noise=None, clean=None):
  """Logits from params `[K]` plus the clean token at the same position; records `clean`."""
  del t, noise
  jax.debug.callback(_record, clean)
  k = params.shape[-1]
  return (params + 2.0 * jax.nn.one_hot(clean, k) + 0.0 * tokens[..., None]).astype(jnp.float32)


@pytest.mark.parametrize("kind", ["masked", "uniform"])
def test_student_teacher_and_auxiliary_read_the_same_clean_context(kind):
  kernel = forward_process.ForwardProcess(kind, 3)
  x = jnp.asarray(np.random.default_rng(0).integers(0, 3, (4, 6)), jnp.int32)
  cfg = dmmd.EstimatorConfig(student_steps=2, samples_per_z=2, context=True, use_noise=False)
  params = jnp.zeros(3)
  _CONTEXTS.clear()
  out = dmmd.moment_matching_estimator(params, params + 0.1, params, x, jax.random.key(0),
                                          apply_fn=spy_apply, kernel=kernel, cfg=cfg)
  jax.effects_barrier()
  assert len(_CONTEXTS) >= 3  # student, teacher and auxiliary
  for clean in _CONTEXTS:
    np.testing.assert_array_equal(clean.reshape(-1, *x.shape)[0], x)
  assert np.isfinite(float(out["gen_loss"])) and np.isfinite(float(out["aux_loss"]))


def _block_run(tmp_path, kind):
  overrides = {**_helpers.quiet_schedule("train", 3), **_helpers.quiet_schedule("distill", 2),
               "kernel.kind": kind, "distill.uniform_noise": True}
  teacher, student = str(tmp_path / "teacher"), str(tmp_path / "student")
  config = _helpers.make_config("shakespeare_char", "block_tiny", **overrides)
  assert np.isfinite(teacher_run.train_teacher(config, teacher)["eval_bpt"])
  config = _helpers.make_config("shakespeare_char", "block_tiny", **overrides,
                                **{"distill.teacher_workdir": teacher})
  assert dmmd_run.distill_student(config, student) == {"step": 2}
  rows = _helpers.read_metrics(student)
  assert {"gen_loss", "aux_loss"} <= {k for r in rows for k in r}
  assert all(np.isfinite(r[k]) for r in rows for k in ("gen_loss", "aux_loss") if k in r)
  return teacher, student


@pytest.mark.parametrize("kind", ["masked", pytest.param("uniform", marks=pytest.mark.slow)])
def test_block_tiny_trains_distils_and_samples_with_prompts(tmp_path, kind):
  teacher, student = _block_run(tmp_path, kind)
  model = trained_model.load(student)
  assert model.setup.is_block and model.noise_fn() is not None
  info = model.setup.info
  prompt = prompts.from_flags(info, "ROMEO:")
  length = 2 * model.setup.seq_len + model.setup.model_cfg.block_size  # sliding context
  samples = model.sample(3, prompt=prompt, length=length)
  assert samples.shape == (3, length)
  np.testing.assert_array_equal(samples[:, :6], np.tile(prompt.tokens, (3, 1)))
  assert samples.min() >= 0 and samples.max() < info.vocab_size
  with pytest.raises(ValueError, match="multiple of the block size"):
    model.sample(2, length=model.setup.seq_len + 1)
  bits = trained_model.load(teacher).negative_elbo_bits(model.setup.eval_tokens[:4])
  assert np.isfinite(bits) and bits > 0  # the block teacher's ELBO (after 3 steps)
