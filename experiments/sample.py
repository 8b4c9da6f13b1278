r"""Sample from any teacher or student workdir; writes int32 [N, length] tokens and text or PNG.

    python experiments/sample.py --workdir=runs/shk_k8 --num_samples=16 --output=samples.npy
    python experiments/sample.py --workdir=runs/shk_teacher --steps=256 --top_p=0.85 \
        --output=teacher.npy

--steps defaults to the student's k (students) or config.sample.steps (teachers).

Prompts (every model, both kernels): the prompt's tokens are kept fixed and the rest is sampled.

    python experiments/sample.py --workdir=runs/shk_teacher --prompt="ROMEO:" --num_samples=4
    python experiments/sample.py --workdir=runs/shk_teacher --fill_marker=_ \
        --prompt="To be, or ______ to be: that is the question"     # infilling
    python experiments/sample.py --workdir=runs/shk_teacher --prompt_tokens=prefixes.npy

--prompt_tokens takes int tokens [n] (one prompt for all samples) or [N, n] (one per sample).
Block models (model.block_size > 0) take --length (any multiple of the block size; beyond the
trained length the context slides) and --steps per block.
"""

import os

import numpy as np
from absl import app, flags
from tqdm import tqdm

from dmmd_jax import cli
from dmmd_jax.data import prompts, render
from dmmd_jax.infra import outputs
from dmmd_jax.training import trained_model

_WORKDIR = flags.DEFINE_string("workdir", None, "A teacher or student workdir.")
_STEPS = flags.DEFINE_integer("steps", None, "Sampling steps (default: the model's own).")
_NUM = flags.DEFINE_integer("num_samples", 16, "Number of sequences.")
_OUTPUT = flags.DEFINE_string("output", "samples.npy",
                              "Output .npy path (.npy is appended if missing).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus mass (default: the config's).")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "Temperature (default: the config's).")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Sequences per sampler call.")
_PROMPT = flags.DEFINE_string("prompt", "", "Text the samples start with (kept fixed).")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", "", "A text file holding the prompt.")
_PROMPT_TOKENS = flags.DEFINE_string("prompt_tokens", "", "A .npy of prompt tokens [n] or [N, n].")
_LENGTH = flags.DEFINE_integer(
    "length", None, "Tokens per sample (block models only; default: the trained length).")
_FILL_MARKER = flags.DEFINE_string(
    "fill_marker", "", "In a text prompt, this string marks one position to fill (infilling).")
flags.mark_flags_as_required(["workdir"])


def sample_to_files():
  """Validate flags and the output path, sample, write .npy plus text/PNG; returns both paths."""
  for flag, value in (("--num_samples", _NUM.value), ("--batch_size", _BATCH.value),
                      ("--steps", 1 if _STEPS.value is None else _STEPS.value)):
    if value < 1:
      raise ValueError(f"{flag} must be at least 1, got {value}.")
  output = outputs.npy_path(_OUTPUT.value)
  outputs.check_writable_file(output)
  model = trained_model.load(_WORKDIR.value)
  outputs.check_sample_memory(_NUM.value, _LENGTH.value or model.setup.seq_len)
  prompt = prompts.from_flags(model.setup.info, _PROMPT.value, _PROMPT_FILE.value,
                              _PROMPT_TOKENS.value, _FILL_MARKER.value)
  model.request(_NUM.value, _LENGTH.value, prompt)  # a bad prompt or length: one error line now
  with tqdm(total=_NUM.value, desc="sampling", unit="seq", dynamic_ncols=True) as bar:
    tokens = model.sample(_NUM.value, _STEPS.value, _SEED.value, batch_size=_BATCH.value,
                          prompt=prompt, length=_LENGTH.value, top_p=_TOP_P.value,
                          temperature=_TEMPERATURE.value, on_chunk=bar.update)
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  np.save(output, tokens.astype(np.int32))
  return output, render.dump_samples(model.setup.info, tokens, os.path.splitext(output)[0])


def main(argv):
  del argv
  output, dump = cli.run(sample_to_files)
  print(f"wrote {output} and {dump}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
