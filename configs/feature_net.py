r"""The image feature network of the Fréchet distance and precision/recall metrics.

    python experiments/train_feature_net.py --config=configs/feature_net.py:small \
        --workdir=runs/feature_net_digits
    python experiments/train_feature_net.py --config=configs/feature_net.py:small \
        --config.data_from=runs/fm_teacher --workdir=runs/feature_net_fm

The data default to scikit-learn digits (17 grey levels, as configs/digits.py); --config.data_from
takes the data section of a teacher/student workdir instead, so the network sees the same token
images (same source and quantisation) as the models it will score. Fashion-MNIST labels come from
the Debian package dataset-fashion-mnist.
"""

from dmmd_jax import config_lib

SIZES = {
    "tiny": dict(channels=(8, 16, 16), feature_dim=32, num_steps=400, batch_size=32,
                 learning_rate=5e-3),
    "small": dict(channels=(32, 64, 64), feature_dim=64, num_steps=2000, batch_size=128,
                  learning_rate=2e-3),
}


def get_config(preset: str = "small"):
  preset = config_lib.check_preset(preset, tuple(SIZES))
  size = SIZES[preset]
  config = config_lib.base_config(config_lib.FeatureNetRunConfig)
  config.model.channels = size["channels"]
  config.model.feature_dim = size["feature_dim"]
  for key in ("num_steps", "batch_size", "learning_rate"):
    config.train[key] = size[key]
  return config_lib.finish(config, preset)
