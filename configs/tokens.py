r"""A pre-tokenized corpus streamed from disk (data.source="tokens"), e.g. OpenWebText in GPT-2 BPE.

    python experiments/prepare_data.py --tfds_name=openwebtext --output_dir=data/owt \
        --tokenizer=gpt2
    python experiments/train_teacher.py --config=configs/tokens.py:base \
        --config.data.path=data/owt --workdir=runs/owt_teacher

data.tokenizer must match the prepared directory (gpt2 here; --config.data.tokenizer=char for a
character corpus). base is the paper's OpenWebText network (≈170M parameters, 1024 tokens);
large (≈1.2B parameters: 18 layers, width 2048) shards its parameters over all devices (fsdp)
and recomputes its blocks (model.remat=block); bench/memory.py compiles it on 8 emulated devices
and BENCHMARKS.md records its per-device memory.
"""

from dmmd_jax import config_lib

_BASE = {"data.seq_len": 1024, "model.num_layers": 12, "model.width": 768,
         "model.num_heads": 12, "model.cond_dim": 128, "model.noise_dim": 64,
         "model.dtype": "bfloat16", "train.batch_size": 256, "train.num_steps": 500_000,
         "train.learning_rate": 3e-4, "train.warmup_steps": 2500, "train.ema_decay": 0.9999,
         "train.eval_every": 5000, "train.checkpoint_every": 5000, "sample.steps": 1024,
         "sample.top_p": 0.85, "distill.batch_size": 256, "distill.num_steps": 20_000,
         "distill.learning_rate": 3e-5, "distill.aux_learning_rate": 3e-5,
         "distill.teacher_top_p": 0.85, "distill.student_steps": 16,
         "distill.checkpoint_every": 2000}

SIZES = {
    "tiny": {**config_lib.TINY_LOOP, "data.seq_len": 32, "train.batch_size": 4,
             "train.num_steps": 10, "train.warmup_steps": 2, "train.eval_batches": 1,
             "train.num_samples": 2, "sample.steps": 4, "distill.batch_size": 4,
             "distill.num_steps": 10, "distill.warmup_steps": 2, "distill.eval_samples": 4},
    "small": {"data.seq_len": 128, "model.num_layers": 4, "model.width": 256,
              "model.num_heads": 4, "model.cond_dim": 64, "model.noise_dim": 16,
              "train.batch_size": 16, "train.num_steps": 2000, "train.ema_decay": 0.99,
              "distill.batch_size": 16, "distill.num_steps": 400},
    "base": _BASE,
    "large": {**_BASE, "model.num_layers": 18, "model.width": 2048, "model.num_heads": 16,
              "model.cond_dim": 256, "model.noise_dim": 128, "model.remat": "block",
              "mesh.data": 1, "mesh.fsdp": -1, "train.learning_rate": 2e-4,
              "distill.learning_rate": 2e-5, "distill.aux_learning_rate": 2e-5},
}


def get_config(preset: str = "small"):
  preset = preset or "small"
  if preset not in SIZES:
    raise config_lib.ConfigError(f"Unknown preset {preset!r}; choose one of {tuple(SIZES)}.")
  config = config_lib.base_config()
  config.data.source = "tokens"
  config.data.tokenizer = "gpt2"
  config_lib.apply_overrides(config, SIZES[preset])
  return config_lib.finish(config, preset)
