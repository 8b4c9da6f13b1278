"""Tests of the evaluation suite: reference LM storage, metric registry, evaluate/score, outputs.

Models are stand-ins over the exact-likelihood mirror source (no diffusion network to compile):
with s sampling steps a stand-in breaks the mirror of a fraction 1/s of its samples, so every
metric has a known direction. The workdir path through real teachers and students is tested in
test_eval_binaries.py.
"""

import csv
import importlib.util
import json
import os
import pathlib
import types

import jax
import numpy as np
import pytest

from dmmd_jax.data import synthetic
from dmmd_jax.data import types as data_types
from dmmd_jax.evaluation import compare, registry, report
from dmmd_jax.evaluation import metrics as metrics_lib
from dmmd_jax.models import reference_lm
from dmmd_jax.training import reference_lm_run

ROOT = pathlib.Path(__file__).resolve().parents[2]
SOURCE = synthetic.SyntheticSource(vocab_size=8, seq_len=16, seed=0, concentration=0.1)
INFO = data_types.DataInfo("text", 8, 16)


class StandIn:
  """A `runs.Model` stand-in: samples of the source whose second half is replaced by uniform
  noise with probability 1/steps (so more steps → more mirrored samples); a prompt's tokens
  overwrite the positions it fixes."""

  def __init__(self, workdir, kind, setup, student_steps=None):
    self.workdir, self.kind, self.setup, self.student_steps = workdir, kind, setup, student_steps
    self.calls, self.prompts = [], []

  def sample(self, num_samples, steps=None, seed=0, batch_size=None, on_chunk=None, prompt=None):
    self.calls.append((num_samples, steps, seed, batch_size))
    self.prompts.append(prompt)
    rng = np.random.default_rng([seed, steps])
    tokens = synthetic.sample(SOURCE, num_samples, seed=int(rng.integers(1 << 30)))
    broken = rng.random(num_samples) < 1.0 / steps
    tokens[broken, 8:] = rng.integers(0, 8, (int(broken.sum()), 8))
    if prompt is None:
      return tokens
    fixed, fixed_tokens = prompt.arrays(num_samples, tokens.shape[1], 8)
    return np.where(fixed, fixed_tokens, tokens)

  def negative_elbo_bits(self, tokens):
    """Stand-in for the teacher ELBO: exact NLL of the valid samples in bits/token."""
    return synthetic.exact_nll(SOURCE, tokens).nll / (16 * np.log(2.0))


def _setup(info=INFO):
  data = synthetic.sample(SOURCE, 1200, seed=11)
  return types.SimpleNamespace(info=info, train_tokens=data[:1000], eval_tokens=data[1000:],
                               config=None)


