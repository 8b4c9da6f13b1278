"""Compare teachers and students at several sampling step counts: sample, score, table, plot.

Metrics: one `Metric` entry each in `REGISTRY` (its CSV columns, what it needs beyond samples and
held-out data, and its function of a model's samples `[n, length]`); `METRICS` is the main job's
default, `ALL_METRICS` everything. A new metric is one function and one entry.
- `mmd2`: unbiased kernel MMD² (exponentiated Hamming kernel) between samples and held-out data —
  lower is better, 0 for a perfect sampler up to noise (with its standard error `mmd2_se`);
- `teacher_nelbo`: the negative ELBO (bits/token) of the samples under the reference teacher —
  how likely the teacher finds them; lower is more teacher-like (can be gamed by low diversity,
  so read it together with mmd2 and entropy);
- `entropy`: per-sequence unigram entropy of the samples (nats), the mode-collapse detector;
- `unique`: the fraction of distinct sequences among the samples (`unique_fraction`);
- `gen_ppl`: generative perplexity under a reference autoregressive LM (token-weighted, float64);
  gameable: repeating one likely sequence keeps it low;
- `gm`: gradient moment ‖E_model ∇ψ log p_ψ − E_data ∇ψ log p_ψ‖² under the reference LM, model
  samples vs held-out data, mean ± standard error over independent pairs (`gm`, `gm_se`);
- `frechet`, `precision_recall`: Fréchet distance and k-NN precision / recall (`precision`,
  `recall`) of image samples vs held-out images in the feature space of the project's own small
  classifier (`models/feature_net.py`) — NOT comparable to Inception-FID;
- `confidence`: that classifier's mean top-class probability on the samples (`confidence`, higher
  = more recognisable; compare with the data row) and how many classes its predictions cover
  (`classes_present`), the "samples a person recognises" check beside `frechet`;
- `copy_rate`, `exact_nll`: exact metrics of the synthetic mirror source (`data/synthetic.py`): the
  fraction of samples whose second half is the reversed first half (`copy_rate`, and the
  per-position `copy_position_agreement`), and the mean exact −log p_data (nats/sequence) over
  the valid samples with the `valid_fraction`.

Prompted completions (`prompt_len` = n > 0: every sample's first n tokens are a held-out
prefix): `gen_ppl` and `gm` score the continuation tokens[:, n:] given the prefix under the
reference LM, `mmd2` and `entropy` the continuation positions (`Context.continuation`); the other
metrics score whole sequences, prompt included.

Reference models: `gen_ppl` and `gm` take any object with the interface of
`models.reference_lm.Trained` (what `reference_lm.load` returns for the project's LM).
"""

import dataclasses
from collections.abc import Callable

import jax
import numpy as np

from dmmd_jax.data import synthetic as synthetic_lib
from dmmd_jax.data import types as data_types
from dmmd_jax.evaluation import metrics as metrics_lib
from dmmd_jax.models import feature_net as feature_net_lib


@dataclasses.dataclass
class Resources:
  """Optional scorers beyond the reference teacher (see the module docstring)."""

  reference_lm: object = None
  feature_net: feature_net_lib.FeatureNet | None = None
  synthetic: synthetic_lib.SyntheticSource | None = None
  gm_pairs: int = 16
  micro_batch: int = 64


@dataclasses.dataclass
class Context:
  """What every metric function may read; `cache` keeps held-out features between calls.

  prompt_len: n > 0 when the samples continue n-token prompts (see the module docstring).
  """

  held_out: np.ndarray
  reference: object
  resources: Resources
  seed: int
  prompt_len: int = 0
  cache: dict = dataclasses.field(default_factory=dict)

  def continuation(self, tokens):
    """The generated positions: int `[n, L]` → `[n, L − prompt_len]`."""
    return tokens[:, self.prompt_len:]

  def held_out_features(self):
    if "features" not in self.cache:
      self.cache["features"] = self.resources.feature_net.features(self.held_out)
    return self.cache["features"]


def _mmd2(samples, ctx, memo):
  value, stderr = metrics_lib.mmd2_with_stderr(ctx.continuation(samples),
                                               ctx.continuation(ctx.held_out))
  return {"mmd2": float(value), "mmd2_se": float(stderr)}


def _teacher_nelbo(samples, ctx, memo):
  return {"teacher_nelbo": ctx.reference.negative_elbo_bits(samples)}


def _entropy(samples, ctx, memo):
  return {"entropy": float(metrics_lib.unigram_entropy(ctx.continuation(samples),
                                                       memo["vocab_size"]))}


def _unique(samples, ctx, memo):
  return {"unique_fraction": metrics_lib.unique_fraction(samples)}


def _gen_ppl(samples, ctx, memo):
  lm = ctx.resources.reference_lm
  result = metrics_lib.generative_perplexity(lm.log_prob_fn, samples, ctx.resources.micro_batch,
                                             start=max(1, ctx.prompt_len))
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
  loglik_fn = lm.loglik_fn_from(ctx.prompt_len) if ctx.prompt_len else lm.loglik_fn
  result = metrics_lib.gradient_moment(loglik_fn, lm.params, samples, ctx.held_out,
                                       jax.random.PRNGKey(ctx.seed), pairs, r.micro_batch)
  return {"gm": result.mean, "gm_se": result.stderr}


