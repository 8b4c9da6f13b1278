"""Compare teachers and students at several sampling step counts: sample, score, write results.

`evaluate` scores loaded models (`training.trained_model.Model`) with the metrics of
`registry.py`; `evaluate_workdirs` is experiments/evaluate.py: it loads workdirs and writes the
table, plots and samples (`report.py`).

Held-out data: the reference run's eval split. Model samples are compared with its first
`num_samples` rows; the "data" row scores real data the same way: the next `num_samples` eval
rows when the split is large enough ("data (held-out)"), else the first training rows
("data (train)").

Prompted completions (`prompt_len` = n): sample i of every model and step count continues the
first n tokens of held-out row i (the same prefixes everywhere, so comparisons are paired), and
the metrics score the continuation (`registry` module docstring).
"""

import dataclasses
import functools
import os

import numpy as np
from tqdm import tqdm

from dmmd_jax.data import prompts, synthetic
from dmmd_jax.data import types as data_types
from dmmd_jax.evaluation import registry, report
from dmmd_jax.infra import outputs
from dmmd_jax.models import feature_net, reference_lm
from dmmd_jax.training import trained_model


@dataclasses.dataclass
class Row:
  model: str
  kind: str
  steps: int
  metrics: dict

  def flat(self) -> dict:
    return {"model": self.model, "kind": self.kind, "steps": self.steps, **self.metrics}


def check_comparable(models) -> None:
  """All models must share vocabulary and length (else their numbers are not comparable)."""
  ref = models[0].setup.info
  for m in models[1:]:
    info = m.setup.info
    if (info.vocab_size, info.seq_len, info.tokenizer) != (ref.vocab_size, ref.seq_len,
                                                           ref.tokenizer):
      raise ValueError(f"{m.workdir} (vocab {info.vocab_size}, length {info.seq_len}) cannot be "
                       f"compared with {models[0].workdir} (vocab {ref.vocab_size}, length "
                       f"{ref.seq_len}): different tokenizer or length.")


def reference_sets(setup, num_samples: int, split: str = "eval"):
  """(held-out rows, real rows scored as the "data" row, that row's label); see module doc.

  split="train" compares with training rows instead (rows num_samples… of the training split,
  and the next num_samples as the data row): for choosing settings without looking at the
  held-out rows that results are reported on.
  """
  if split == "train":
    rows = setup.train_tokens[num_samples:3 * num_samples]
    if len(rows) < 2 * num_samples:
      raise ValueError(f"the training split has {len(setup.train_tokens)} rows; comparing "
                       f"{num_samples} samples with training rows needs {3 * num_samples}.")
    return rows[:num_samples], rows[num_samples:], "data (train)"
  if split != "eval":
    raise ValueError(f"split must be 'eval' or 'train', got {split!r}.")
  evals = setup.eval_tokens
  held_out = evals[:num_samples]
  if len(evals) >= 2 * num_samples:
    return held_out, evals[num_samples:2 * num_samples], "data (held-out)"
  return held_out, setup.train_tokens[:num_samples], "data (train)"


def held_out_prompt(held_out: np.ndarray, num_samples: int,
                    prompt_len: int | None) -> prompts.Prompt | None:
  """The prompts of a prompted evaluation: held-out rows' first prompt_len tokens `[n, prompt_len]`.

  None without prompt_len; ValueError when there are fewer held-out rows than samples.
  """
  if prompt_len is None:
    return None
  if len(held_out) < num_samples:
    raise ValueError(f"--prompt_len needs one held-out row per sample: the reference run has "
                     f"{len(held_out)} eval rows, --num_samples is {num_samples}.")
  return prompts.from_tokens(held_out[:num_samples, :prompt_len])


def model_names(models) -> list:
  """Short unique names: each workdir's basename, with parent folders added while names clash."""
  parts = [os.path.normpath(m.workdir).split(os.sep) for m in models]
  depth = [1] * len(parts)
  while True:
    names = ["/".join(p[-d:]) for p, d in zip(parts, depth, strict=True)]
    clashes = [i for i, n in enumerate(names) if names.count(n) > 1 and depth[i] < len(parts[i])]
    if not clashes:
      return names
    for i in clashes:
      depth[i] += 1