def _load_config(name):
  spec = importlib.util.spec_from_file_location(name, ROOT / f"configs/{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def synthetic_npy(tmp_path_factory):
  return str(synthetic.write_dataset(SOURCE, 1200, tmp_path_factory.mktemp("syn") / "m.npy"))


@pytest.fixture(scope="module")
def reference(synthetic_npy, tmp_path_factory):
  """The tiny reference LM preset trained on the synthetic source, stored and reloaded."""
  config = _load_config("reference_lm").get_config("tiny")
  config.data.source, config.data.path = "npy", synthetic_npy
  config.data.vocab_size, config.data.seq_len, config.data.eval_fraction = 8, 0, 0.1
  config.train.num_steps = 150
  workdir = str(tmp_path_factory.mktemp("ref_lm"))
  result = reference_lm_run.train_reference(config, workdir, progress=False)
  return result, reference_lm.load(workdir), workdir


def test_reference_lm_learns_and_reloads(reference):
  result, lm, workdir = reference
  assert result["eval_nll"] < 0.8 * np.log(8)
  assert np.isclose(result["eval_ppl"], np.exp(result["eval_nll"]))
  record = json.load(open(os.path.join(workdir, reference_lm.RECORD_FILE)))
  assert record["config"]["vocab_size"] == 8 and record["history"]["step"][-1] == 150
  data = synthetic.sample(SOURCE, 64, seed=3)
  assert lm.config == reference_lm.ReferenceLMConfig(8, 16, 1, 32, 2)
  nll = reference_lm_run.evaluate_nll(lm.params, data, config=lm.config)
  assert np.isclose(-float(np.mean(lm.log_prob_fn(data))), nll, rtol=1e-5)
  np.testing.assert_allclose(lm.loglik_fn(lm.params, data), np.mean(lm.log_prob_fn(data), 1),
                             rtol=1e-5)


def test_reference_lm_compatibility_errors(reference):
  lm = reference[1]
  lm.check_compatible(INFO)
  lm.check_compatible(data_types.DataInfo("text", 8, 12))  # shorter samples fit
  with pytest.raises(ValueError, match="vocabulary of 8 tokens but the samples use 9"):
    lm.check_compatible(data_types.DataInfo("text", 9, 16))
  with pytest.raises(ValueError, match="at most 16 tokens"):
    lm.check_compatible(data_types.DataInfo("text", 8, 32))
  with pytest.raises(ValueError, match="tokenizer"):
    lm.check_compatible(data_types.DataInfo("text", 8, 16, tokenizer={"kind": "char"}))


def test_missing_reference_lm_directory(tmp_path):
  with pytest.raises(ValueError, match="not a reference-LM directory"):
    reference_lm.load(str(tmp_path))


def test_metric_names_and_requirements():
  teacher = StandIn("t", "teacher", _setup())
  registry.check_metrics(registry.METRICS, teacher)
  with pytest.raises(ValueError, match="unknown metric.*fid"):
    registry.check_metrics(["mmd2", "fid"])
  with pytest.raises(ValueError, match="unknown metric"):
    registry.check_metrics([])
  for name, flag in [("gm", "--reference_lm"), ("gen_ppl", "--reference_lm"),
                     ("frechet", "--feature_net"), ("precision_recall", "--feature_net"),
                     ("confidence", "--feature_net"),
                     ("copy_rate", "synthetic"), ("exact_nll", "synthetic"),
                     ("teacher_nelbo", "teacher")]:
    with pytest.raises(ValueError, match=f"metric {name} needs .*{flag}"):
      registry.check_metrics([name], StandIn("s", "student", _setup(), 4))
  assert registry.ALL_METRICS == tuple(registry.REGISTRY)


def test_score_rejects_out_of_range_ids():
  held_out = synthetic.sample(SOURCE, 20, seed=1)
  with pytest.raises(ValueError, match=r"ids in \[8, 8\], outside the vocabulary \[0, 8\)"):
    registry.score(np.full((5, 16), 8), held_out, None, 8, ["entropy"])
  with pytest.raises(ValueError, match="length 15"):
    registry.score(np.zeros((5, 15), int), held_out, None, 8, ["entropy"])


def test_score_exact_metrics_and_reference_lm_metrics(reference):
  lm = reference[1]
  resources = registry.Resources(reference_lm=lm, synthetic=SOURCE, gm_pairs=8)
  names = ["entropy", "gen_ppl", "gm", "copy_rate", "exact_nll"]
  data = synthetic.sample(SOURCE, 512, seed=5)
  held_out = synthetic.sample(SOURCE, 512, seed=6)
  real = registry.score(data, held_out, None, 8, names, resources=resources)
  assert list(real) == ["entropy", "gen_ppl", "gm", "gm_se", "copy_rate",
                        "copy_position_agreement", "exact_nll", "valid_fraction"]
  assert real["copy_rate"] == 1.0 and real["valid_fraction"] == 1.0
  assert abs(real["exact_nll"] - synthetic.entropy(SOURCE)) < 0.5
  assert abs(real["gm"]) < 3 * real["gm_se"]
  # Repeating one typical sequence keeps perplexity but not the gradient moment.
  nll = -np.asarray(lm.loglik_fn(lm.params, data))
  typical = data[np.argmin(np.abs(nll - nll.mean()))]
  repeated = registry.score(np.tile(typical, (512, 1)), held_out, None, 8, names,
                              resources=resources)
  assert 0.8 < repeated["gen_ppl"] / real["gen_ppl"] < 1.25
  assert repeated["gm"] > real["gm"] + 5 * max(real["gm_se"], repeated["gm_se"])


def _brute_force_nll(lm, tokens, start):
  """−log p(tokens[:, i] | tokens[:, :i]) `[n, L − start]`, one truncated forward per position."""
  columns = []
  for i in range(start, tokens.shape[1]):
    logits = reference_lm.next_token_logits(lm.params, tokens[:, :i], config=lm.config)[:, -1]
    log_probs = np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64)), np.float64)
    columns.append(-log_probs[np.arange(len(tokens)), tokens[:, i]])
  return np.stack(columns, axis=1)


