r"""The reference autoregressive LM of the generative-perplexity and gradient-moment metrics.

    python experiments/train_reference_lm.py --config=configs/reference_lm.py:small \
        --workdir=runs/ref_lm_shk
    python experiments/train_reference_lm.py --config=configs/reference_lm.py:small \
        --config.data_from=runs/shk_teacher --workdir=runs/ref_lm_shk

It must read the same tokens as the models it scores (same tokenizer, vocabulary and a max length
≥ theirs). The data default to Shakespeare characters with the window of
configs/shakespeare_char.py's preset of the same name (tiny: 32, small: 128); --config.data.* set
another source, and --config.data_from=WORKDIR copies the data section of a teacher or student
workdir (recommended: nothing can drift).
"""

from dmmd_jax import config_lib

SIZES = {
    "tiny": dict(seq_len=32, num_layers=1, width=32, num_heads=2, num_steps=100, batch_size=16,
                 learning_rate=3e-3, log_every=50),
    "small": dict(seq_len=128, num_layers=2, width=128, num_heads=4, num_steps=2000,
                  batch_size=32, learning_rate=1e-3, log_every=200),
    "base": dict(seq_len=1024, num_layers=6, width=512, num_heads=8, num_steps=50_000,
                 batch_size=64, learning_rate=5e-4, log_every=1000),
}


def get_config(preset: str = "small"):
  preset = config_lib.check_preset(preset)
  size = SIZES[preset]
  config = config_lib.base_config(config_lib.ReferenceLMRunConfig)
  config.data.seq_len = size["seq_len"]
  for key in ("num_layers", "width", "num_heads"):
    config.model[key] = size[key]
  for key in ("num_steps", "batch_size", "learning_rate", "log_every"):
    config.train[key] = size[key]
  return config_lib.finish(config, preset)
