"""Compare teachers and students at several sampling step counts: sample, score, table, plot.

Metrics (each a function of a model's samples `[n, length]`; `METRICS` is the main job's default,
`ALL_METRICS` everything; the CSV columns each one writes are in `COLUMNS`):
- `mmd2`: unbiased kernel MMD² (exponentiated Hamming kernel) between samples and held-out data —
  lower is better, 0 for a perfect sampler up to noise (with its standard error `mmd2_se`);
- `teacher_nelbo`: the negative ELBO (bits/token) of the samples under the reference teacher —
  how likely the teacher finds them; lower is more teacher-like (can be gamed by low diversity,
  so read it together with mmd2 and entropy);
- `entropy`: per-sequence unigram entropy of the samples (nats), the mode-collapse detector;
- `gen_ppl`: generative perplexity under a reference autoregressive LM (token-weighted, float64);
  gameable: repeating one likely sequence keeps it low;
- `gm`: gradient moment ‖E_model ∇ψ log p_ψ − E_data ∇ψ log p_ψ‖² under the reference LM, model
  samples vs held-out data, mean ± standard error over independent pairs (`gm`, `gm_se`);
- `frechet`, `precision_recall`: Fréchet distance and k-NN precision / recall (`precision`,
  `recall`) of image samples vs held-out images in the feature space of the project's own small
  classifier (`feature_net.py`) — NOT comparable to Inception-FID;
- `copy_rate`, `exact_nll`: exact metrics of the synthetic mirror source (`synthetic.py`): the
  fraction of samples whose second half is the reversed first half (`copy_rate`, and the
  per-position `copy_position_agreement`), and the mean exact −log p_data (nats/sequence) over
  the valid samples with the `valid_fraction`.

Reference models. `gen_ppl` and `gm` take any reference LM object with `params`,
`loglik_fn(params, tokens [b, L]) -> [b]` (mean per-token log-likelihood; a fixed, hashable
function: it is a static jit argument), `log_prob_fn(tokens [b, L]) -> [b, L − 1]` and
`check_compatible(info)`; `ReferenceLM` wraps the project's `reference_lm` (trained by
`train_reference` / experiments/train_reference_lm.py, loaded by `load_reference_lm`).

Held-out data: the reference run's eval split. Model samples are compared with its first
`num_samples` rows; the "data" row scores real data the same way: the next `num_samples` eval
rows when the split is large enough ("data (held-out)"), else the first training rows
("data (train)").

Reference-LM directory: DIR/reference_lm.json (its ReferenceLMConfig, DataInfo, data config and
training history) + DIR/params.npz (the parameter pytree, flattened with "/"-joined keys).
"""

import csv
import dataclasses
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from dmmd_jax import config_lib, outputs, runs, workdir_guard
from dmmd_jax import data as data_lib
from dmmd_jax import feature_net as feature_net_lib
from dmmd_jax import metrics as metrics_lib
from dmmd_jax import reference_lm as reference_lm_lib
from dmmd_jax import synthetic as synthetic_lib
from dmmd_jax import workdir as workdir_lib

METRICS = ("mmd2", "teacher_nelbo", "entropy")
ALL_METRICS = METRICS + ("gen_ppl", "gm", "frechet", "precision_recall", "copy_rate",
                         "exact_nll")
COLUMNS = {
    "mmd2": ("mmd2", "mmd2_se"), "teacher_nelbo": ("teacher_nelbo",), "entropy": ("entropy",),
    "gen_ppl": ("gen_ppl",), "gm": ("gm", "gm_se"), "frechet": ("frechet",),
    "precision_recall": ("precision", "recall"),
    "copy_rate": ("copy_rate", "copy_position_agreement"),
    "exact_nll": ("exact_nll", "valid_fraction"),
}
# What a metric needs beyond samples and held-out data, and how a user provides it.
NEEDS = {"teacher_nelbo": "teacher", "gen_ppl": "reference_lm", "gm": "reference_lm",
         "frechet": "feature_net", "precision_recall": "feature_net", "copy_rate": "synthetic",
         "exact_nll": "synthetic"}
