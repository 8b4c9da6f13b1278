r"""Train the reference autoregressive LM of the gen_ppl and gm metrics (experiments/evaluate.py).

    python experiments/train_reference_lm.py --config=configs/reference_lm.py:small \
        --config.data_from=runs/shk_teacher --workdir=runs/ref_lm

Writes WORKDIR/reference_lm.json (model config, data description, history) and
WORKDIR/params.npz; `evaluation.load_reference_lm(WORKDIR)` reads them. Training is short and
does not resume: rerunning retrains from scratch.
"""

from absl import app, flags
from ml_collections import config_flags

from dmmd_jax import cli
from dmmd_jax.training import reference_lm_run

_CONFIG = config_flags.DEFINE_config_file("config", "configs/reference_lm.py:small",
                                          "Reference-LM config file[:preset].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  result = cli.run(reference_lm_run.train_reference, _CONFIG.value, _WORKDIR.value)
  print(f"reference LM done: held-out NLL {result['eval_nll']:.4f} nats/token "
        f"(perplexity {result['eval_ppl']:.3f}) → {_WORKDIR.value}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