def _net_outputs(samples, ctx, memo):
  """(logits, features) of the samples under the feature net, computed once per sample set."""
  if "net_outputs" not in memo:
    memo["net_outputs"] = ctx.resources.feature_net.outputs(samples)
  return memo["net_outputs"]


def _features(samples, ctx, memo):
  return _net_outputs(samples, ctx, memo)[1]


def _confidence(samples, ctx, memo):
  confidence, classes = metrics_lib.classifier_confidence(_net_outputs(samples, ctx, memo)[0])
  return {"confidence": confidence, "classes_present": classes}


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


@dataclasses.dataclass(frozen=True)
class Metric:
  """A metric: the columns its function returns, and what it needs besides samples and data."""

  columns: tuple
  fn: Callable  # (samples int [n, L], context, memo dict) -> {column: float}
  needs: str | None = None  # a key of HOW


# What a metric may need, and how a user provides it.
HOW = {"teacher": "a teacher workdir among --workdirs (or --reference)",
       "reference_lm": "--reference_lm=DIR (experiments/train_reference_lm.py)",
       "feature_net": "--feature_net=DIR (experiments/train_feature_net.py)",
       "synthetic": "workdirs trained on the synthetic source (configs/synthetic.py)"}
REGISTRY = {
    "mmd2": Metric(("mmd2", "mmd2_se"), _mmd2),
    "teacher_nelbo": Metric(("teacher_nelbo",), _teacher_nelbo, "teacher"),
    "entropy": Metric(("entropy",), _entropy),
    "unique": Metric(("unique_fraction",), _unique),
    "gen_ppl": Metric(("gen_ppl",), _gen_ppl, "reference_lm"),
    "gm": Metric(("gm", "gm_se"), _gm, "reference_lm"),
    "frechet": Metric(("frechet",), _frechet, "feature_net"),
    "precision_recall": Metric(("precision", "recall"), _precision_recall, "feature_net"),
    "confidence": Metric(("confidence", "classes_present"), _confidence, "feature_net"),
    "copy_rate": Metric(("copy_rate", "copy_position_agreement"), _copy_rate, "synthetic"),
    "exact_nll": Metric(("exact_nll", "valid_fraction"), _exact_nll, "synthetic"),
}
METRICS = ("mmd2", "teacher_nelbo", "entropy")
ALL_METRICS = tuple(REGISTRY)
# Columns where higher is better; entropy has no better side (closeness to the data's matters);
# every other column is lower-is-better.
HIGHER_IS_BETTER = ("copy_rate", "copy_position_agreement", "valid_fraction", "precision",
                    "recall", "confidence", "classes_present")
UNORDERED = ("entropy", "unique_fraction")


def check_metric_names(names) -> None:
  """ValueError for unknown or no metric names."""
  unknown = [n for n in names if n not in REGISTRY]
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
    needs = REGISTRY[name].needs
    if needs and not have[needs]:
      raise ValueError(f"metric {name} needs {HOW[needs]}.")


def check_resources(resources: Resources, info: data_types.DataInfo) -> None:
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


def check_prompt_len(prompt_len: int | None, seq_len: int) -> None:
  """ValueError unless prompt_len is None (no prompts) or in [1, seq_len)."""
  if prompt_len is not None and not 1 <= prompt_len < seq_len:
    raise ValueError(f"--prompt_len must lie in [1, {seq_len}) (the samples have {seq_len} "
                     f"tokens and need at least one to generate), got {prompt_len}.")


def score(samples: np.ndarray, held_out: np.ndarray, reference, vocab_size: int,
          names=METRICS, *, resources: Resources | None = None, seed: int = 0,
          context: "Context | None" = None, prompt_len: int | None = None) -> dict:
  """The metrics `names` of samples int `[n, L]` against held-out data int `[m, L]`.

  reference: the teacher of `teacher_nelbo` (a `training.trained_model.Model`; may be None when
    it is not asked for).
  resources: the reference LM / feature net / synthetic source the other metrics need.
  context: a `Context` shared between calls (caches the held-out features), else one is built.
  prompt_len: without a context: the samples continue prompts of this many tokens (module
    docstring), or None.
  Returns {column: float} with each name's `REGISTRY[name].columns`, in order.
  """
  resources = resources or Resources()
  check_metrics(names, reference, resources)
  check_prompt_len(prompt_len, held_out.shape[1])
  samples = data_types.check_tokens(samples, vocab_size, held_out.shape[1])
  ctx = context or Context(np.asarray(held_out), reference, resources, seed, prompt_len or 0)
  memo, out = {"vocab_size": vocab_size}, {}
  for name in names:
    out.update(REGISTRY[name].fn(samples, ctx, memo))
  return out
