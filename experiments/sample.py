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

from dmmd_jax import cli, prompts, runs, train

_WORKDIR = flags.DEFINE_string("workdir", None, "A teacher or student workdir.")
_STEPS = flags.DEFINE_integer("steps", None, "Sampling steps (default: the model's own).")
_NUM = flags.DEFINE_integer("num_samples", 16, "Number of sequences.")
_OUTPUT = flags.DEFINE_string("output", "samples.npy", "Output .npy path.")
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
  if _NUM.value <= 0:
    raise ValueError(f"--num_samples must be positive, got {_NUM.value}.")
  model = runs.load(_WORKDIR.value)
  prompt = prompts.from_flags(model.setup.info, _PROMPT.value, _PROMPT_FILE.value,
                              _PROMPT_TOKENS.value, _FILL_MARKER.value)
  tokens = model.sample(_NUM.value, _STEPS.value, _SEED.value, batch_size=_BATCH.value,
                        prompt=prompt, length=_LENGTH.value, top_p=_TOP_P.value,
                        temperature=_TEMPERATURE.value)
  os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
  np.save(_OUTPUT.value, tokens.astype(np.int32))
  return train.dump_samples(model.setup, tokens, os.path.splitext(_OUTPUT.value)[0])


def main(argv):
  del argv
  path = cli.run(sample_to_files)
  print(f"wrote {_OUTPUT.value} and {path}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