HOW = {"teacher": "a teacher workdir among --workdirs (or --reference)",
       "reference_lm": "--reference_lm=DIR (experiments/train_reference_lm.py)",
       "feature_net": "--feature_net=DIR (experiments/train_feature_net.py)",
       "synthetic": "workdirs trained on the synthetic source (configs/synthetic.py)"}
REFERENCE_LM_FILE = "reference_lm.json"
PARAMS_FILE = "params.npz"


@dataclasses.dataclass
class Row:
  model: str
  kind: str
  steps: int
  metrics: dict

  def flat(self) -> dict:
    return {"model": self.model, "kind": self.kind, "steps": self.steps, **self.metrics}


# ---------------------------------------------------------------------------------------------
# Reference language model.


@dataclasses.dataclass(eq=False)
class ReferenceLM:
  """The project's causal Transformer as a reference model for `gen_ppl` and `gm`.

  eq=False: instances hash by identity, and so do their `loglik_fn` partials, which therefore
  compile once per instance as static jit arguments.
  """

  config: reference_lm_lib.ReferenceLMConfig
  params: dict
  info: data_lib.DataInfo | None = None
  path: str = ""

  def __post_init__(self):
    self.loglik_fn = functools.partial(reference_lm_lib.sequence_log_likelihood,
                                       config=self.config)
    self.log_prob_fn = functools.partial(reference_lm_lib.token_log_probs, self.params,
                                         config=self.config)

  def check_compatible(self, info: data_lib.DataInfo) -> None:
    """ValueError unless samples described by `info` use this LM's tokens and fit its length."""
    where = self.path or "the reference LM"
    if info.vocab_size != self.config.vocab_size:
      raise ValueError(f"{where} has a vocabulary of {self.config.vocab_size} tokens but the "
                       f"samples use {info.vocab_size}; train it on the same data "
                       "(--config.data_from=WORKDIR).")
    if self.info is not None and self.info.tokenizer != info.tokenizer:
      raise ValueError(f"{where} was trained with a different tokenizer than the samples'.")
    if info.seq_len > self.config.max_len:
      raise ValueError(f"{where} reads at most {self.config.max_len} tokens; the samples have "
                       f"{info.seq_len}.")


def load_reference_lm(path: str) -> ReferenceLM:
  """The reference LM stored in `path` by `train_reference` (experiments/train_reference_lm.py)."""
  record_path = os.path.join(path, REFERENCE_LM_FILE)
  if not os.path.exists(record_path):
    raise workdir_lib.WorkdirError(f"{path} has no {REFERENCE_LM_FILE}: not a reference-LM "
                                   "directory (experiments/train_reference_lm.py writes one).")
  record = workdir_lib.read_json(record_path)
  config = reference_lm_lib.ReferenceLMConfig(**record["config"])
  params = jax.tree.map(jnp.asarray,
                        feature_net_lib.load_pytree(os.path.join(path, PARAMS_FILE)))
  return ReferenceLM(config, params, data_lib.DataInfo.from_json(record["data_info"]), path)


@functools.lru_cache(maxsize=8)
def _lm_step(config: reference_lm_lib.ReferenceLMConfig, optimizer):
  """Jitted (params, opt_state, batch `[b, L]`) → (params, opt_state, mean token NLL)."""

  @jax.jit
  def step(params, opt_state, batch):
    def loss_fn(p):
      return -jnp.mean(reference_lm_lib.token_log_probs(p, batch, config=config))

    nll, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, nll

  return step


def _check_lm_train_config(t) -> None:
  for key in ("num_steps", "batch_size", "learning_rate", "log_every", "eval_examples"):
    if t[key] <= 0:
      raise config_lib.ConfigError(f"config.train.{key} must be positive, got {t[key]}.")


