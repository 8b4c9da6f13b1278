"""Prompted and infilled sampling: `prompts.py` and the sampler's `fixed` / `fixed_tokens` arrays.

The conditional tests use the exact denoiser of a small joint distribution p over V^L (V = 3,
L = 3): at a masked position it returns p(x_i | the unmasked tokens), by enumeration. With a
masked kernel and the uniform grid, every masked position unmasks at a step drawn uniformly from
the k steps, independently of the others, so a k-step sample of two free positions is exactly

    (1 − 1/k) p(x_1, x_2 | prompt) + (1/k) p(x_1 | prompt) p(x_2 | prompt)

(the second term: both unmask at the same step, each from its marginal).
"""

import itertools

import _helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmmd_jax.data import prompts, tokenizers
from dmmd_jax.diffusion import forward_process, sampling
from dmmd_jax.diffusion.sampling import SamplerConfig
from dmmd_jax.infra import workdir as workdir_lib

V, L = 3, 3
ALL_X = np.array(list(itertools.product(range(V), repeat=L)), np.int32)  # [V^L, L]
LOG_JOINT = np.log(np.random.default_rng(0).dirichlet(np.full(len(ALL_X), 0.7)))


def joint_posterior_apply(params, tokens, t, noise):
  """Exact masked denoiser of the joint p (params = log p `[V^L]`): logits `[batch, L, V]`."""
  del t, noise
  all_x = jnp.asarray(ALL_X)
  visible = tokens[:, None, :] != V  # MASK id = V
  consistent = jnp.all(~visible | (tokens[:, None, :] == all_x[None]), axis=-1)  # [batch, V^L]
  weights = jax.nn.softmax(jnp.where(consistent, params[None], -jnp.inf), axis=-1)
  marginals = jnp.einsum("bx,xlc->blc", weights, jax.nn.one_hot(all_x, V))
  return jnp.log(jnp.maximum(marginals, 1e-30)).astype(jnp.float32)


def noisy_apply(params, tokens, t, noise):
  """Logits depending on tokens, t and the student noise `[batch, L]` (uniform or masked)."""
  emb = params[tokens]
  return (emb + jnp.roll(emb, 1, axis=1) + noise[..., None] + t[:, None, None]).astype(
      jnp.float32)


def length_noise(key, batch_size):
  return jax.random.normal(key, (batch_size, L))


def pair_frequencies(tokens, free):
  pairs = tokens[:, free[0]] * V + tokens[:, free[1]]
  return np.bincount(pairs, minlength=V * V) / len(tokens)


def conditional(fixed_values: dict):
  """p(x | x_i = v for the fixed positions) over all sequences `[V^L]`."""
  p = np.exp(LOG_JOINT) * np.all([ALL_X[:, i] == v for i, v in fixed_values.items()], axis=0)
  return p / p.sum()


def assert_frequencies(freq, probs, n):
  se = np.sqrt(probs * (1 - probs) / n)
  assert np.all(np.abs(freq - probs) < 5 * se + 1e-9), (freq, probs)


N = 40_000


@pytest.mark.parametrize("steps", [1, 4])
def test_prompted_completion_matches_brute_force(steps):
  """Prompt x_0 = 2: the two free positions follow the exact k-step law (formula above)."""
  kernel = forward_process.ForwardProcess("masked", V)
  fixed = np.array([[True, False, False]])
  fixed_tokens = np.array([[2, 0, 0]])
  out = np.asarray(sampling.sample(
      jax.random.key(steps), joint_posterior_apply, jnp.asarray(LOG_JOINT, jnp.float32), kernel,
      SamplerConfig(steps=steps), N, L, None, fixed, fixed_tokens))
  assert np.all(out[:, 0] == 2)
  cond = conditional({0: 2}).reshape(V, V, V)[2]  # [x_1, x_2]
  product = np.outer(cond.sum(1), cond.sum(0))
  expected = (1 - 1 / steps) * cond + product / steps
  assert_frequencies(pair_frequencies(out, (1, 2)), expected.ravel(), N)


