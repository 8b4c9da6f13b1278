r"""Sample teachers and students at several step counts, score them, write a table and plots.

    python experiments/evaluate.py --workdirs=runs/teacher,runs/k4,runs/k8,runs/sdtt_k4 \
        --steps=4,8,16,32,64,128,256,512,1024 --metrics=mmd2,entropy,gen_ppl,gm \
        --reference_lm=runs/ref_lm --output_dir=runs/eval [--num_samples=1024]
    python experiments/evaluate.py --workdirs=runs/digits_teacher,runs/digits_k4 \
        --metrics=mmd2,entropy,frechet,precision_recall --feature_net=runs/feature_net \
        --output_dir=runs/eval_digits
    python experiments/evaluate.py --workdirs=runs/teacher,runs/k8 --prompt_len=64 \
        --metrics=gen_ppl,gm,entropy --reference_lm=runs/ref_lm --output_dir=runs/eval_prompted

Teachers are sampled at every --steps value, students at their own k and every larger value.
Metrics: mmd2, teacher_nelbo, entropy, gen_ppl, gm (need --reference_lm), frechet,
precision_recall (need --feature_net), copy_rate, exact_nll (need workdirs trained on
configs/synthetic.py). --sample_files=a.npy,b.npy adds rows for token arrays (e.g. from
experiments/sample.py or another model). Writes OUTPUT_DIR/results.{json,csv},
comparison.png, plots/<metric>.png, samples/ and samples_overview.{png,txt}; prints the table.
--prompt_len=N scores prompted completions: sample i of every model continues the first N tokens
of held-out row i (the same prefixes for every model and step count); gen_ppl and gm then score
the continuation given the prefix, mmd2 and entropy the continuation positions.
"""

from absl import app, flags

from dmmd_jax import cli
from dmmd_jax.evaluation import compare, registry, report

_WORKDIRS = flags.DEFINE_list("workdirs", None, "Teacher/student workdirs (one dataset).")
_STEPS = flags.DEFINE_list("steps", ["4", "8", "16", "32", "64", "128", "256"],
                           "Sampling step counts.")
_METRICS = flags.DEFINE_list("metrics", list(registry.METRICS),
                             f"Metrics, from {','.join(registry.ALL_METRICS)}.")
_OUTPUT = flags.DEFINE_string("output_dir", None, "Where results, plots and samples go.")
_REFERENCE_LM = flags.DEFINE_string("reference_lm", None, "Reference-LM directory (gen_ppl, gm).")
_FEATURE_NET = flags.DEFINE_string("feature_net", None,
                                   "Feature-net directory (frechet, precision_recall).")
_REFERENCE = flags.DEFINE_string("reference", None, "Workdir whose held-out data and teacher "
                                 "are the reference (default: first teacher in --workdirs).")
_SAMPLE_FILES = flags.DEFINE_list("sample_files", [], ".npy token arrays to score as extra rows.")
_NUM = flags.DEFINE_integer("num_samples", 256, "Samples per (model, steps).")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Sequences per sampler call.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", None, "Continue held-out prefixes of this many "
                                   "tokens and score the continuations (default: no prompts).")
_SAVE = flags.DEFINE_bool("save_samples", True, "Write every sample set under OUTPUT_DIR/samples.")
flags.mark_flags_as_required(["workdirs", "output_dir"])


def main(argv):
  del argv
  rows = cli.run(compare.evaluate_workdirs, _WORKDIRS.value, _STEPS.value, _METRICS.value,
                 _OUTPUT.value, num_samples=_NUM.value, reference_lm=_REFERENCE_LM.value,
                 feature_net=_FEATURE_NET.value, reference=_REFERENCE.value,
                 sample_files=_SAMPLE_FILES.value, seed=_SEED.value, batch_size=_BATCH.value,
                 save_sample_files=_SAVE.value, prompt_len=_PROMPT_LEN.value)
  print()
  print(report.format_table(rows))
  print(f"\nresults: {_OUTPUT.value}/results.csv, plot: {_OUTPUT.value}/comparison.png")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