def test_continuation_nll_given_the_prompt_is_the_brute_force_one(reference):
  lm, prompt_len = reference[1], 5
  samples = synthetic.sample(SOURCE, 40, seed=7)
  samples[::3, prompt_len:] = np.random.default_rng(0).integers(0, 8, (14, 16 - prompt_len))
  nll = _brute_force_nll(lm, samples, prompt_len)
  resources = registry.Resources(reference_lm=lm, micro_batch=16)
  scored = registry.score(samples, synthetic.sample(SOURCE, 40, seed=8), None, 8,
                          ["gen_ppl", "entropy"], resources=resources, prompt_len=prompt_len)
  np.testing.assert_allclose(np.log(scored["gen_ppl"]), nll.mean(), rtol=1e-5)
  # Scoring the prompt too would differ: the prefix tokens are not part of the continuation.
  unprompted = registry.score(samples, samples, None, 8, ["gen_ppl"], resources=resources)
  assert abs(np.log(unprompted["gen_ppl"]) - nll.mean()) > 0.01
  np.testing.assert_allclose(lm.loglik_fn_from(prompt_len)(lm.params, samples),
                             -nll.mean(axis=1), rtol=1e-5)
  assert lm.loglik_fn_from(prompt_len) is lm.loglik_fn_from(prompt_len)
  entropy = metrics_lib.unigram_entropy(samples[:, prompt_len:], 8)
  assert scored["entropy"] == pytest.approx(float(entropy))


def test_gm_pairs():
  assert registry.gm_pairs(1024, 1024) == 16
  assert registry.gm_pairs(64, 200) == 8
  assert registry.gm_pairs(10, 10) == 2
  with pytest.raises(ValueError):
    registry.gm_pairs(3, 100)


def test_evaluate_with_stand_in_models():
  setup = _setup()
  teacher = StandIn("runs/a/teacher", "teacher", setup)
  student = StandIn("runs/b/k4", "student", setup, student_steps=4)
  other = StandIn("runs/c/teacher", "teacher", setup)
  seen, lines = [], []
  rows = compare.evaluate(
      [teacher, student, other], compare.steps_for_models([2, 4, 16]), 100, teacher,
      ["mmd2", "teacher_nelbo", "entropy", "copy_rate", "exact_nll"], batch_size=64,
      progress=lines.append, resources=registry.Resources(synthetic=SOURCE),
      extra_samples=[("repeated", np.tile(setup.eval_tokens[:1], (100, 1)))],
      on_samples=lambda *args: seen.append(args[:2]), bars=False)
  assert [(r.model, r.kind, r.steps) for r in rows] == [
      ("data (held-out)", "data", 0), ("repeated", "samples", 0),
      ("a/teacher", "teacher", 2), ("a/teacher", "teacher", 4), ("a/teacher", "teacher", 16),
      ("k4", "student", 4), ("k4", "student", 16),
      ("c/teacher", "teacher", 2), ("c/teacher", "teacher", 4), ("c/teacher", "teacher", 16)]
  assert seen == [(r.model, r.steps) for r in rows[2:]] and len(lines) == len(rows) - 1
  # One call per (model, steps); the model draws in chunks of batch_size (trained_model.Model).
  assert teacher.calls[:2] == [(100, 2, 0, 64), (100, 4, 0, 64)]
  by = {(r.model, r.steps): r.metrics for r in rows}
  assert by[("data (held-out)", 0)]["copy_rate"] == 1.0
  rates = [by[("a/teacher", s)]["copy_rate"] for s in (2, 4, 16)]
  assert rates[0] < rates[1] < rates[2] and abs(rates[0] - 0.5) < 0.15
  assert by[("a/teacher", 2)]["valid_fraction"] == pytest.approx(rates[0])
  assert by[("a/teacher", 2)]["mmd2"] > by[("a/teacher", 16)]["mmd2"]
  assert by[("repeated", 0)]["mmd2"] > by[("data (held-out)", 0)]["mmd2"] + 10 * by[
      ("repeated", 0)]["mmd2_se"]


