r"""Train the image feature network of the frechet and precision_recall metrics.

    python experiments/train_feature_net.py --config=configs/feature_net.py:small \
        --config.data_from=runs/digits_teacher --workdir=runs/feature_net

Writes WORKDIR/feature_net.json (network config, data description, accuracies) and
WORKDIR/params.npz; `feature_net.load(WORKDIR)` reads them. Its Fréchet distances are NOT
comparable to Inception-FID (see dmmd_jax/feature_net.py).
"""

from absl import app, flags
from ml_collections import config_flags

from dmmd_jax import cli
from dmmd_jax.training import feature_net_run

_CONFIG = config_flags.DEFINE_config_file("config", "configs/feature_net.py:small",
                                          "Feature-net config file[:preset].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  result = cli.run(feature_net_run.train_and_save, _CONFIG.value, _WORKDIR.value)
  print(f"feature net done: held-out accuracy {result['eval_accuracy']:.4f} "
        f"(train {result['train_accuracy']:.4f}) → {_WORKDIR.value}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
