"""Shared config defaults, presets and validation for every experiment file in `configs/`.

An experiment file calls `base_config()`, fills in `data` and per-preset sizes, and returns it
locked, so `--config.unknown_key=…` fails in the flag parser. `validate(config)` then checks
values and raises `ConfigError` with one readable line before anything is compiled or written.
"""

import ml_collections

from dmmd_jax import data, denoiser, kernels, sampling, schedules, synthetic

PRESETS = ("tiny", "small", "base")


class ConfigError(ValueError):
  """A config value that cannot work."""


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = ml_collections.ConfigDict(dict(
      source="shakespeare", tokenizer="char", path="", vocab_size=0, seq_len=128,
      eval_fraction=0.05, tfds_name="", tfds_data_dir="", cache_dir="", levels=0,
      max_examples=0, synthetic_seed=0, synthetic_concentration=0.1))
  c.kernel = ml_collections.ConfigDict(dict(kind="masked", schedule="linear"))
  c.model = ml_collections.ConfigDict(dict(
      num_layers=4, width=256, num_heads=4, mlp_ratio=4, cond_dim=128, dtype="float32",
      time_conditioning=True, noise_kind="projection", noise_dim=32, pyramid_levels=3,
      attention_impl="xla", block_size=0))
  c.train = ml_collections.ConfigDict(dict(
      batch_size=32, num_steps=1000, learning_rate=1e-3, warmup_steps=100, weight_decay=0.01,
      grad_clip=1.0, b1=0.9, b2=0.99, ema_decay=0.999, log_every=50, eval_every=500,
      eval_batches=8, checkpoint_every=500, keep_checkpoints=2, sample_every=0,
      num_samples=16, uniform_elbo_steps=1000))
  c.sample = ml_collections.ConfigDict(dict(
      steps=128, grid="uniform", temperature=1.0, top_p=1.0, float64=True, cache=False))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.distill = ml_collections.ConfigDict(dict(
      teacher_workdir="", student_steps=8, num_steps=1000, batch_size=32, learning_rate=1e-4,
      aux_learning_rate=1e-4, warmup_steps=50, grad_clip=1.0, aux_updates_per_student=1,
      soft_targets=False, teacher_temperature=1.0, teacher_top_p=1.0, top_p_mode="soft",
      allow_hard_top_p=False, top_p_delta=2.0, samples_per_z=1, posterior_gap=1e-3,
      use_noise=True, uniform_noise=False, noise_init_scale=1.0, noise_lr_multiplier=1.0,
      ema_decay=0.99, log_every=50, eval_every=200, eval_samples=64, checkpoint_every=500))
  return c


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


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict) -> None:
  """Set nested values from {"section.key": value} (keys must already exist)."""
  for dotted, value in overrides.items():
    section, key = dotted.split(".")
    if key not in config[section]:
      raise ConfigError(f"config.{dotted} is not a known key.")
    config[section][key] = value


def kernel_from_config(config, vocab_size: int) -> kernels.Kernel:
  return kernels.Kernel(config.kernel.kind, vocab_size, config.kernel.schedule)


def denoiser_config(config, kernel: kernels.Kernel, seq_len: int,
                    image_shape=()) -> denoiser.DenoiserConfig:
  m = config.model
  noise_kind = m.noise_kind
  return denoiser.DenoiserConfig(
      vocab_size=kernel.vocab_size, input_vocab_size=kernel.input_vocab_size, seq_len=seq_len,
      num_layers=m.num_layers, width=m.width, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio,
      cond_dim=m.cond_dim, dtype=m.dtype, time_conditioning=m.time_conditioning,
      mask_id=kernel.mask_id if kernel.is_masked else -1, noise_kind=noise_kind,
      noise_dim=m.noise_dim if noise_kind != "none" else 0, image_shape=tuple(image_shape or ()),
      pyramid_levels=m.pyramid_levels, attention_impl=m.attention_impl,
      block_size=0 if m.block_size == seq_len else m.block_size)  # one block = whole-sequence


