r"""Pre-tokenize a corpus once into memory-mappable shards (for data.source="tokens").

    python experiments/prepare_data.py --input=corpus.txt --output_dir=data/corpus_char \
        --tokenizer=char
    python experiments/prepare_data.py --input=docs/ --output_dir=data/owt --tokenizer=gpt2
    python experiments/prepare_data.py --tfds_name=openwebtext --output_dir=data/owt \
        --tokenizer=gpt2

--input is a text file, a JSONL file (one {"text": ...} per line) or a directory of them. Then
train with --config.data.source=tokens --config.data.path=DIR. A killed run resumes when the same
command is run again; finished shards are never rewritten.
"""

import sys

from absl import app, flags

from dmmd_jax import cli
from dmmd_jax.data import token_shards

_INPUT = flags.DEFINE_string("input", "", "Text file, JSONL file, or a directory of them.")
_TFDS = flags.DEFINE_string("tfds_name", "", "A tfds text dataset instead of --input.")
_TFDS_DIR = flags.DEFINE_string("tfds_data_dir", "", "tfds data dir (default: tfds's own).")
_OUTPUT = flags.DEFINE_string("output_dir", None, "Directory for the shards and index.json.")
_TOKENIZER = flags.DEFINE_enum("tokenizer", "char", token_shards.TOKENIZERS, "Tokenizer.")
_EVAL = flags.DEFINE_float("eval_fraction", 0.05, "Held-out fraction (separate shards); a tfds "
                           "test/validation split is used instead when there is one.")
_SHARD_MB = flags.DEFINE_float("shard_mb", 64.0, "Input megabytes per shard.")
_PIECE_MB = flags.DEFINE_float("piece_mb", 8.0, "Input megabytes tokenised at a time.")
_FIELD = flags.DEFINE_string("jsonl_field", "text", "The text field of JSONL records.")
_WORKERS = flags.DEFINE_integer("workers", 0, "Tokenizer processes (0: one per CPU).")
flags.mark_flags_as_required(["output_dir"])


def main(argv):
  del argv
  request = token_shards.Request(
      input_path=_INPUT.value, tfds_name=_TFDS.value, tfds_data_dir=_TFDS_DIR.value,
      tokenizer=_TOKENIZER.value, eval_fraction=_EVAL.value, shard_mb=_SHARD_MB.value,
      piece_mb=_PIECE_MB.value, jsonl_field=_FIELD.value)
  try:
    index = token_shards.prepare(_OUTPUT.value, request, workers=_WORKERS.value)
  except (token_shards.ShardError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  counts = index["num_tokens"]
  print(f"prepared {_OUTPUT.value}: {counts['train']:,} train + {counts['eval']:,} held-out "
        f"tokens in {len(index['shards'])} shards, vocabulary {index['vocab_size']} "
        f"({index['dtype']})")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