def test_infilling_matches_the_exact_conditional():
  """Template x_0 = 1, x_2 = 0: the middle token follows p(x_1 | x_0, x_2) at any step count."""
  kernel = forward_process.ForwardProcess("masked", V)
  fixed = np.array([[True, False, True]])
  fixed_tokens = np.array([[1, 0, 0]])
  out = np.asarray(sampling.sample(
      jax.random.key(3), joint_posterior_apply, jnp.asarray(LOG_JOINT, jnp.float32), kernel,
      SamplerConfig(steps=3), N, L, None, fixed, fixed_tokens))
  assert np.all(out[:, 0] == 1) and np.all(out[:, 2] == 0)
  cond = conditional({0: 1, 2: 0}).reshape(V, V, V)[1, :, 0]
  assert_frequencies(np.bincount(out[:, 1], minlength=V) / N, cond, N)


@pytest.mark.parametrize("kind", ["masked", "uniform"])
def test_fixed_tokens_never_change_and_the_rest_is_sampled(kind):
  """Per-row prompts, a student with noise input, 16 steps: every fixed token comes out exactly,
  and the free positions are not constant (they are sampled)."""
  kernel = forward_process.ForwardProcess(kind, V)
  rng = np.random.default_rng(1)
  batch = 64
  fixed = rng.random((batch, L)) < 0.5
  fixed_tokens = rng.integers(0, V, (batch, L))
  params = jnp.asarray(rng.normal(size=(kernel.input_vocab_size, V)), jnp.float32)
  out = np.asarray(sampling.sample(jax.random.key(0), noisy_apply, params, kernel,
                                   SamplerConfig(steps=16), batch, L, length_noise, fixed,
                                   fixed_tokens))
  np.testing.assert_array_equal(out[fixed], fixed_tokens[fixed])
  assert out.min() >= 0 and out.max() < V
  assert len(np.unique(out[~fixed])) == V


