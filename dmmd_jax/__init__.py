"""dmmd_jax: Discrete Moment Matching Distillation in JAX/Flax.

What a notebook needs, importable from the package (loaded lazily, so `import dmmd_jax.config_lib`
in a config file does not import jax):

    config = dmmd_jax.load_config("configs/digits.py:tiny", {"train.num_steps": 50})
    dmmd_jax.train_teacher(config, "runs/teacher")
    dmmd_jax.distill_student(dmmd_jax.student_config(config, "runs/teacher", 4), "runs/k4")
    dmmd_jax.distill_students(config, "runs/teacher", [4, 16], lambda k: f"runs/k{k}")  # chained
    model = dmmd_jax.load_model("runs/k4")          # teacher or student workdir
    tokens = model.sample(16)                       # int32 [16, length]
    rows = dmmd_jax.evaluate([model], ...)          # or evaluate_workdirs / run_main_job

Subpackages follow the data flow (docs/architecture.md): config_lib → data → infra → diffusion →
models → distill → training → evaluation → (main_job, cli, the binaries).
"""

import importlib

_API = {
    "load_config": ("dmmd_jax.config_lib", "load_file"),
    "ExperimentConfig": ("dmmd_jax.config_lib", "ExperimentConfig"),
    "train_teacher": ("dmmd_jax.training.teacher_run", "train_teacher"),
    "distill_student": ("dmmd_jax.training.dmmd_run", "distill_student"),
    "distill_sdtt": ("dmmd_jax.training.sdtt_run", "distill_sdtt"),
    "student_config": ("dmmd_jax.main_job", "student_config"),
    "distill_students": ("dmmd_jax.main_job", "distill_students"),
    "load_model": ("dmmd_jax.training.trained_model", "load"),
    "evaluate": ("dmmd_jax.evaluation.compare", "evaluate"),
    "evaluate_workdirs": ("dmmd_jax.evaluation.compare", "evaluate_workdirs"),
    "format_table": ("dmmd_jax.evaluation.report", "format_table"),
    "run_main_job": ("dmmd_jax.main_job", "run_main_job"),
}
__all__ = sorted(_API)


def __getattr__(name):
  if name not in _API:
    raise AttributeError(f"module 'dmmd_jax' has no attribute {name!r}")
  module, attr = _API[name]
  return getattr(importlib.import_module(module), attr)
