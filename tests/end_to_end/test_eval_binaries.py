"""End to end: a tiny digits teacher, a D-MMD student and an SDTT student, scored by the binaries.

One module fixture trains everything once (1-layer, width-32 networks, a few steps each, students
k = 4 — the numbers are meaningless, the plumbing is what is tested): train.train_teacher,
distill.distill, sdtt.distill_sdtt, feature_net.train_and_save, and
experiments/train_reference_lm.py as a subprocess; experiments/evaluate.py then runs as a
subprocess on the three workdirs.
"""

import csv
import json
import os

import _helpers
import numpy as np
import pytest

from dmmd_jax.data import synthetic
from dmmd_jax.evaluation import compare, registry
from dmmd_jax.training import (
  dmmd_run,
  feature_net_run,
  reference_lm_run,
  sdtt_run,
  teacher_run,
  trained_model,
)

# One distillation update (the auxiliary's, for D-MMD): only the workdir format matters here.
TINY = {"model.num_layers": 1, "model.width": 32, "model.cond_dim": 16, "train.num_steps": 4,
        "train.eval_every": 0, "train.checkpoint_every": 4, "train.log_every": 2,
        "train.eval_batches": 1, "sample.steps": 8, "distill.num_steps": 1,
        "distill.checkpoint_every": 1, "distill.log_every": 1, "distill.student_steps": 4}


def _load(name, preset):
  return _helpers.load_config_module(name).get_config(preset)


def _digits_config(teacher_workdir=""):
  overrides = dict(TINY, **{"distill.teacher_workdir": teacher_workdir})
  return _helpers.make_config("digits", "tiny", **overrides)


def _run(script, *flags):
  return _helpers.run_python([f"experiments/{script}", *flags],
                             env=_helpers.cache_env({"JAX_PLATFORMS": "cpu"}))


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("runs")
  dirs = {name: str(root / name) for name in ("teacher", "dmmd_k4", "sdtt_k4", "fnet", "lm")}
  teacher_run.train_teacher(_digits_config(), dirs["teacher"])
  dmmd_run.distill_student(_digits_config(teacher_workdir=dirs["teacher"]), dirs["dmmd_k4"])
  sdtt_run.distill_sdtt(_digits_config(teacher_workdir=dirs["teacher"]), dirs["sdtt_k4"],
                    start_steps=8)
  fnet_config = _load("feature_net", "tiny")
  fnet_config.data_from, fnet_config.train.num_steps = dirs["teacher"], 50
  feature_net_run.train_and_save(fnet_config, dirs["fnet"])
  done = _run("train_reference_lm.py", "--config=configs/reference_lm.py:tiny",
              f"--config.data_from={dirs['teacher']}", "--config.train.num_steps=20",
              "--config.train.log_every=10", f"--workdir={dirs['lm']}")
  assert done.returncode == 0, done.stderr[-2000:]
  assert "reference LM done" in done.stdout
  return root, dirs


def test_sdtt_writes_a_loadable_student_workdir(runs_dir):
  _, dirs = runs_dir
  info = json.load(open(os.path.join(dirs["sdtt_k4"], "run.json")))
  assert (info["kind"], info["method"], info["student_steps"], info["start_steps"],
          info["num_rounds"]) == ("student", "sdtt", 4, 8, 1)
  model = trained_model.load(dirs["sdtt_k4"])
  assert model.kind == "student" and model.default_steps == 4 and model.noise_fn() is None
  logged = [json.loads(r) for r in open(os.path.join(dirs["sdtt_k4"], "metrics.jsonl"))]
  assert logged[-1]["step"] == 1 and np.isfinite(logged[-1]["kl_loss"])


def test_evaluate_binary_end_to_end(runs_dir):
  root, dirs = runs_dir
  out = root / "eval"
  done = _run("evaluate.py", f"--workdirs={dirs['teacher']},{dirs['dmmd_k4']},{dirs['sdtt_k4']}",
              "--steps=2,4", "--num_samples=32", "--batch_size=32",
              "--metrics=mmd2,teacher_nelbo,entropy,gen_ppl,gm,frechet,precision_recall,confidence",
              f"--reference_lm={dirs['lm']}", f"--feature_net={dirs['fnet']}",
              f"--output_dir={out}")
  assert done.returncode == 0, done.stderr[-3000:]
  with open(out / "results.csv") as f:
    table = list(csv.DictReader(f))
  assert list(table[0]) == ["model", "kind", "steps", "mmd2", "mmd2_se", "teacher_nelbo",
                            "entropy", "gen_ppl", "gm", "gm_se", "frechet", "precision",
                            "recall", "confidence", "classes_present"]
  assert [(r["model"], r["kind"], r["steps"]) for r in table] == [
      ("data (held-out)", "data", "0"), ("teacher", "teacher", "2"),
      ("teacher", "teacher", "4"), ("dmmd_k4", "student", "4"), ("sdtt_k4", "student", "4")]
  assert all(np.isfinite(float(v)) for r in table for k, v in r.items() if k not in (
      "model", "kind", "steps"))
  assert json.load(open(out / "results.json"))[0]["model"] == "data (held-out)"
  for png in ("comparison.png", "plots/gm.png", "plots/frechet.png", "samples_overview.png",
              "samples/dmmd_k4_steps4.png"):
    assert (out / png).read_bytes()[:4] == b"\x89PNG", png
  assert np.load(out / "samples/sdtt_k4_steps4.npy").shape == (32, 64)
  assert "teacher_nelbo" in done.stdout and "results:" in done.stdout