def test_prompted_evaluation_continues_the_held_out_prefixes():
  setup = _setup()
  teacher = StandIn("runs/teacher", "teacher", setup)
  student = StandIn("runs/k4", "student", setup, student_steps=4)
  seen = []
  rows = compare.evaluate(
      [teacher, student], compare.steps_for_models([2, 8]), 64, teacher, ["mmd2", "entropy"],
      batch_size=32, progress=None, on_samples=lambda *args: seen.append(args), bars=False,
      prompt_len=6)
  held_out = setup.eval_tokens[:64]
  assert [(name, steps) for name, steps, _ in seen] == [("teacher", 2), ("teacher", 8),
                                                        ("k4", 4), ("k4", 8)]
  for _, _, samples in seen:
    np.testing.assert_array_equal(samples[:, :6], held_out[:, :6])
    assert not np.array_equal(samples[:, 6:], held_out[:, 6:])
  for prompt in teacher.prompts + student.prompts:
    np.testing.assert_array_equal(prompt.tokens, held_out[:, :6])
    assert prompt.fixed.all()
  by = {(r.model, r.steps): r.metrics for r in rows}
  entropy = metrics_lib.unigram_entropy(seen[0][2][:, 6:], 8)
  assert by[("teacher", 2)]["entropy"] == pytest.approx(float(entropy))
  with pytest.raises(ValueError, match="one held-out row per sample: .* 200 eval rows"):
    compare.evaluate([teacher], lambda m: [2], 201, teacher, ["entropy"], bars=False,
                     prompt_len=6)


@pytest.mark.parametrize("prompt_len", [0, -1, 16, 40])
def test_a_bad_prompt_len_is_refused_before_sampling(prompt_len):
  teacher = StandIn("t", "teacher", _setup())
  with pytest.raises(ValueError, match=rf"--prompt_len must lie in \[1, 16\).*got {prompt_len}"):
    compare.evaluate([teacher], lambda m: [2], 10, teacher, ["entropy"], bars=False,
                     prompt_len=prompt_len)
  assert teacher.calls == []
  with pytest.raises(ValueError, match="--prompt_len must lie in"):
    registry.score(np.zeros((5, 16), int), np.zeros((5, 16), int), None, 8, ["entropy"],
                   prompt_len=prompt_len)


def test_evaluate_checks_before_sampling():
  setup = _setup()
  teacher = StandIn("t", "teacher", setup)
  longer = StandIn("u", "teacher", _setup(data_types.DataInfo("text", 8, 32)))
  with pytest.raises(ValueError, match="different tokenizer or length"):
    compare.evaluate([teacher, longer], lambda m: [2], 10, teacher, ["entropy"], bars=False)
  with pytest.raises(ValueError, match="synthetic source has vocabulary/length 9/16"):
    compare.evaluate([teacher], lambda m: [2], 10, teacher, ["entropy"], bars=False,
                        resources=registry.Resources(synthetic=synthetic.SyntheticSource(9, 16)))
  with pytest.raises(ValueError, match="sample file .* outside"):
    compare.evaluate([teacher], lambda m: [2], 10, teacher, ["entropy"], bars=False,
                        extra_samples=[("sample file x.npy", np.full((3, 16), -1))])
  assert teacher.calls == []


def test_reference_sets_are_disjoint_when_possible():
  setup = _setup()
  held_out, rows, label = compare.reference_sets(setup, 100)
  assert label == "data (held-out)" and len(held_out) == len(rows) == 100
  np.testing.assert_array_equal(rows, setup.eval_tokens[100:200])
  held_out, rows, label = compare.reference_sets(setup, 150)
  assert label == "data (train)"
  np.testing.assert_array_equal(rows, setup.train_tokens[:150])


def test_steps_and_names():
  steps_for = compare.steps_for_models(["16", "4", "8", "4"])
  assert steps_for(types.SimpleNamespace(kind="teacher")) == [4, 8, 16]
  assert steps_for(types.SimpleNamespace(kind="student", student_steps=8)) == [8, 16]
  assert steps_for(types.SimpleNamespace(kind="student", student_steps=2)) == [2, 4, 8, 16]
  for bad in (["0"], ["x"], []):
    with pytest.raises(ValueError, match="--steps"):
      compare.parse_steps(bad)
  models = [types.SimpleNamespace(workdir=w) for w in ("r/a/t", "r/b/t/", "r/s")]
  assert compare.model_names(models) == ["a/t", "b/t", "s"]


