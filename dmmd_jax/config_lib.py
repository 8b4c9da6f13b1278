"""Typed, frozen experiment configs: defaults, presets, conversion and validation. Imports no jax.

A config file in `configs/` calls `base_config()` (an `ml_collections.ConfigDict` built from the
dataclass defaults below, locked, so `--config.unknown_key=…` fails in the flag parser), fills in
data and per-preset sizes, and returns it. The library takes the typed form: `typed(config)` turns
a ConfigDict (or a dict, e.g. a stored `config.json`) into an `ExperimentConfig` of frozen
dataclasses once, at the boundary (binaries, `dmmd_jax.train_teacher`, …); nothing below it reads a
ConfigDict. `validate(config)` checks values and raises `ConfigError` with one readable line
before anything is compiled or written.

A new config key is one field with its default in one dataclass here (plus a check in `validate`
if a value can be wrong).
"""

import dataclasses
import importlib.util
import os
import pathlib
import typing
from collections.abc import Mapping

import ml_collections

PRESETS = ("tiny", "small", "base")
DATA_SOURCES = ("shakespeare", "text_file", "npy", "tfds_text", "synthetic", "fashion_mnist",
                "digits", "tfds_image", "tokens")
KERNEL_KINDS = ("masked", "uniform")
SCHEDULES = ("linear", "cosine")
TIME_GRIDS = ("uniform", "cosine")
TOP_P_MODES = ("hard", "soft")
NOISE_KINDS = ("none", "projection", "pyramid")
POSITIONS = ("learned", "rotary")
UNIFORM_ESTIMATORS = ("rao_blackwell", "soft")


class ConfigError(ValueError):
  """A config value that cannot work."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Which tokens to read (`data.sources.load_dataset` documents every field)."""

  source: str = "shakespeare"
  tokenizer: str = "char"
  path: str = ""
  vocab_size: int = 0
  seq_len: int = 128
  eval_fraction: float = 0.05
  tfds_name: str = ""
  tfds_data_dir: str = ""
  cache_dir: str = ""
  levels: int = 0
  max_examples: int = 0
  synthetic_seed: int = 0
  synthetic_concentration: float = 0.1
  verify_shards: str = "quick"  # source "tokens": "quick" (sizes) or "full" (checksums)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """The forward process: `kind` ∈ KERNEL_KINDS with noise `schedule` ∈ SCHEDULES."""

  kind: str = "masked"
  schedule: str = "linear"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The denoiser's sizes and options (`models.denoiser.DenoiserConfig`)."""

  num_layers: int = 4
  width: int = 256
  num_heads: int = 4
  mlp_ratio: int = 4
  cond_dim: int = 128
  dtype: str = "float32"
  time_conditioning: bool = True
  noise_kind: str = "projection"
  noise_dim: int = 32
  pyramid_levels: int = 3
  attention_impl: str = "xla"
  remat: str = "none"  # activation checkpointing of the blocks (`models.denoiser.REMAT`)
  block_size: int = 0  # > 0: block-autoregressive (`models/blocks.py`); 0 or L: whole-sequence
  # Embedding and output layer sized to the vocabulary rounded up to a multiple of this (e.g. 128:
  # a tensor axis must split them evenly, and GPT-2's 50,257 is prime to 2); the padded classes
  # are sliced off the logits, so every loss, sampler and metric sees the K real ones.
  vocab_multiple: int = 1
  # Learned absolute position embeddings added to the token embeddings, besides the rotary ones.
  # Rotary attention scores see relative offsets only; a source whose position i depends on
  # position L − 1 − i (configs/synthetic.py, the mirror) needs an offset that depends on i.
  absolute_positions: bool = False


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Teacher training (AdamW, warm-up + cosine, clipping, EMA) and its logging cadence."""

  batch_size: int = 32
  num_steps: int = 1000
  learning_rate: float = 1e-3
  warmup_steps: int = 100
  weight_decay: float = 0.01
  grad_clip: float = 1.0
  b1: float = 0.9
  b2: float = 0.99
  ema_decay: float = 0.999
  log_every: int = 50
  eval_every: int = 500
  eval_batches: int = 8
  checkpoint_every: int = 500
  keep_checkpoints: int = 2
  sample_every: int = 0
  num_samples: int = 16
  uniform_elbo_steps: int = 1000
  uniform_continuous_time: bool = True  # uniform teachers: train the T-step term at any t


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  """The ancestral sampler (`diffusion.sampling.SamplerConfig`)."""

  steps: int = 128
  grid: str = "uniform"
  temperature: float = 1.0
  top_p: float = 1.0
  float64: bool = True
  cache: bool = False


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh axis sizes; -1 = the remaining devices (`infra.sharding.make_mesh`)."""

  data: int = -1
  fsdp: int = 1
  tensor: int = 1


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """D-MMD distillation (and the SDTT baseline's shared keys): losses, optimizers, cadence."""

  teacher_workdir: str = ""
  # A D-MMD student run of the same teacher (e.g. fewer steps k) whose student, student EMA and
  # auxiliary start this run instead of teacher copies (a curriculum over k); "" = the teacher.
  init_workdir: str = ""
  # Multi-student drivers (main job, bench/sweep.py) distil in ascending k and start each student
  # after the first from the previous one (its init_workdir).
  curriculum: bool = False
  student_steps: int = 8
  num_steps: int = 1000
  batch_size: int = 32
  learning_rate: float = 1e-4
  aux_learning_rate: float = 1e-4
  warmup_steps: int = 50
  grad_clip: float = 1.0
  aux_updates_per_student: int = 1
  joint_updates: bool = False  # both networks from one draw per update (needs the ratio above = 1)
  soft_targets: bool = False
  teacher_temperature: float = 1.0
  teacher_top_p: float = 1.0
  top_p_mode: str = "soft"
  allow_hard_top_p: bool = False
  top_p_delta: float = 2.0
  samples_per_z: int = 1
  # Student times t: "continuous" anywhere in (0, 1] (the paper), "grid" only at the k times of
  # its sampling grid (sample.grid), `dmmd.sample_times`.
  time_sampling: str = "continuous"
  posterior_gap: float = 1e-3
  use_noise: bool = True
  uniform_noise: bool = False
  noise_init_scale: float = 1.0
  noise_lr_multiplier: float = 1.0
  ema_decay: float = 0.99
  log_every: int = 50
  eval_every: int = 200
  eval_samples: int = 64
  checkpoint_every: int = 500
  uniform_estimator: str = "soft"  # uniform kernel: "soft" or unbiased "rao_blackwell"
  score_dtype: str = "float32"  # teacher and auxiliary forwards in the D-MMD step
  diagnostic_buckets: int = 4  # moment mismatch / entropy per bucket of s, logged at eval


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """Everything a teacher, student or SDTT run reads; stored as the workdir's config.json."""

  seed: int = 0
  # Run-defining fields (comma-separated, e.g. "seed,distill.teacher_workdir") a resumed run may
  # change; by default any change is refused (infra/workdir_guard.py).
  resume_override: str = ""
  data: DataConfig = DataConfig()
  kernel: KernelConfig = KernelConfig()
  model: ModelConfig = ModelConfig()
  train: TrainConfig = TrainConfig()
  sample: SampleConfig = SampleConfig()
  mesh: MeshConfig = MeshConfig()
  distill: DistillConfig = DistillConfig()
  preset: str = ""