@workdir_guard.releases_locks
def train_reference(config, workdir: str, progress: bool = True) -> dict:
  """Trains the reference LM on config.data (or config.data_from's data) and stores it.

  The batches come from `data.batch_iterator` over the training split (deterministic for
  config.seed); the held-out NLL is measured on the first train.eval_examples eval rows every
  train.log_every steps. Returns {"eval_nll", "eval_ppl", "train_nll"} (nats per token).
  """
  t, m = config.train, config.model
  _check_lm_train_config(t)
  data_cfg = feature_net_lib.data_config(config)
  train_tokens, eval_tokens, info = data_lib.load_dataset(data_cfg)
  workdir_guard.claim_record(workdir, "reference_lm")
  lm_cfg = reference_lm_lib.ReferenceLMConfig(
      info.vocab_size, info.seq_len, m.num_layers, m.width, m.num_heads, m.mlp_ratio,
      m.positions, m.tie_embeddings)
  optimizer = reference_lm_lib.make_optimizer(t.learning_rate, t.num_steps, t.weight_decay)
  params = reference_lm_lib.init_params(jax.random.PRNGKey(config.seed), lm_cfg)
  opt_state, step = optimizer.init(params), _lm_step(lm_cfg, optimizer)
  batches = data_lib.batch_iterator(train_tokens, t.batch_size, config.seed)
  held_out = eval_tokens[:t.eval_examples]
  history, window = {"step": [], "train_nll": [], "eval_nll": []}, []
  bar = tqdm(range(1, t.num_steps + 1), desc="reference LM", disable=not progress)
  for i in bar:
    params, opt_state, nll = step(params, opt_state, next(batches))
    window.append(nll)
    if i % t.log_every == 0 or i == t.num_steps:
      history["step"].append(i)
      history["train_nll"].append(float(np.mean(jax.device_get(window))))
      history["eval_nll"].append(reference_lm_lib.evaluate_nll(params, held_out, config=lm_cfg))
      bar.set_postfix(train_nll=history["train_nll"][-1], eval_nll=history["eval_nll"][-1])
      window = []
  result = {"eval_nll": history["eval_nll"][-1], "eval_ppl": math.exp(history["eval_nll"][-1]),
            "train_nll": history["train_nll"][-1]}
  _save_reference(workdir, lm_cfg, params, info, data_cfg, history, result)
  return result


def _save_reference(workdir, lm_cfg, params, info, data_cfg, history, result) -> None:
  os.makedirs(workdir, exist_ok=True)
  feature_net_lib.save_pytree(os.path.join(workdir, PARAMS_FILE), params)
  record = {"kind": "reference_lm", "config": dataclasses.asdict(lm_cfg),
            "data_info": info.to_json(), "data": json.loads(data_cfg.to_json_best_effort()),
            "history": history, **result}
  with open(os.path.join(workdir, REFERENCE_LM_FILE), "w") as f:
    json.dump(record, f, indent=2)


# ---------------------------------------------------------------------------------------------
# Checks.


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


@dataclasses.dataclass
class Resources:
  """Optional scorers beyond the reference teacher (see the module docstring)."""

  reference_lm: object = None
  feature_net: feature_net_lib.FeatureNet | None = None
  synthetic: synthetic_lib.SyntheticSource | None = None
  gm_pairs: int = 16
  micro_batch: int = 64


def check_metric_names(names) -> None:
  """ValueError for unknown or no metric names."""
  unknown = [n for n in names if n not in COLUMNS]
  if unknown or not names:
    raise ValueError(f"unknown metric(s) {', '.join(unknown) or '(none given)'}; choose from "
                     f"{', '.join(ALL_METRICS)}.")


def check_metrics(names, reference=None, resources: Resources | None = None) -> None:
  """ValueError for unknown metric names or a metric whose scorer is missing."""
  check_metric_names(names)
  resources = resources or Resources()
  have = {"teacher": reference is not None and reference.kind == "teacher",
          "reference_lm": resources.reference_lm is not None,
          "feature_net": resources.feature_net is not None,
          "synthetic": resources.synthetic is not None}
  for name in names:
    if name in NEEDS and not have[NEEDS[name]]:
      raise ValueError(f"metric {name} needs {HOW[NEEDS[name]]}.")


def check_resources(resources: Resources, info: data_lib.DataInfo) -> None:
  """ValueError when a scorer cannot read samples described by `info`."""
  if resources.reference_lm is not None:
    resources.reference_lm.check_compatible(info)
  if resources.feature_net is not None:
    resources.feature_net.check_compatible(info)
  source = resources.synthetic
  if source is not None and (source.vocab_size, source.seq_len) != (info.vocab_size,
                                                                    info.seq_len):
    raise ValueError(f"the synthetic source has vocabulary/length {source.vocab_size}/"
                     f"{source.seq_len}; the samples {info.vocab_size}/{info.seq_len}.")


