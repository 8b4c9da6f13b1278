"""Load any workdir written by this project (teacher or student) as a ready-to-sample model."""

import dataclasses
import functools

import jax
import numpy as np

from dmmd_jax.data import prompts
from dmmd_jax.diffusion import elbo
from dmmd_jax.infra import checkpoints
from dmmd_jax.infra import workdir as workdir_lib
from dmmd_jax.models import blocks
from dmmd_jax.training import dmmd_run
from dmmd_jax.training import setup as setup_lib


@dataclasses.dataclass
class Model:
  """A trained teacher or student: setup (config, data, kernel, network) plus EMA parameters."""

  workdir: str
  kind: str  # "teacher" | "student"
  setup: setup_lib.Setup
  params: dict
  student_steps: int | None  # k for students

  @property
  def default_steps(self) -> int:
    return self.student_steps or self.setup.config.sample.steps

  @functools.cached_property
  def _noise(self):
    if self.kind != "student":
      return None
    return dmmd_run.student_noise_fn(self.setup, setup_lib.estimator_config_of(self.setup.config))

  def noise_fn(self):
    return self._noise

  @functools.cached_property
  def _elbo_loss(self):
    s = self.setup
    return jax.jit(functools.partial(elbo.diffusion_loss, apply_fn=s.apply_fn, kernel=s.kernel,
                                     uniform_elbo_steps=s.config.train.uniform_elbo_steps,
                                     context=s.is_block))

  def sample(self, num_samples: int, steps: int | None = None, seed: int = 0, batch_size=None,
             on_chunk=None, prompt: prompts.Prompt | None = None, length: int | None = None,
             **sampler_overrides) -> np.ndarray:
    """int32 `[num_samples, length]`, drawn in chunks of `batch_size` (default: all at once).

    Chunk j uses the key fold_in(key(seed + 1_000_003 j), 0), so the first chunk does not depend
    on batch_size; on_chunk(count) is called after each chunk (e.g. a progress bar's update).
    prompt: tokens kept fixed (a prefix or an infilling template); checked before compiling.
    length: tokens per sample (default the trained length; other lengths need a block model,
    whose steps are then per block).
    """
    sampler_cfg = setup_lib.sampler_config_of(self.setup.config, steps or self.default_steps,
                                              **sampler_overrides)
    sampler_cfg.validate()
    length, fixed, fixed_tokens = self.request(num_samples, length, prompt)
    batch_size = batch_size or num_samples
    out = []
    for j, start in enumerate(range(0, num_samples, batch_size)):
      count = min(batch_size, num_samples - start)
      key = jax.random.fold_in(jax.random.key(seed + 1_000_003 * j), 0)
      rows = (None, None) if prompt is None else (fixed[start:start + count],
                                                  fixed_tokens[start:start + count])
      out.append(np.asarray(blocks.sample_model(
          key, self.setup.apply_fn, self.params, self.setup.kernel, sampler_cfg,
          self.setup.model_cfg, count, length, self.noise_fn(), *rows)))
      if on_chunk is not None:
        on_chunk(count)
    return np.concatenate(out)

  def request(self, num_samples: int, length: int | None = None,
              prompt: prompts.Prompt | None = None):
    """(length, fixed, fixed_tokens) of a sampling request, or ValueError before any work.

    fixed bool / fixed_tokens int `[num_samples, length]` (None without a prompt).
    """
    length = length or self.setup.seq_len
    if length != self.setup.seq_len and not self.setup.is_block:
      raise ValueError(f"this whole-sequence model generates exactly {self.setup.seq_len} "
                       "tokens; other lengths need a block model (model.block_size).")
    if self.setup.is_block and length % self.setup.model_cfg.block_size:
      raise ValueError(f"the length ({length}) must be a multiple of the block size "
                       f"({self.setup.model_cfg.block_size}).")
    if prompt is None:
      return length, None, None
    return (length, *prompt.arrays(num_samples, length, self.setup.kernel.vocab_size))

  def negative_elbo_bits(self, tokens: np.ndarray, seed: int = 0, repeats: int = 4) -> float:
    """Mean negative ELBO (bits/token) of `tokens` under this model (teacher's ELBO)."""
    nats = [float(np.mean(self._elbo_loss(jax.random.key(seed + r), self.params, x=tokens)))
            for r in range(repeats)]
    return float(np.mean(nats)) / (self.setup.seq_len * np.log(2.0))


def load(workdir: str) -> Model:
  """Rebuild config, data, network and EMA parameters from a workdir (reads its config.json)."""
  config = workdir_lib.load_config(workdir)
  info = workdir_lib.load_run_info(workdir)
  batch = config.train.batch_size if info["kind"] == "teacher" else config.distill.batch_size
  setup = setup_lib.build_setup(config, batch)
  name = "ema_params" if info["kind"] == "teacher" else "student_ema"
  params = dmmd_run.place_params(checkpoints.load_params(workdir, name), setup)
  return Model(workdir, info["kind"], setup, params, info.get("student_steps"))