@dataclasses.dataclass(frozen=True)
class ReferenceModelConfig:
  num_layers: int = 2
  width: int = 128
  num_heads: int = 4
  mlp_ratio: int = 4
  positions: str = "learned"
  tie_embeddings: bool = True


@dataclasses.dataclass(frozen=True)
class ReferenceTrainConfig:
  num_steps: int = 2000
  batch_size: int = 32
  learning_rate: float = 1e-3
  weight_decay: float = 0.01
  log_every: int = 200
  eval_examples: int = 512


@dataclasses.dataclass(frozen=True)
class ReferenceLMRunConfig:
  """The reference autoregressive LM's run (configs/reference_lm.py)."""

  seed: int = 0
  data: DataConfig = DataConfig()
  data_from: str = ""
  model: ReferenceModelConfig = ReferenceModelConfig()
  train: ReferenceTrainConfig = ReferenceTrainConfig()
  preset: str = ""


@dataclasses.dataclass(frozen=True)
class FeatureModelConfig:
  channels: tuple = (32, 64, 64)
  feature_dim: int = 64


@dataclasses.dataclass(frozen=True)
class FeatureTrainConfig:
  num_steps: int = 2000
  batch_size: int = 128
  learning_rate: float = 2e-3
  weight_decay: float = 1e-4


@dataclasses.dataclass(frozen=True)
class FeatureNetRunConfig:
  """The image feature network's run (configs/feature_net.py)."""

  seed: int = 0
  data: DataConfig = DataConfig(source="digits", eval_fraction=0.1)
  data_from: str = ""
  model: FeatureModelConfig = FeatureModelConfig()
  train: FeatureTrainConfig = FeatureTrainConfig()
  preset: str = ""


# ---------------------------------------------------------------------------------------------
# ConfigDict ↔ dataclasses.


def to_dict(config) -> dict:
  """A typed config as nested plain dicts (JSON-ready)."""
  return dataclasses.asdict(config)


def flatten(config: dict) -> dict:
  """{"section.key": value} for nested dicts, {"key": value} for top-level values."""
  flat = {}
  for key, value in config.items():
    if isinstance(value, dict):
      flat.update({f"{key}.{k}": v for k, v in value.items()})
    else:
      flat[key] = value
  return flat


