r"""scikit-learn digits: 1,797 images of 8×8 pixels with 17 grey levels, as 64 pixel tokens.

The fastest real image dataset: the embedded demo (README Quickstart) runs on it.

    python experiments/train_teacher.py --config=configs/digits.py:small --workdir=runs/digits

Students use the multi-resolution noise pyramid (model.noise_kind=pyramid).
"""

from dmmd_jax import config_lib

SIZES = {
    "tiny": {**config_lib.TINY_LOOP, "model.noise_dim": 6},
    "small": {"model.num_layers": 3, "model.width": 96, "model.num_heads": 4,
              "model.cond_dim": 64, "model.noise_dim": 24, "train.batch_size": 32,
              "train.num_steps": 1200, "train.learning_rate": 2e-3, "train.warmup_steps": 100,
              "train.ema_decay": 0.99, "train.eval_every": 600, "train.checkpoint_every": 600,
              "sample.steps": 64, "distill.batch_size": 32, "distill.num_steps": 1000,
              "distill.joint_updates": True, "distill.curriculum": True,
              "distill.learning_rate": 6e-4, "distill.aux_learning_rate": 1e-3,
              "distill.checkpoint_every": 300, "distill.log_every": 50},
    "base": {"model.num_layers": 8, "model.width": 512, "model.num_heads": 8,
             "model.cond_dim": 128, "model.noise_dim": 48, "train.batch_size": 256,
             "train.num_steps": 50_000, "train.learning_rate": 5e-4, "train.warmup_steps": 1000,
             "train.ema_decay": 0.9995, "train.eval_every": 5000,
             "train.checkpoint_every": 5000, "distill.batch_size": 256,
             "distill.num_steps": 10_000, "distill.checkpoint_every": 2000},
}


def get_config(preset: str = "small"):
  preset = config_lib.check_preset(preset)
  config = config_lib.base_config()
  config.data.source = "digits"
  config.data.eval_fraction = 0.1
  config.model.noise_kind = "pyramid"
  config.model.pyramid_levels = 3
  config_lib.apply_overrides(config, SIZES[preset])
  return config_lib.finish(config, preset)