def evaluate(models, steps_for, num_samples: int, reference: trained_model.Model,
             names=registry.METRICS, seed: int = 0, batch_size: int = 256, progress=print, *,
             resources: registry.Resources | None = None, extra_samples=(), on_samples=None,
             bars: bool = True, split: str = "eval", prompt_len: int | None = None):
  """Rows for every (model, steps) pair, after one row for real data.

  Args:
    models: loaded `trained_model.Model`s (teachers, students) of one dataset.
    steps_for: model → list of step counts to sample it with.
    num_samples: samples per (model, steps).
    reference: the run whose held-out data everything is compared with, and the teacher of
      `teacher_nelbo`.
    names: metrics (see `ALL_METRICS`).
    seed, batch_size: sampling seed and sequences per sampler call.
    progress: called with one line per finished row (e.g. print), or None.
    resources: reference LM, feature net, synthetic source for the metrics that need them.
    extra_samples: (name, int tokens `[n, L]`) pairs scored as rows of kind "samples" (steps 0),
      e.g. sample files or a repetition attack.
    on_samples: called as on_samples(model_name, steps, tokens) after each draw.
    bars: show a tqdm bar over all sequences to draw.
    split: "eval" (held-out rows) or "train" (training rows, for choosing settings; see
      `reference_sets`).
    prompt_len: if set, every model continues the first prompt_len tokens of those rows (one
      per sample) and is scored on the continuation (module docstring).

  Returns:
    list of `Row`.
  """
  resources = resources or registry.Resources()
  everything = list(models) + [reference]
  check_comparable(everything)
  registry.check_metrics(names, reference, resources)
  info = reference.setup.info
  registry.check_resources(resources, info)
  registry.check_prompt_len(prompt_len, info.seq_len)
  held_out, data_rows, data_label = reference_sets(reference.setup, num_samples, split)
  prompt = held_out_prompt(held_out, num_samples, prompt_len)
  ctx = registry.Context(held_out, reference, resources, seed, prompt_len or 0)
  rate = functools.partial(registry.score, held_out=held_out, reference=reference,
                           vocab_size=info.vocab_size, names=names, resources=resources,
                           seed=seed, context=ctx)
  rows = [Row(data_label, "data", 0, rate(data_rows))]
  for name, tokens in extra_samples:
    tokens = data_types.check_tokens(tokens, info.vocab_size, info.seq_len, name)
    rows.append(_report(Row(name, "samples", 0, rate(tokens[:num_samples])), progress))
  jobs = [(name, model, steps) for name, model in zip(model_names(models), models, strict=True)
          for steps in steps_for(model)]
  with tqdm(total=num_samples * len(jobs), desc="sampling", unit="seq",
            disable=not bars) as bar:
    for name, model, steps in jobs:
      bar.set_postfix_str(f"{name} steps={steps}")
      samples = model.sample(num_samples, steps, seed, batch_size=batch_size, on_chunk=bar.update,
                             prompt=prompt)
      if on_samples is not None:
        on_samples(name, steps, samples)
      rows.append(_report(Row(name, model.kind, steps, rate(samples)), progress))
  return rows


def _report(row: Row, progress) -> Row:
  if progress is not None:
    progress(f"{row.model:>24s} steps={row.steps:<5d} " + " ".join(
        f"{k}={v:.4g}" for k, v in row.metrics.items()))
  return row


def parse_steps(steps) -> list:
  """Sorted unique positive step counts from ints or strings; ValueError otherwise."""
  try:
    values = sorted({int(s) for s in steps})
  except (TypeError, ValueError):
    raise ValueError(f"--steps must be positive integers, got {list(steps)}.") from None
  if not values or values[0] <= 0:
    raise ValueError(f"--steps must be positive integers, got {list(steps)}.")
  return values


def steps_for_models(steps):
  """Teachers at every step count; students at their own k and every listed count above it."""
  steps = parse_steps(steps)

  def steps_for(model):
    if model.kind != "student":
      return steps
    return sorted({model.student_steps, *(s for s in steps if s > model.student_steps)})

  return steps_for


