r"""Fashion-MNIST: 70,000 images of 28×28 pixels, 256 grey levels, as 784 pixel tokens.

The analogue of the paper's CIFAR-10 pixel setting (uniform teacher: --config.kernel.kind=uniform).
Read from the Debian package dataset-fashion-mnist, else tfds fashion_mnist.

    python experiments/train_teacher.py --config=configs/fashion_mnist.py:base --workdir=runs/fm

small quantises to 16 grey levels and keeps 10k images so that it trains on 2 CPU cores.
"""

from dmmd_jax import config_lib

SIZES = {
    "tiny": {**config_lib.TINY_LOOP, "data.levels": 4, "data.max_examples": 256,
             "model.num_layers": 1, "model.width": 32, "model.cond_dim": 16, "model.noise_dim": 6,
             "train.batch_size": 4, "train.num_steps": 6, "train.warmup_steps": 2,
             "train.log_every": 3, "train.eval_every": 6, "train.eval_batches": 1,
             "train.checkpoint_every": 6, "train.num_samples": 2, "sample.steps": 4,
             "distill.batch_size": 4, "distill.num_steps": 6, "distill.warmup_steps": 2,
             "distill.log_every": 3, "distill.checkpoint_every": 6, "distill.eval_samples": 4},
    "small": {"data.levels": 16, "data.max_examples": 10_000, "model.num_layers": 4,
              "model.width": 128, "model.num_heads": 4, "model.cond_dim": 64,
              "model.noise_dim": 24, "train.batch_size": 16, "train.num_steps": 2000,
              "train.learning_rate": 1e-3, "train.ema_decay": 0.99, "sample.steps": 256,
              "distill.batch_size": 16, "distill.num_steps": 400,
              "distill.learning_rate": 1e-4, "distill.aux_learning_rate": 1e-4},
    "base": {"model.num_layers": 12, "model.width": 768, "model.num_heads": 12,
             "model.cond_dim": 128, "model.noise_dim": 48, "model.dtype": "bfloat16",
             "train.batch_size": 128, "train.num_steps": 300_000, "train.learning_rate": 3e-4,
             "train.warmup_steps": 2500, "train.ema_decay": 0.9999, "train.eval_every": 5000,
             "train.checkpoint_every": 5000, "sample.steps": 1024, "distill.batch_size": 128,
             "distill.num_steps": 20_000, "distill.learning_rate": 3e-5,
             "distill.aux_learning_rate": 3e-5, "distill.checkpoint_every": 2000},
}


def get_config(preset: str = "small"):
  preset = config_lib.check_preset(preset)
  config = config_lib.base_config()
  config.data.source = "fashion_mnist"
  config.model.noise_kind = "pyramid"
  config.model.pyramid_levels = 3
  config_lib.apply_overrides(config, SIZES[preset])
  return config_lib.finish(config, preset)