def _rows():
  return [compare.Row("data (held-out)", "data", 0, {"mmd2": 0.0, "mmd2_se": 0.01}),
          compare.Row("teacher", "teacher", 4, {"mmd2": 0.3, "mmd2_se": 0.02}),
          compare.Row("teacher", "teacher", 16, {"mmd2": 0.1, "mmd2_se": 0.02}),
          compare.Row("k4", "student", 4, {"mmd2": 0.05, "mmd2_se": 0.01, "gm": 1.5,
                                           "exact_nll": float("nan")})]


def test_results_files_table_and_plots(tmp_path):
  rows = _rows()
  report.write_results(rows, str(tmp_path))
  with open(tmp_path / "results.csv") as f:
    table = list(csv.DictReader(f))
  assert list(table[0]) == ["model", "kind", "steps", "mmd2", "mmd2_se", "gm", "exact_nll"]
  assert table[3]["gm"] == "1.5" and table[0]["gm"] == ""
  stored = json.loads((tmp_path / "results.json").read_text())  # strict JSON: NaN → null
  assert stored[1] == rows[1].flat() and stored[3]["exact_nll"] is None
  text = report.format_table(rows)
  assert "mmd2_se" in text.splitlines()[0] and "nan" in text.splitlines()[2]
  report.plot(rows, str(tmp_path / "all.png"))
  report.plot(rows, str(tmp_path / "plots" / "gm.png"), ["gm"])
  for name in ("all.png", "plots/gm.png"):
    assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_draws_a_metric_with_no_finite_model_value(tmp_path):
  """exact_nll is NaN for a model none of whose samples is valid (a teacher that never copies):
  the plot still writes, with that panel marked instead of a log axis over no data."""
  rows = [compare.Row("data", "data", 0, {"exact_nll": 24.0, "copy_rate": 1.0}),
          *(compare.Row("teacher", "teacher", k, {"exact_nll": np.nan, "copy_rate": 0.0})
            for k in (4, 64))]
  report.plot(rows, str(tmp_path / "nan.png"))
  assert (tmp_path / "nan.png").read_bytes()[:4] == b"\x89PNG"


def test_sample_files_and_overviews(tmp_path):
  text_info = data_types.DataInfo("text", 8, 16)
  tokens = synthetic.sample(SOURCE, 5, seed=0)
  path = report.save_samples(str(tmp_path), text_info, "k4 student", tokens)
  assert path.endswith("k4_student.txt") and "=====" in open(path).read()
  np.testing.assert_array_equal(np.load(tmp_path / "samples" / "k4_student.npy"), tokens)
  overview = report.sample_overview(str(tmp_path / "over"), text_info, [("a", tokens)])
  assert open(overview).read().startswith("### a")
  image_info = data_types.DataInfo("image", 4, 16, (4, 4, 1))
  images = np.random.default_rng(0).integers(0, 4, (10, 16))
  assert report.save_samples(str(tmp_path), image_info, "img", images).endswith(".png")
  png = report.sample_overview(str(tmp_path / "grid"), image_info, [("a", images),
                                                                        ("b", images)])
  assert open(png, "rb").read()[:4] == b"\x89PNG"
  np.save(tmp_path / "bad.npy", np.full((4, 16), 9))
  with pytest.raises(ValueError, match="outside the vocabulary"):
    compare.load_sample_file(str(tmp_path / "bad.npy"), text_info)
  with pytest.raises(FileNotFoundError):
    compare.load_sample_file(str(tmp_path / "none.npy"), text_info)


def test_plot_diagnostics_draws_a_line_per_bucket_or_nothing(tmp_path, monkeypatch):
  rows = [{"step": s, "gen_loss": 0.1, "moment_mismatch/b0": 0.3 / s, "moment_mismatch/b1": 0.2,
           "student_entropy/b0": 1.0, "student_entropy/b1": 1.1} for s in (1, 2, 3)]
  drawn = []
  real_plot = report._pyplot().Axes.plot
  monkeypatch.setattr(report._pyplot().Axes, "plot",
                      lambda ax, x, y, *a, **k: drawn.append((list(x), list(y))) or real_plot(
                          ax, x, y, *a, **k))
  assert report.plot_diagnostics(rows, str(tmp_path / "d.png"))
  assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"
  assert drawn[0][0] == [1, 2, 3] and np.allclose(drawn[0][1], [0.3, 0.15, 0.1])
  assert len(drawn) == 4  # 2 buckets × 2 panels
  assert not report.plot_diagnostics([{"step": 1, "gen_loss": 0.1}], str(tmp_path / "n.png"))
  assert not (tmp_path / "n.png").exists()