def to_configdict(config) -> ml_collections.ConfigDict:
  """The locked ConfigDict of a typed config (what config files and flags work on)."""
  return ml_collections.ConfigDict(to_dict(config))


def _convert(cls, values: Mapping, where: str, strict: bool):
  hints = typing.get_type_hints(cls)
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - known)
  if unknown and strict:
    raise ConfigError(f"unknown config key {where}{unknown[0]}.")
  kwargs = {}
  for name in known & set(values):
    value, hint = values[name], hints[name]
    if dataclasses.is_dataclass(hint):
      if not isinstance(value, Mapping):
        raise ConfigError(f"config.{where}{name} must be a section, got {value!r}.")
      value = _convert(hint, value, f"{where}{name}.", strict)
    elif isinstance(value, list):
      value = tuple(value)
    kwargs[name] = value
  return cls(**kwargs)


def typed(config, cls=ExperimentConfig, strict: bool = True):
  """`cls` from a ConfigDict or mapping (missing keys take defaults); a `cls` passes through.

  strict=False ignores unknown keys (configs stored by an older version of the project).
  """
  if isinstance(config, cls):
    return config
  if isinstance(config, ml_collections.ConfigDict):
    config = config.to_dict()
  if not isinstance(config, Mapping):
    raise ConfigError(f"expected a config, got {type(config).__name__}.")
  return _convert(cls, config, "", strict)


def replace(config, **sections):
  """A copy of a typed config with fields of its sections replaced: replace(c, distill={…})."""
  changes = {}
  for name, value in sections.items():
    current = getattr(config, name)
    changes[name] = (dataclasses.replace(current, **value) if isinstance(value, Mapping)
                     else value)
  return dataclasses.replace(config, **changes)


def base_config(cls=ExperimentConfig) -> ml_collections.ConfigDict:
  """The defaults of `cls` as an (unlocked) ConfigDict for a config file to fill in."""
  return to_configdict(cls())


# The `tiny` preset's loop settings, shared by every config: a few steps of everything.
TINY_LOOP = {
    "model.num_layers": 2, "model.width": 64, "model.num_heads": 2, "model.cond_dim": 32,
    "model.noise_dim": 8, "train.batch_size": 8, "train.num_steps": 20,
    "train.warmup_steps": 5, "train.log_every": 5, "train.eval_every": 10,
    "train.eval_batches": 2, "train.checkpoint_every": 10, "train.num_samples": 4,
    "sample.steps": 8, "distill.batch_size": 8, "distill.num_steps": 20,
    "distill.warmup_steps": 5, "distill.log_every": 5, "distill.checkpoint_every": 10,
    "distill.eval_samples": 8, "distill.student_steps": 4,
}


def finish(config: ml_collections.ConfigDict, preset: str) -> ml_collections.ConfigDict:
  """Record the preset and lock the config (unknown keys become errors)."""
  config.preset = preset
  config.lock()
  return config


def check_preset(preset: str, presets=PRESETS) -> str:
  preset = preset or "small"
  if preset not in presets:
    raise ConfigError(f"Unknown preset {preset!r}; choose one of {tuple(presets)}.")
  return preset


def load_file(spec: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
  """The config of a config file "path/to/config.py[:preset]", with {"section.key": value} set.

  What `--config=path:preset --config.section.key=value` gives a binary; for notebooks and
  scripts. Raises ConfigError for a missing file or an unknown key.
  """
  path, _, preset = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path} does not exist.")
  module_spec = importlib.util.spec_from_file_location(
      f"dmmd_config_{pathlib.Path(path).stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(preset) if preset else module.get_config()
  for dotted, value in (overrides or {}).items():
    *sections, key = dotted.split(".")
    node = config
    for section in sections:
      node = node[section] if section in node else None
      if node is None:
        raise ConfigError(f"config.{dotted} is not a known key.")
    if key not in node:
      raise ConfigError(f"config.{dotted} is not a known key.")
    node[key] = value
  return config


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict) -> None:
  """Set nested values from {"section.key": value} (keys must already exist)."""
  for dotted, value in overrides.items():
    section, key = dotted.split(".")
    if key not in config[section]:
      raise ConfigError(f"config.{dotted} is not a known key.")
    config[section][key] = value


# ---------------------------------------------------------------------------------------------
# Validation.


def _check(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)


def _check_signs(config, positive=(), non_negative=()) -> None:
  for key in positive + non_negative:
    section, name = key.split(".")
    value = getattr(getattr(config, section), name)
    if key in positive:
      _check(value > 0, f"config.{key} must be positive, got {value}.")
    else:
      _check(value >= 0, f"config.{key} must be non-negative, got {value}.")