def test_evaluate_binary_scores_prompted_completions(runs_dir):
  root, dirs = runs_dir
  out = root / "eval_prompted"
  done = _run("evaluate.py", f"--workdirs={dirs['teacher']},{dirs['dmmd_k4']}", "--steps=2",
              "--num_samples=16", "--prompt_len=24", "--metrics=mmd2,entropy,gen_ppl,gm",
              f"--reference_lm={dirs['lm']}", f"--output_dir={out}")
  assert done.returncode == 0, done.stderr[-3000:]
  held_out = compare.reference_sets(trained_model.load(dirs["teacher"]).setup, 16)[0]
  for name in ("teacher_steps2", "dmmd_k4_steps4"):
    samples = np.load(out / "samples" / f"{name}.npy")
    np.testing.assert_array_equal(samples[:, :24], held_out[:, :24])
  with open(out / "results.csv") as f:
    table = list(csv.DictReader(f))
  assert [r["model"] for r in table] == ["data (held-out)", "teacher", "dmmd_k4"]
  assert all(np.isfinite(float(r[k])) for r in table for k in ("gen_ppl", "gm", "entropy"))


@pytest.mark.parametrize("prompt_len", ["0", "64"])
def test_evaluate_binary_refuses_a_bad_prompt_len(runs_dir, prompt_len):
  _, dirs = runs_dir
  done = _run("evaluate.py", f"--workdirs={dirs['teacher']}", f"--prompt_len={prompt_len}",
              "--output_dir=/tmp/unused")
  assert done.returncode == 1
  assert done.stderr.strip().splitlines() == [
      f"error: --prompt_len must lie in [1, 64) (the samples have 64 tokens and need at least one "
      f"to generate), got {prompt_len}."]


def test_evaluate_binary_error_is_one_line(runs_dir):
  _, dirs = runs_dir
  done = _run("evaluate.py", f"--workdirs={dirs['teacher']}", "--metrics=mmd2,fid",
              "--output_dir=/tmp/unused")
  assert done.returncode == 1
  assert done.stderr.strip().splitlines() == [
      f"error: unknown metric(s) fid; choose from {', '.join(registry.ALL_METRICS)}."]


def test_evaluate_errors(runs_dir, tmp_path):
  root, dirs = runs_dir
  run = lambda **kw: compare.evaluate_workdirs(
      kw.pop("workdirs", [dirs["teacher"]]), [2], kw.pop("names", ["mmd2"]), str(tmp_path),
      num_samples=8, progress=None, bars=False, **kw)
  with pytest.raises(ValueError, match="metric frechet needs --feature_net"):
    run(names=["frechet"])
  with pytest.raises(ValueError, match="metric copy_rate needs workdirs trained on"):
    run(names=["copy_rate"])
  with pytest.raises(ValueError, match="metric teacher_nelbo needs a teacher"):
    run(workdirs=[dirs["dmmd_k4"]], names=["teacher_nelbo"])
  np.save(tmp_path / "bad.npy", np.full((8, 64), 17))
  with pytest.raises(ValueError, match="bad.npy have token ids in \\[17, 17\\], outside"):
    run(sample_files=[str(tmp_path / "bad.npy")])
  with pytest.raises(ValueError, match="not a dmmd_jax workdir"):
    run(workdirs=[dirs["lm"]])
  # A reference LM of another vocabulary (the synthetic source's 8 symbols vs 17 grey levels).
  syn = synthetic.write_dataset(synthetic.SyntheticSource(8, 64), 64, tmp_path / "s.npy")
  lm_config = _load("reference_lm", "tiny")
  lm_config.data.source, lm_config.data.path, lm_config.data.vocab_size = "npy", str(syn), 8
  lm_config.data.seq_len, lm_config.train.num_steps = 0, 1
  reference_lm_run.train_reference(lm_config, str(tmp_path / "lm8"), progress=False)
  with pytest.raises(ValueError, match="vocabulary of 8 tokens but the samples use 17"):
    run(names=["gm"], reference_lm=str(tmp_path / "lm8"))