def test_uniform_clamping_keeps_free_marginals_of_product_data():
  """Uniform kernel, product data: clamped positions do not disturb the free ones' marginals."""
  probs = np.array([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
  kernel = forward_process.ForwardProcess("uniform", V)

  out = np.asarray(sampling.sample(
      jax.random.key(5), _uniform_product_apply, jnp.log(jnp.asarray(probs, jnp.float32)),
      kernel, SamplerConfig(steps=64), N, L, None, np.array([[False, True, False]]),
      np.array([[0, 2, 0]])))
  assert np.all(out[:, 1] == 2)
  for i in (0, 2):
    assert_frequencies(np.bincount(out[:, i], minlength=V) / N, probs[i], N)


def _uniform_product_apply(params, tokens, t, noise):
  """Exact E[x_i | z_t] of product data with log p_i = params `[L, K]`, uniform linear kernel."""
  del noise
  alpha = (1.0 - t)[:, None, None]
  lik = alpha * jax.nn.one_hot(tokens, V) + (1.0 - alpha) / V
  return (params[None] + jnp.log(lik)).astype(jnp.float32)


# ------------------------------------------------------------------------------------------------
# Parsing and checks.

CHARS = tokenizers.CharTokenizer("abc _")


def test_text_prompt_and_template():
  p = prompts.from_text("ab c", CHARS)
  np.testing.assert_array_equal(p.tokens, CHARS.encode("ab c"))
  assert p.fixed.all()
  t = prompts.from_text("a__b_", CHARS, fill_marker="_")
  np.testing.assert_array_equal(t.fixed, [True, False, False, True, False])
  fixed, tokens = t.arrays(2, 7, CHARS.vocab_size)
  assert fixed.shape == tokens.shape == (2, 7)
  np.testing.assert_array_equal(fixed[1], [True, False, False, True, False, False, False])
  np.testing.assert_array_equal(tokens[0, [0, 3]], CHARS.encode("ab"))


def test_token_file_prompts(tmp_path):
  path = tmp_path / "p.npy"
  np.save(path, np.array([[1, 2], [3, 0]]))
  fixed, tokens = prompts.from_token_file(str(path)).arrays(2, 4, 5)
  np.testing.assert_array_equal(tokens, [[1, 2, 0, 0], [3, 0, 0, 0]])
  np.testing.assert_array_equal(fixed, [[True, True, False, False]] * 2)
  fixed, tokens = prompts.from_tokens(np.array([[1, 2], [3, 0]])).arrays(2, 3, 5)
  np.testing.assert_array_equal(tokens, [[1, 2, 0], [3, 0, 0]])
  np.testing.assert_array_equal(fixed, [[True, True, False]] * 2)


@pytest.mark.parametrize("case, message", [
    ("too_long", "has 6 tokens but the model generates only 5"),
    ("out_of_vocabulary", "vocabulary"),
    ("token_range", "must lie in [0, 5)"),
    ("rows", "rows but 3 samples"),
    ("two_sources", "at most one of"),
])
def test_bad_prompts_raise_one_line(tmp_path, case, message):
  info = type("Info", (), {"kind": "text", "tokenizer": CHARS.spec()})()
  path = tmp_path / "p.npy"
  with pytest.raises(prompts.PromptError, match=message.replace("[", r"\[").replace(")", r"\)")):
    if case == "too_long":
      prompts.from_flags(info, "abcabc").arrays(3, 5, CHARS.vocab_size)
    elif case == "out_of_vocabulary":
      prompts.from_flags(info, "abz")
    elif case == "token_range":
      np.save(path, np.array([1, 7]))
      prompts.from_flags(info, token_file=str(path)).arrays(3, 5, CHARS.vocab_size)
    elif case == "rows":
      np.save(path, np.zeros((2, 2), np.int32))
      prompts.from_flags(info, token_file=str(path)).arrays(3, 5, CHARS.vocab_size)
    else:
      prompts.from_flags(info, "ab", token_file=str(path))


# ------------------------------------------------------------------------------------------------
# The sample binary (a Shakespeare-char `tiny` teacher trained for 8 steps).

SAMPLE = _helpers.EXPERIMENTS / "sample.py"


@pytest.fixture(scope="module")
def char_teacher(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("prompts") / "teacher"
  proc = _helpers.run_python([_helpers.EXPERIMENTS / "train_teacher.py",
                              "--config=configs/shakespeare_char.py:tiny",
                              *_helpers.quiet_schedule_flags(8), f"--workdir={workdir}"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


def test_sample_binary_keeps_prompt_and_template(char_teacher, tmp_path):
  info = workdir_lib.load_run_info(char_teacher)["data_info"]
  tok = tokenizers.tokenizer_from_spec(info.tokenizer)
  for name, flags in (("prompt", ["--prompt=ROMEO:"]),
                      ("template", ["--prompt=To be, or __ to be", "--fill_marker=_"])):
    output = tmp_path / f"{name}.npy"
    proc = _helpers.run_python([SAMPLE, f"--workdir={char_teacher}", "--num_samples=4",
                                "--steps=8", f"--output={output}", *flags])
    assert proc.returncode == 0, proc.stderr[-3000:]
    tokens = np.load(output)
    assert tokens.shape == (4, info.seq_len)
    if name == "prompt":
      assert all(tok.decode(row).startswith("ROMEO:") for row in tokens)
    else:
      text = [tok.decode(row) for row in tokens]
      assert all(t.startswith("To be, or ") and t[12:18] == " to be" for t in text), text


@pytest.mark.parametrize("flag, expected", [
    ("--prompt=" + "a" * 40, "has 40 tokens but the model generates only 32"),
    ("--prompt=ROMEO€", "vocabulary"),
    ("--length=64", "generates exactly 32 tokens"),
])
def test_sample_binary_bad_prompt_is_one_error_line(char_teacher, tmp_path, flag, expected):
  output = tmp_path / "s.npy"
  proc = _helpers.run_python([SAMPLE, f"--workdir={char_teacher}", f"--output={output}", flag])
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
  assert not output.exists()