def check_tokens(tokens, vocab_size: int, seq_len: int | None = None, name: str = "samples"):
  """int `[n, L]` numpy array with ids in [0, vocab_size), else ValueError naming `name`."""
  tokens = np.asarray(tokens)
  if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer) or len(tokens) == 0:
    raise ValueError(f"{name} must be a non-empty integer array [n, length], got "
                     f"{tokens.dtype} {tokens.shape}.")
  if seq_len is not None and tokens.shape[1] != seq_len:
    raise ValueError(f"{name} have length {tokens.shape[1]}, the models {seq_len}.")
  lo, hi = int(tokens.min()), int(tokens.max())
  if lo < 0 or hi >= vocab_size:
    raise ValueError(f"{name} have token ids in [{lo}, {hi}], outside the vocabulary "
                     f"[0, {vocab_size}).")
  return tokens.astype(np.int32)


# ---------------------------------------------------------------------------------------------
# Scoring.


@dataclasses.dataclass
class _Context:
  held_out: np.ndarray
  reference: object
  resources: Resources
  seed: int
  cache: dict = dataclasses.field(default_factory=dict)

  def held_out_features(self):
    if "features" not in self.cache:
      self.cache["features"] = self.resources.feature_net.features(self.held_out)
    return self.cache["features"]


def _mmd2(samples, ctx, memo):
  value, stderr = metrics_lib.mmd2_with_stderr(samples, ctx.held_out)
  return {"mmd2": float(value), "mmd2_se": float(stderr)}


def _teacher_nelbo(samples, ctx, memo):
  return {"teacher_nelbo": ctx.reference.negative_elbo_bits(samples)}


def _entropy(samples, ctx, memo):
  return {"entropy": float(metrics_lib.unigram_entropy(samples, memo["vocab_size"]))}


def _gen_ppl(samples, ctx, memo):
  lm = ctx.resources.reference_lm
  result = metrics_lib.generative_perplexity(lm.log_prob_fn, samples, ctx.resources.micro_batch)
  return {"gen_ppl": result.perplexity}