def _check_choice(value, choices, key: str) -> None:
  _check(value in choices, f"config.{key} must be one of {choices}, got {value!r}.")


def validate_data(data: DataConfig) -> None:
  _check_choice(data.source, DATA_SOURCES, "data.source")
  _check_choice(data.tokenizer, ("char", "gpt2"), "data.tokenizer")
  _check_choice(data.verify_shards, ("quick", "full"), "data.verify_shards")
  _check(0.0 <= data.eval_fraction < 1.0,
         f"config.data.eval_fraction must be in [0, 1), got {data.eval_fraction}.")
  for name in ("seq_len", "levels", "max_examples", "vocab_size"):
    value = getattr(data, name)
    _check(value >= 0, f"config.data.{name} must be non-negative, got {value}.")


def validate(config) -> None:
  """Check every value that can be checked without data; raise ConfigError (one line).

  The model section is checked once, by `models.denoiser.validate_config` (in
  `training.setup.build_setup`), where the data's length and image shape are known too.
  """
  config = typed(config)
  validate_data(config.data)
  _check(config.data.eval_fraction > 0.0,
         "config.data.eval_fraction must be positive: runs evaluate on held-out data.")
  _check_choice(config.kernel.kind, KERNEL_KINDS, "kernel.kind")
  _check_choice(config.kernel.schedule, SCHEDULES, "kernel.schedule")
  _check_choice(config.sample.grid, TIME_GRIDS, "sample.grid")
  _check_choice(config.distill.top_p_mode, TOP_P_MODES, "distill.top_p_mode")
  _check_signs(config, positive=(
      "train.batch_size", "train.num_steps", "train.learning_rate", "train.log_every",
      "train.eval_batches", "train.checkpoint_every", "train.keep_checkpoints",
      "train.uniform_elbo_steps", "sample.steps", "sample.temperature",
      "distill.student_steps", "distill.num_steps", "distill.batch_size",
      "distill.learning_rate", "distill.aux_learning_rate", "distill.samples_per_z",
      "distill.aux_updates_per_student", "distill.posterior_gap", "distill.log_every",
      "distill.checkpoint_every", "distill.teacher_temperature",
      "distill.noise_lr_multiplier", "distill.diagnostic_buckets"), non_negative=(
      "train.warmup_steps", "train.eval_every", "train.sample_every", "distill.warmup_steps",
      "distill.eval_every", "distill.noise_init_scale", "model.block_size"))
  _check(config.model.vocab_multiple > 0,
         f"config.model.vocab_multiple must be positive, got {config.model.vocab_multiple}.")
  block, length = config.model.block_size, config.data.seq_len
  _check(not (block and length and length % block),
         f"model.block_size ({block}) must divide data.seq_len ({length}).")
  _check(0.0 < config.sample.top_p <= 1.0,
         f"config.sample.top_p must be in (0, 1], got {config.sample.top_p}.")
  _check(0.0 <= config.train.ema_decay < 1.0 and 0.0 <= config.distill.ema_decay < 1.0,
         "train.ema_decay and distill.ema_decay must be in [0, 1).")
  _check(0.0 < config.distill.teacher_top_p <= 1.0,
         f"distill.teacher_top_p must be in (0, 1], got {config.distill.teacher_top_p}.")
  _check(config.distill.top_p_mode != "hard" or config.distill.allow_hard_top_p,
         "distill.top_p_mode='hard' makes the student loss diverge (the paper's ablation); set "
         "--config.distill.allow_hard_top_p=True to run it anyway.")
  _check_choice(config.distill.uniform_estimator, UNIFORM_ESTIMATORS, "distill.uniform_estimator")
  _check_choice(config.distill.time_sampling, ("continuous", "grid"), "distill.time_sampling")
  _check(not config.distill.joint_updates or config.distill.aux_updates_per_student == 1,
         "distill.joint_updates trains both networks at every update, so "
         "distill.aux_updates_per_student must stay 1 (got "
         f"{config.distill.aux_updates_per_student}); turn joint_updates off to use a ratio.")
  _check_choice(config.distill.score_dtype, ("float32", "bfloat16"), "distill.score_dtype")
  _check(not config.distill.soft_targets or config.kernel.kind == "masked",
         "distill.soft_targets is defined for the masked kernel only.")
  _check(config.distill.posterior_gap < 1.0, "distill.posterior_gap must be in (0, 1).")
  for field in filter(None, (f.strip() for f in config.resume_override.split(","))):
    section, _, key = field.partition(".")
    value = getattr(config, section, None)
    known = (key in {f.name for f in dataclasses.fields(value)} if dataclasses.is_dataclass(value)
             else value is not None and not key)
    _check(known, f"resume_override: {field!r} is not a config field (e.g. "
           "'seed,distill.teacher_workdir').")

