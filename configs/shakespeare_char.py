r"""Shakespeare's complete works, character level (84 symbols), masked diffusion by default.

    python experiments/train_teacher.py --config=configs/shakespeare_char.py:small \
        --workdir=runs/shk_teacher
    python experiments/distill.py --config=configs/shakespeare_char.py:small \
        --workdir=runs/shk_k8 --config.distill.teacher_workdir=runs/shk_teacher \
        --config.distill.student_steps=8
    python experiments/distill.py --config=configs/shakespeare_char.py:small \
        --workdir=runs/shk_k16 --config.distill.teacher_workdir=runs/shk_teacher \
        --config.distill.student_steps=16 --config.distill.init_workdir=runs/shk_k8

The small preset's students follow a curriculum over k (the k = 16 student starts from the k = 8
one: init_workdir above; the main job and bench/sweep.py chain them themselves).

Presets: tiny (seconds, tests), small (2 CPU cores, minutes), base (GPU/TPU, ≈170M, 1024 chars).
Block-autoregressive (blocks.py): block_tiny (tests), block (256 characters in blocks of 32,
2 CPU cores), block_small (64 in blocks of 32, bench/block_table3.py); sample.steps and
distill.student_steps are then per block:

    python experiments/train_teacher.py --config=configs/shakespeare_char.py:block \
        --workdir=runs/shk_block_teacher
    python experiments/sample.py --workdir=runs/shk_block_teacher --prompt="ROMEO:" \
        --length=512 --steps=32
Uniform diffusion: --config.kernel.kind=uniform (students get no noise input, as in the paper,
unless --config.distill.uniform_noise=True).
"""

from dmmd_jax import config_lib

SIZES = {
    "tiny": {**config_lib.TINY_LOOP, "data.seq_len": 32},
    "small": {"data.seq_len": 128, "model.num_layers": 4, "model.width": 128,
              "model.num_heads": 4, "model.cond_dim": 64, "model.noise_dim": 16,
              "train.batch_size": 32, "train.num_steps": 1500, "train.learning_rate": 2e-3,
              "train.warmup_steps": 100, "train.eval_every": 500, "train.checkpoint_every": 500,
              "train.ema_decay": 0.99, "sample.steps": 128, "distill.batch_size": 32,
              # The distillation recipe chosen on digits' training rows (BENCHMARKS.md,
              # "Distillation settings sweep"), not on Shakespeare's held-out text: joint updates,
              # a curriculum over k, student lr 6e-4; 1,400 updates (fixed on training rows,
              # RESULTS.md §1b): 24–27 min per student on 2 cores (BENCHMARKS.md).
              "distill.num_steps": 1400, "distill.joint_updates": True,
              "distill.curriculum": True, "distill.learning_rate": 6e-4,
              "distill.aux_learning_rate": 1e-3, "distill.checkpoint_every": 250,
              "distill.log_every": 25},
    # 22 layers: without a 50k-token embedding, depth brings the network to ≈170M parameters.
    "base": {"data.seq_len": 1024, "model.num_layers": 22, "model.width": 768,
             "model.num_heads": 12, "model.cond_dim": 128, "model.noise_dim": 64,
             "model.dtype": "bfloat16", "train.batch_size": 256, "train.num_steps": 200_000,
             "train.learning_rate": 3e-4, "train.warmup_steps": 2500, "train.ema_decay": 0.9999,
             "train.eval_every": 5000, "train.checkpoint_every": 5000, "sample.steps": 1024,
             "distill.batch_size": 256, "distill.num_steps": 20_000,
             "distill.learning_rate": 3e-5, "distill.aux_learning_rate": 3e-5,
             "distill.checkpoint_every": 2000},
    "block_tiny": {**config_lib.TINY_LOOP, "data.seq_len": 32, "model.block_size": 8},
    "block": {"data.seq_len": 256, "model.block_size": 32, "model.num_layers": 4,
              "model.width": 128, "model.num_heads": 4, "model.cond_dim": 64,
              "model.noise_dim": 16, "train.batch_size": 16, "train.num_steps": 1500,
              "train.learning_rate": 2e-3, "train.warmup_steps": 100, "train.eval_every": 500,
              "train.checkpoint_every": 500, "train.ema_decay": 0.99, "sample.steps": 32,
              "distill.batch_size": 16, "distill.num_steps": 400, "distill.learning_rate": 3e-4,
              "distill.aux_learning_rate": 3e-4, "distill.checkpoint_every": 200,
              "distill.log_every": 25},
    # bench/block_table3.py: 64 characters in blocks of 32, a 2-layer network (teacher, reference
    # LM, 3 students and the evaluation: 60 min on the 2-core VM at load average 8–10).
    "block_small": {"data.seq_len": 64, "model.block_size": 32, "model.num_layers": 2,
                    "model.width": 128, "model.num_heads": 4, "model.cond_dim": 64,
                    "model.noise_dim": 16, "train.batch_size": 32, "train.num_steps": 1200,
                    "train.learning_rate": 2e-3, "train.warmup_steps": 100,
                    "train.eval_every": 400, "train.checkpoint_every": 400,
                    "train.ema_decay": 0.99, "sample.steps": 32, "distill.batch_size": 16,
                    "distill.num_steps": 300, "distill.learning_rate": 3e-4,
                    "distill.aux_learning_rate": 3e-4, "distill.checkpoint_every": 150,
                    "distill.log_every": 25, "distill.student_steps": 4},
}


def get_config(preset: str = "small"):
  preset = config_lib.check_preset(preset, SIZES)
  config = config_lib.base_config()
  config.data.source = "shakespeare"
  config.data.tokenizer = "char"
  config_lib.apply_overrides(config, SIZES[preset])
  return config_lib.finish(config, preset)