def gm_pairs(num_model: int, num_data: int, requested: int = 16) -> int:
  """Pairs for the GM estimate: ≤ requested, ≥ 2, halves of at least 4 sequences when possible."""
  fewest = min(num_model, num_data)
  if fewest < 4:
    raise ValueError(f"gm needs at least 4 samples and 4 held-out sequences, got {fewest}.")
  return max(2, min(requested, fewest // 8))


def _gm(samples, ctx, memo):
  lm, r = ctx.resources.reference_lm, ctx.resources
  pairs = gm_pairs(len(samples), len(ctx.held_out), r.gm_pairs)
  result = metrics_lib.gradient_moment(lm.loglik_fn, lm.params, samples, ctx.held_out,
                                       jax.random.PRNGKey(ctx.seed), pairs, r.micro_batch)
  return {"gm": result.mean, "gm_se": result.stderr}


def _features(samples, ctx, memo):
  if "features" not in memo:
    memo["features"] = ctx.resources.feature_net.features(samples)
  return memo["features"]


def _frechet(samples, ctx, memo):
  return {"frechet": metrics_lib.frechet_distance(_features(samples, ctx, memo),
                                                  ctx.held_out_features())}


def _precision_recall(samples, ctx, memo):
  precision, recall = metrics_lib.precision_recall(ctx.held_out_features(),
                                                   _features(samples, ctx, memo))
  return {"precision": precision, "recall": recall}


def _copy_rate(samples, ctx, memo):
  result = synthetic_lib.copy_rate(samples)
  return {"copy_rate": result.rate, "copy_position_agreement": result.position_agreement}


def _exact_nll(samples, ctx, memo):
  result = synthetic_lib.exact_nll(ctx.resources.synthetic, samples)
  return {"exact_nll": result.nll, "valid_fraction": result.valid_fraction}


SCORERS = {"mmd2": _mmd2, "teacher_nelbo": _teacher_nelbo, "entropy": _entropy,
           "gen_ppl": _gen_ppl, "gm": _gm, "frechet": _frechet,
           "precision_recall": _precision_recall, "copy_rate": _copy_rate,
           "exact_nll": _exact_nll}


def score(samples: np.ndarray, held_out: np.ndarray, reference: runs.Model | None,
          vocab_size: int, names=METRICS, *, resources: Resources | None = None, seed: int = 0,
          _context: _Context | None = None) -> dict:
  """The metrics `names` of samples int `[n, L]` against held-out data int `[m, L]`.

  reference: the teacher of `teacher_nelbo` (may be None when it is not asked for).
  resources: the reference LM / feature net / synthetic source the other metrics need.
  Returns {column: float} with the columns of `COLUMNS[name]` for each name, in order.
  """
  resources = resources or Resources()
  check_metrics(names, reference, resources)
  samples = check_tokens(samples, vocab_size, held_out.shape[1])
  ctx = _context or _Context(np.asarray(held_out), reference, resources, seed)
  memo, out = {"vocab_size": vocab_size}, {}
  for name in names:
    out.update(SCORERS[name](samples, ctx, memo))
  return out


def reference_sets(setup, num_samples: int):
  """(held-out rows, real rows scored as the "data" row, that row's label); see module doc."""
  evals = setup.eval_tokens
  held_out = evals[:num_samples]
  if len(evals) >= 2 * num_samples:
    return held_out, evals[num_samples:2 * num_samples], "data (held-out)"
  return held_out, setup.train_tokens[:num_samples], "data (train)"


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


def draw_samples(model, num_samples: int, steps: int, seed: int, batch_size: int,
                 bar=None) -> np.ndarray:
  """`[num_samples, L]` from model.sample in chunks of batch_size (chunk j uses seed + 1000003 j).

  One chunk gives exactly model.sample(num_samples, steps, seed).
  """
  out = []
  for j, start in enumerate(range(0, num_samples, batch_size)):
    count = min(batch_size, num_samples - start)
    out.append(np.asarray(model.sample(count, steps, seed + 1_000_003 * j)))
    if bar is not None:
      bar.update(count)
  return np.concatenate(out)


def evaluate(models, steps_for, num_samples: int, reference: runs.Model, names=METRICS,
             seed: int = 0, batch_size: int = 256, progress=print, *,
             resources: Resources | None = None, extra_samples=(), on_samples=None,
             bars: bool = True):
  """Rows for every (model, steps) pair, after one row for real data.

  Args:
    models: loaded `runs.Model`s (teachers, students) of one dataset.
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

  Returns:
    list of `Row`.
  """
  resources = resources or Resources()
  everything = list(models) + [reference]
  check_comparable(everything)
  check_metrics(names, reference, resources)
  info = reference.setup.info
  check_resources(resources, info)
  held_out, data_rows, data_label = reference_sets(reference.setup, num_samples)
  ctx = _Context(held_out, reference, resources, seed)
  rate = functools.partial(score, held_out=held_out, reference=reference,
                           vocab_size=info.vocab_size, names=names, resources=resources,
                           seed=seed, _context=ctx)
  rows = [Row(data_label, "data", 0, rate(data_rows))]
  for name, tokens in extra_samples:
    tokens = check_tokens(tokens, info.vocab_size, info.seq_len, name)
    rows.append(_report(Row(name, "samples", 0, rate(tokens[:num_samples])), progress))
  jobs = [(name, model, steps) for name, model in zip(model_names(models), models, strict=True)
          for steps in steps_for(model)]
  with tqdm(total=num_samples * len(jobs), desc="sampling", unit="seq",
            disable=not bars) as bar:
    for name, model, steps in jobs:
      bar.set_postfix_str(f"{name} steps={steps}")
      samples = draw_samples(model, num_samples, steps, seed, batch_size, bar)
      if on_samples is not None:
        on_samples(name, steps, samples)
      rows.append(_report(Row(name, model.kind, steps, rate(samples)), progress))
  return rows


def _report(row: Row, progress) -> Row:
  if progress is not None:
    progress(f"{row.model:>24s} steps={row.steps:<5d} " + " ".join(
        f"{k}={v:.4g}" for k, v in row.metrics.items()))
  return row


# ---------------------------------------------------------------------------------------------
# Table, files, plots.


def metric_columns(rows) -> list:
  """Metric columns in first-seen order over all rows."""
  return list(dict.fromkeys(k for r in rows for k in r.metrics))


def format_table(rows) -> str:
  keys = metric_columns(rows)
  width = max([24] + [len(r.model) for r in rows])
  header = f"{'model':>{width}s} {'kind':>8s} {'steps':>6s} " + " ".join(f"{k:>14s}" for k in keys)
  lines = [header, "-" * len(header)]
  for r in rows:
    lines.append(f"{r.model:>{width}s} {r.kind:>8s} {r.steps:>6d} " + " ".join(
        f"{r.metrics.get(k, float('nan')):>14.5g}" for k in keys))
  return "\n".join(lines)


def write_results(rows, output_dir: str) -> None:
  os.makedirs(output_dir, exist_ok=True)
  flat = [r.flat() for r in rows]
  with open(os.path.join(output_dir, "results.json"), "w") as f:  # NaN → null (strict JSON)
    json.dump([{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()}
               for r in flat], f, indent=2)
  with open(os.path.join(output_dir, "results.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=["model", "kind", "steps", *metric_columns(rows)],
                            restval="")
    writer.writeheader()
    writer.writerows(flat)


def _pyplot():
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  return plt


def _plot_panel(ax, rows, name: str) -> None:
  """One metric vs steps: a line per model (error bars from `{name}_se`), reference rows flat."""
  for model in dict.fromkeys(r.model for r in rows if r.kind not in ("data", "samples")):
    pts = sorted((r.steps, r.metrics.get(name, np.nan), r.metrics.get(f"{name}_se", 0.0))
                 for r in rows if r.model == model)
    xs, ys, errs = zip(*pts, strict=True)
    ax.errorbar(xs, ys, yerr=errs if any(errs) else None, fmt="o-" if len(pts) > 1 else "s",
                label=model, markersize=6, capsize=3)
  for r in rows:
    if r.kind in ("data", "samples") and np.isfinite(r.metrics.get(name, np.nan)):
      ax.axhline(r.metrics[name], color="gray", linestyle="--" if r.kind == "data" else ":",
                 label=r.model)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("sampling steps")
  ax.set_title(name)
  ax.grid(alpha=0.3)


def plot(rows, path: str, names=None) -> None:
  """Metric vs sampling steps (log x), a line per model, real data dashed; one panel per metric.

  names: the metric columns to draw (default: every column except the `*_se` errors, which
  become error bars).
  """
  plt = _pyplot()
  columns = metric_columns(rows)
  names = [n for n in (names or columns) if n in columns and not n.endswith("_se")]
  cols = min(3, len(names))
  grid = (math.ceil(len(names) / cols), cols)
  fig, axes = plt.subplots(*grid, figsize=(5 * cols, 4 * grid[0]), squeeze=False)
  for ax, name in zip(axes.flat, names, strict=False):
    _plot_panel(ax, rows, name)
  for ax in list(axes.flat)[len(names):]:
    ax.axis("off")
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def save_samples(output_dir: str, info: data_lib.DataInfo, label: str, tokens) -> str:
  """samples/<label>.npy plus a PNG grid (images) or decoded text; returns the preview path."""
  folder = os.path.join(output_dir, "samples")
  os.makedirs(folder, exist_ok=True)
  stem = os.path.join(folder, label.replace("/", "_").replace(" ", "_"))
  np.save(stem + ".npy", np.asarray(tokens, np.int32))
  if info.kind == "image":
    data_lib.save_image_grid(info, tokens, stem + ".png")
    return stem + ".png"
  with open(stem + ".txt", "w") as f:
    f.write("\n\n=====\n\n".join(data_lib.decode_text(info, tokens)))
  return stem + ".txt"


def sample_overview(path_stem: str, info: data_lib.DataInfo, entries, per_row: int = 8) -> str:
  """A grid with one row of `per_row` images per (label, tokens) entry (images, PNG), or the
  first few decoded samples of each entry (text, .txt). Returns the path."""
  if info.kind != "image":
    blocks = [f"### {label}\n" + "\n---\n".join(data_lib.decode_text(info, tokens[:3]))
              for label, tokens in entries]
    with open(path_stem + ".txt", "w") as f:
      f.write("\n\n".join(blocks) + "\n")
    return path_stem + ".txt"
  plt = _pyplot()
  h, w, _ = info.image_shape
  fig, axes = plt.subplots(len(entries), 1, figsize=(per_row * 0.9 + 2, 1.0 * len(entries) + 0.3),
                           squeeze=False)
  for ax, (label, tokens) in zip(axes[:, 0], entries, strict=True):
    strip = np.asarray(tokens[:per_row]).reshape(-1, h, w, info.image_shape[2])[..., 0]
    ax.imshow(np.concatenate(list(strip), axis=1), cmap="gray", vmin=0,
              vmax=info.vocab_size - 1)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
  fig.tight_layout()
  fig.savefig(path_stem + ".png", dpi=110)
  plt.close(fig)
  return path_stem + ".png"


# ---------------------------------------------------------------------------------------------
# Workdirs → results (what experiments/evaluate.py runs).


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


def load_sample_file(path: str, info: data_lib.DataInfo) -> np.ndarray:
  """int32 `[n, L]` tokens of an .npy sample file, checked against the models' vocabulary/length."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"sample file {path} does not exist.")
  tokens = data_lib.load_token_array(path)
  return check_tokens(tokens, info.vocab_size, info.seq_len, f"sample file {path}")


def _pick_reference(models, reference_dir: str | None):
  if reference_dir:
    return runs.load(reference_dir)
  return next((m for m in models if m.kind == "teacher"), models[0])


def _resources(reference, reference_lm_dir, feature_net_dir) -> Resources:
  return Resources(
      reference_lm=load_reference_lm(reference_lm_dir) if reference_lm_dir else None,
      feature_net=feature_net_lib.load(feature_net_dir) if feature_net_dir else None,
      synthetic=synthetic_lib.source_for_data_config(reference.setup.config.data))


def evaluate_workdirs(workdirs, steps, names, output_dir: str, *, num_samples: int = 256,
                      reference_lm: str | None = None, feature_net: str | None = None,
                      reference: str | None = None, sample_files=(), seed: int = 0,
                      batch_size: int = 256, save_sample_files: bool = True, progress=print,
                      bars: bool = True) -> list:
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

  Returns:
    The rows (also printed by the binary with `format_table`).
  """
  names = list(names)
  check_metric_names(names)
  if num_samples < 4:
    raise ValueError(f"--num_samples must be at least 4, got {num_samples}.")
  if not workdirs:
    raise ValueError("--workdirs is empty.")
  outputs.check_writable_dir(output_dir)
  steps_for = steps_for_models(steps)
  models = [runs.load(w) for w in workdirs]
  ref = _pick_reference(models, reference)
  resources = _resources(ref, reference_lm, feature_net)
  check_metrics(names, ref, resources)
  info = ref.setup.info
  extra = [(os.path.basename(p), load_sample_file(p, info)) for p in sample_files]
  entries = []

  def on_samples(name, k, tokens):
    entries.append((f"{name} k={k}", tokens))
    if save_sample_files:
      save_samples(output_dir, info, f"{name}_steps{k}", tokens)

  rows = evaluate(models, steps_for, num_samples, ref, names, seed, batch_size, progress,
                  resources=resources, extra_samples=extra, on_samples=on_samples, bars=bars)
  _write_outputs(rows, output_dir, info, [(rows[0].model, reference_sets(
      ref.setup, num_samples)[1])] + entries)
  return rows


def _write_outputs(rows, output_dir: str, info, entries) -> None:
  write_results(rows, output_dir)
  plot(rows, os.path.join(output_dir, "comparison.png"))
  for column in metric_columns(rows):
    if not column.endswith("_se"):
      plot(rows, os.path.join(output_dir, "plots", f"{column}.png"), [column])
  sample_overview(os.path.join(output_dir, "samples_overview"), info, entries)
