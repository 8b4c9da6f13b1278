r"""Your own tokens: an int array [N, length] saved with numpy.save.

    python experiments/train_teacher.py --config=configs/npy_tokens.py:small \
        --config.data.path=my_tokens.npy --config.data.vocab_size=1000 --workdir=runs/mine

The sequence length is taken from the array; ids must lie in [0, vocab_size).
"""

from dmmd_jax import config_lib

SIZES = {
    "tiny": {**config_lib.TINY_LOOP, "train.eval_batches": 1},
    "small": {"model.num_layers": 4, "model.width": 128, "model.num_heads": 4,
              "model.cond_dim": 64, "model.noise_dim": 16, "train.batch_size": 32,
              "train.num_steps": 2000, "train.ema_decay": 0.99, "distill.num_steps": 400},
    "base": {"model.num_layers": 12, "model.width": 768, "model.num_heads": 12,
             "model.cond_dim": 128, "model.noise_dim": 64, "model.dtype": "bfloat16",
             "train.batch_size": 256, "train.num_steps": 200_000, "train.learning_rate": 3e-4,
             "train.warmup_steps": 2500, "train.ema_decay": 0.9999, "sample.steps": 1024,
             "distill.batch_size": 256, "distill.num_steps": 20_000,
             "distill.learning_rate": 3e-5, "distill.aux_learning_rate": 3e-5},
}


def get_config(preset: str = "small"):
  preset = config_lib.check_preset(preset)
  config = config_lib.base_config()
  config.data.source = "npy"
  config.data.seq_len = 0  # from the array
  config.data.eval_fraction = 0.05
  config_lib.apply_overrides(config, SIZES[preset])
  return config_lib.finish(config, preset)
