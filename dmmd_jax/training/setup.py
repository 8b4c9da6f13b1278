"""A run's setup: typed config → data, forward process, network config and mesh, all checked.

`build_setup` is where a config becomes library objects (the one place that translates config
sections: `forward_process_of`, `denoiser_config_of`, `sampler_config_of`,
`estimator_config_of`). Everything that can be
checked (config values, data, vocabulary, mesh) is checked before anything is compiled or written.
"""

import dataclasses
import functools

import numpy as np

from dmmd_jax import config_lib
from dmmd_jax.data import sources
from dmmd_jax.data import types as data_types
from dmmd_jax.diffusion import forward_process, sampling
from dmmd_jax.distill import dmmd
from dmmd_jax.infra import sharding
from dmmd_jax.infra import workdir as workdir_lib
from dmmd_jax.models import blocks, denoiser


@dataclasses.dataclass
class Setup:
  """Everything a run needs, built and validated before any compile."""

  config: config_lib.ExperimentConfig
  info: data_types.DataInfo
  train_tokens: np.ndarray
  eval_tokens: np.ndarray
  kernel: forward_process.ForwardProcess
  model_cfg: denoiser.DenoiserConfig
  mesh: object

  @functools.cached_property
  def apply_fn(self):
    """One partial per setup: jit caches by identity, a new partial per call would recompile."""
    return functools.partial(blocks.apply if self.is_block else denoiser.apply, cfg=self.model_cfg)

  @property
  def is_block(self) -> bool:
    """A block-autoregressive model: its apply_fn also takes the clean context (`blocks.py`)."""
    return self.model_cfg.block_size > 0

  @property
  def seq_len(self) -> int:
    return self.info.seq_len


def forward_process_of(config: config_lib.ExperimentConfig,
                       vocab_size: int) -> forward_process.ForwardProcess:
  config = config_lib.typed(config)
  return forward_process.ForwardProcess(config.kernel.kind, vocab_size, config.kernel.schedule)


def denoiser_config_of(config: config_lib.ExperimentConfig, kernel: forward_process.ForwardProcess,
                       seq_len: int, image_shape=()) -> denoiser.DenoiserConfig:
  m = config_lib.typed(config).model
  return denoiser.DenoiserConfig(
      vocab_size=kernel.vocab_size, input_vocab_size=kernel.input_vocab_size, seq_len=seq_len,
      num_layers=m.num_layers, width=m.width, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio,
      cond_dim=m.cond_dim, dtype=m.dtype, time_conditioning=m.time_conditioning,
      mask_id=kernel.mask_id if kernel.is_masked else -1, noise_kind=m.noise_kind,
      noise_dim=m.noise_dim if m.noise_kind != "none" else 0,
      image_shape=tuple(image_shape or ()), pyramid_levels=m.pyramid_levels,
      attention_impl=m.attention_impl, remat=m.remat,
      block_size=0 if m.block_size == seq_len else m.block_size,  # one block = whole-sequence
      vocab_multiple=m.vocab_multiple, absolute_positions=m.absolute_positions)


def sampler_config_of(config: config_lib.ExperimentConfig, steps: int | None = None,
                      **overrides) -> sampling.SamplerConfig:
  """The config's sampler with `steps` (default config.sample.steps) and non-None overrides."""
  options = dataclasses.asdict(config_lib.typed(config).sample)
  options["steps"] = steps or options["steps"]
  options.update({k: v for k, v in overrides.items() if v is not None})
  return sampling.SamplerConfig(**options)


def estimator_config_of(config: config_lib.ExperimentConfig) -> dmmd.EstimatorConfig:
  """The D-MMD estimator's static options; the noise input only where the model has one."""
  config = config_lib.typed(config)
  d = config.distill
  use_noise = (d.use_noise and config.model.noise_kind != "none"
               and (config.kernel.kind == "masked" or d.uniform_noise))
  return dmmd.EstimatorConfig(
      student_steps=d.student_steps, samples_per_z=d.samples_per_z, soft_targets=d.soft_targets,
      teacher_temperature=d.teacher_temperature, teacher_top_p=d.teacher_top_p,
      top_p_mode=d.top_p_mode, top_p_delta=d.top_p_delta, posterior_gap=d.posterior_gap,
      use_noise=use_noise, uniform_estimator=d.uniform_estimator,
      time_grid=config.sample.grid if d.time_sampling == "grid" else "")


def data_config_of(run_config) -> config_lib.DataConfig:
  """run_config.data, or the data section of the workdir named by run_config.data_from.

  For the reference LM's and the feature net's runs: `data_from` makes them read exactly the
  tokens of the models they will score.
  """
  if run_config.data_from:
    return workdir_lib.load_config(run_config.data_from).data
  return run_config.data


def build_setup(config, batch_size: int) -> Setup:
  """Validate config, load and check data, build kernel/model config and mesh. No compile."""
  config = config_lib.typed(config)
  config_lib.validate(config)
  train_tokens, eval_tokens, info = sources.load_dataset(config.data)
  kernel = forward_process_of(config, info.vocab_size)
  model_cfg = denoiser_config_of(config, kernel, info.seq_len, info.image_shape or ())
  try:
    denoiser.validate_config(model_cfg)
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from None
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_divisibility(mesh, batch_size, model_cfg.width)
  return Setup(config, info, train_tokens, eval_tokens, kernel, model_cfg, mesh)