def sampler_config(config, steps: int | None = None, **overrides) -> sampling.SamplerConfig:
  s = config.sample
  options = dict(steps=steps or s.steps, grid=s.grid, temperature=s.temperature, top_p=s.top_p,
                 float64=s.float64, cache=s.cache)
  options.update({k: v for k, v in overrides.items() if v is not None})
  return sampling.SamplerConfig(**options)


def _positive(config, keys):
  for key in keys:
    section, name = key.split(".")
    value = config[section][name]
    if value <= 0:
      raise ConfigError(f"config.{key} must be positive, got {value}.")


def validate(config) -> None:
  """Check every value that can be checked without data; raise ConfigError (one line)."""
  try:
    kernels.Kernel(config.kernel.kind, 2, config.kernel.schedule)
    sampler_config(config).validate()
    schedules.time_grid(1, config.sample.grid)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  _positive(config, [
      "model.num_layers", "model.width", "model.num_heads", "model.mlp_ratio", "model.cond_dim",
      "train.batch_size", "train.num_steps", "train.learning_rate", "train.log_every",
      "train.eval_batches", "train.checkpoint_every", "train.keep_checkpoints",
      "train.uniform_elbo_steps", "distill.student_steps", "distill.num_steps",
      "distill.batch_size", "distill.learning_rate", "distill.aux_learning_rate",
      "distill.samples_per_z", "distill.aux_updates_per_student", "distill.posterior_gap",
      "distill.log_every", "distill.checkpoint_every", "distill.teacher_temperature",
      "distill.noise_lr_multiplier"])
  for key in ("train.warmup_steps", "train.eval_every", "train.sample_every",
              "distill.warmup_steps", "distill.eval_every", "distill.noise_init_scale",
              "model.block_size",
              "data.seq_len", "data.levels", "data.max_examples", "data.vocab_size"):
    section, name = key.split(".")
    if config[section][name] < 0:
      raise ConfigError(f"config.{key} must be non-negative, got {config[section][name]}.")
  if not 0.0 <= config.train.ema_decay < 1.0 or not 0.0 <= config.distill.ema_decay < 1.0:
    raise ConfigError("train.ema_decay and distill.ema_decay must be in [0, 1).")
  if config.data.source not in data.SOURCES:
    raise ConfigError(f"data.source must be one of {data.SOURCES}, got {config.data.source!r}.")
  if config.data.source == "synthetic":
    try:
      synthetic.source_from_data_fields(config.data)
    except synthetic.SyntheticError as e:
      raise ConfigError(f"data (synthetic source): {e}") from None
  if not 0.0 < config.data.eval_fraction < 1.0:
    raise ConfigError(f"data.eval_fraction must be in (0, 1), got {config.data.eval_fraction}.")
  if not 0.0 < config.distill.teacher_top_p <= 1.0:
    raise ConfigError(f"distill.teacher_top_p must be in (0, 1], got "
                      f"{config.distill.teacher_top_p}.")
  if config.distill.top_p_mode not in sampling.TOP_P_MODES:
    raise ConfigError(f"distill.top_p_mode must be one of {sampling.TOP_P_MODES}.")
  if config.distill.top_p_mode == "hard" and not config.distill.allow_hard_top_p:
    raise ConfigError("distill.top_p_mode='hard' makes the student loss diverge (the paper's "
                      "ablation); set --config.distill.allow_hard_top_p=True to run it anyway.")
  if config.distill.soft_targets and config.kernel.kind != "masked":
    raise ConfigError("distill.soft_targets is defined for the masked kernel only.")
  if config.distill.posterior_gap >= 1.0:
    raise ConfigError("distill.posterior_gap must be in (0, 1).")
  if config.model.noise_kind not in denoiser.NOISE_KINDS:
    raise ConfigError(f"model.noise_kind must be one of {denoiser.NOISE_KINDS}.")
  if config.model.dtype not in ("float32", "bfloat16"):
    raise ConfigError("model.dtype must be 'float32' or 'bfloat16'.")
  block, length = config.model.block_size, config.data.seq_len
  if block and length and length % block:
    raise ConfigError(f"model.block_size ({block}) must divide data.seq_len ({length}).")
  if config.model.width % config.model.num_heads:
    raise ConfigError(f"model.width ({config.model.width}) must be a multiple of "
                      f"model.num_heads ({config.model.num_heads}).")