def load_sample_file(path: str, info: data_types.DataInfo) -> np.ndarray:
  """int32 `[n, L]` tokens of an .npy sample file, checked against the models' vocabulary/length."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"sample file {path} does not exist.")
  tokens = data_types.load_token_array(path)
  return data_types.check_tokens(tokens, info.vocab_size, info.seq_len, f"sample file {path}")


def _pick_reference(models, reference_dir: str | None):
  if reference_dir:
    return trained_model.load(reference_dir)
  return next((m for m in models if m.kind == "teacher"), models[0])


def resources_for(reference, reference_lm_dir=None, feature_net_dir=None) -> registry.Resources:
  """The scorers beyond the teacher: reference LM and feature net (workdirs, or None) and, for
  runs on the synthetic source, that source."""
  return registry.Resources(
      reference_lm=reference_lm.load(reference_lm_dir) if reference_lm_dir else None,
      feature_net=feature_net.load(feature_net_dir) if feature_net_dir else None,
      synthetic=synthetic.source_for_data_config(reference.setup.config.data))


def evaluate_workdirs(workdirs, steps, names, output_dir: str, *, num_samples: int = 256,
                      reference_lm: str | None = None, feature_net: str | None = None,
                      reference: str | None = None, sample_files=(), seed: int = 0,
                      batch_size: int = 256, save_sample_files: bool = True, progress=print,
                      bars: bool = True, prompt_len: int | None = None) -> list:
  """Sample and score workdirs; write results.{json,csv}, plots and samples under output_dir.

  Args:
    workdirs: teacher / student run directories of one dataset.
    steps: sampling step counts (teachers: all; students: their k and the larger ones).
    names: metrics (`ALL_METRICS`).
    output_dir: results.json, results.csv, comparison.png (all metrics), plots/<metric>.png,
      samples/<model>_steps<k>.{npy,png|txt} and samples_overview.{png|txt}.
    num_samples: samples per (model, steps).
    reference_lm, feature_net: directories of the reference LM / feature net (when a metric
      needs them).
    reference: the run whose held-out data and teacher are the reference (default: the first
      teacher among workdirs).
    sample_files: .npy token arrays scored as extra rows (kind "samples").
    seed, batch_size: sampling.
    save_sample_files: write the samples folder.
    progress, bars: one line per row, tqdm bar.
    prompt_len: continue held-out prefixes of this many tokens and score the continuations.

  Returns:
    The rows (also printed by the binary with `format_table`).
  """
  names = list(names)
  registry.check_metric_names(names)
  if num_samples < 4:
    raise ValueError(f"--num_samples must be at least 4, got {num_samples}.")
  if not workdirs:
    raise ValueError("--workdirs is empty.")
  outputs.check_writable_dir(output_dir)
  steps_for = steps_for_models(steps)
  models = [trained_model.load(w) for w in workdirs]
  ref = _pick_reference(models, reference)
  resources = resources_for(ref, reference_lm, feature_net)
  registry.check_metrics(names, ref, resources)
  info = ref.setup.info
  extra = [(os.path.basename(p), load_sample_file(p, info)) for p in sample_files]
  entries = []

  def on_samples(name, k, tokens):
    entries.append((f"{name} k={k}", tokens))
    if save_sample_files:
      report.save_samples(output_dir, info, f"{name}_steps{k}", tokens)

  rows = evaluate(models, steps_for, num_samples, ref, names, seed, batch_size, progress,
                  resources=resources, extra_samples=extra, on_samples=on_samples, bars=bars,
                  prompt_len=prompt_len)
  _write_outputs(rows, output_dir, info, [(rows[0].model, reference_sets(
      ref.setup, num_samples)[1])] + entries)
  return rows


def _write_outputs(rows, output_dir: str, info, entries) -> None:
  report.write_results(rows, output_dir)
  report.plot(rows, os.path.join(output_dir, "comparison.png"))
  for column in report.metric_columns(rows):
    if not column.endswith("_se"):
      report.plot(rows, os.path.join(output_dir, "plots", f"{column}.png"), [column])
  report.sample_overview(os.path.join(output_dir, "samples_overview"), info, entries)
