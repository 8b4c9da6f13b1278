r"""Per-device memory and FLOPs of the base presets, compiled ahead of time on emulated devices.

    python bench/memory.py --preset=text --meshes=1,data8,fsdp8 --steps=teacher,student,aux
    python bench/memory.py --preset=text --meshes=1 --remat=none,block,dots_saveable
    python bench/memory.py --preset=text --meshes=1 --batch=8 --json=rows.jsonl  (and --batch=4)
    python bench/memory.py --fit_from=rows.jsonl
    python bench/memory.py --preset=large --meshes=fsdp8
    python bench/memory.py --preset=text --meshes=d2f2t2 --vocab_multiple=128

Nothing runs: every step is `jax.jit(step).lower(abstract arguments).compile()` on
`--xla_force_host_platform_device_count=8` CPU devices, with parameters, optimizer states and
batches as `jax.ShapeDtypeStruct`s carrying their shardings (nothing is materialised). For each
(step, mesh, remat) it prints the executable's per-device memory (`memory_analysis()`: arguments
+ outputs − donated aliases + temporaries) and per-device FLOPs (`cost_analysis()`), and the
compiled FLOPs of all devices against the analytic count:

    forward F = B · [L · (2·N_tok + 4·L·d·layers) + 2·N_seq]
      N_tok: weights applied per token (12·d²·layers with mlp_ratio 4, the d·K logits with K
      padded to --vocab_multiple, the noise projection), N_seq: per-sequence weights (time MLP,
      adaLN), 4·L·d·layers: QKᵀ and AV.
    teacher step = 3F (forward + backward); D-MMD student update = 3F (student) + F (teacher)
      + F (auxiliary); auxiliary update = F (student) + F (teacher) + 3F (auxiliary).

With remat the backward recomputes the blocks' forward, so the compiled count rises by up to F
(by design). --fit_from fits memory(b) = a + b·c per device to the one-device rows of a --json
file compiled at two or more batch sizes and reports the largest per-device batch under 80 GB and
16 GB.

Presets: text = configs/shakespeare_bpe.py:base (GPT-2 vocabulary, L = 1024); images =
configs/fashion_mnist.py:base (256 grey levels, L = 784); large = configs/tokens.py:large;
text_small = configs/shakespeare_bpe.py:small (quick to compile).
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8")

import dataclasses  # noqa: E402
import functools  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import time  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from dmmd_jax import config_lib  # noqa: E402
from dmmd_jax.data import types as data_types  # noqa: E402
from dmmd_jax.infra import sharding  # noqa: E402
from dmmd_jax.models import denoiser  # noqa: E402
from dmmd_jax.training import dmmd_run, teacher_run  # noqa: E402
from dmmd_jax.training import setup as setup_lib  # noqa: E402
from dmmd_jax.training import state as state_lib  # noqa: E402

_PRESET = flags.DEFINE_enum("preset", "text", ["text", "images", "large", "text_small"],
                            "Which preset.")
_MESHES = flags.DEFINE_list("meshes", ["1"], "Meshes: 1, data8, fsdp8, tensor8, d2f2t2, …")
_STEPS = flags.DEFINE_list("steps", ["teacher", "student", "aux"], "Steps to compile.")
_REMAT = flags.DEFINE_list("remat", ["none"], "model.remat values.")
_VOCAB_MULTIPLE = flags.DEFINE_integer(
    "vocab_multiple", 1, "model.vocab_multiple (128: GPT-2's vocabulary splits over tensor axes).")
_BATCH = flags.DEFINE_integer("batch", 8, "Per-device batch (global = per-device × data×fsdp).")
_FIT = flags.DEFINE_string("fit_from", "", "Instead of compiling: the largest per-device batch "
                           "under 80 / 16 GB from the one-device rows of this --json file.")
_JSON = flags.DEFINE_string("json", "", "Append result rows (JSON lines) to this file.")

REPO = pathlib.Path(__file__).resolve().parents[1]
PRESETS = {"text": ("shakespeare_bpe", "base", 50257, 1024, None),
           "images": ("fashion_mnist", "base", 256, 784, (28, 28, 1)),
           "large": ("tokens", "large", 50257, 1024, None),
           "text_small": ("shakespeare_bpe", "small", 50257, 128, None)}
MESHES = {"1": (1, 1, 1), "data8": (8, 1, 1), "fsdp8": (1, 8, 1), "tensor8": (1, 1, 8),
          "d2f2t2": (2, 2, 2), "d4t2": (4, 1, 2), "f4t2": (1, 4, 2)}
GB = 1e9


def load_config(preset: str, remat: str, global_batch: int):
  name, size, *_ = PRESETS[preset]
  spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(size)
  config.model.remat = remat
  config.model.vocab_multiple = _VOCAB_MULTIPLE.value
  config.train.batch_size = config.distill.batch_size = global_batch
  return config


def abstract_setup(preset: str, mesh_name: str, remat: str, per_device: int):
  """A setup.Setup without data (kernel, network config, mesh), and the global batch size."""
  _, _, vocab, seq_len, image_shape = PRESETS[preset]
  shape = MESHES[mesh_name]
  mesh = Mesh(np.asarray(jax.devices()[:int(np.prod(shape))]).reshape(shape), sharding.MESH_AXES)
  global_batch = per_device * shape[0] * shape[1]
  config = load_config(preset, remat, global_batch)
  kernel = setup_lib.forward_process_of(config, vocab)
  model_cfg = setup_lib.denoiser_config_of(config, kernel, seq_len, image_shape or ())
  info = data_types.DataInfo(kind="image" if image_shape else "text", vocab_size=vocab,
                       seq_len=seq_len, image_shape=image_shape)
  return setup_lib.Setup(config_lib.typed(config), info, None, None, kernel, model_cfg,
                         mesh), global_batch


def abstract_params(setup):
  boxed = jax.eval_shape(functools.partial(denoiser.init_params, cfg=setup.model_cfg),
                         jax.random.key(0))
  shardings = sharding.logical_shardings(boxed, setup.mesh)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      nn.unbox(boxed), shardings)


def abstract_opt_state(optimizer, params, mesh):
  """optimizer.init(params) as ShapeDtypeStructs, each moment sharded like its parameter (the
  rule of state.init_opt_state: a state leaf takes the sharding of the parameter whose key path
  ends its own and whose shape it has; counters are replicated)."""
  by_path = {tuple(map(str, p)): x for p, x in jax.tree_util.tree_leaves_with_path(params)}

  def place(path, leaf):
    names = tuple(map(str, path))
    for n in range(len(names), 0, -1):
      param = by_path.get(names[-n:])
      if param is not None and param.shape == leaf.shape:
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=param.sharding)
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding.replicated(mesh))

  return jax.tree_util.tree_map_with_path(place, jax.eval_shape(optimizer.init, params))


def _scalar(mesh):
  return jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh))


def _batch(setup, global_batch):
  return jax.ShapeDtypeStruct((global_batch, setup.seq_len), jnp.int32,
                              sharding=sharding.batch_sharding(setup.mesh))


def lower_teacher(setup, global_batch):
  optimizer = teacher_run.teacher_optimizer(setup.config)
  params = abstract_params(setup)
  state = state_lib.TrainState(step=_scalar(setup.mesh), params=params, ema_params=params,
                           opt_state=abstract_opt_state(optimizer, params, setup.mesh))
  shardings = jax.tree.map(lambda x: x.sharding, state)
  step = teacher_run.compile_teacher_step(setup, optimizer, shardings)
  return step.lower(state, _batch(setup, global_batch))


def lower_distill(setup, global_batch, which: str):
  student_opt, aux_opt = dmmd_run.distill_optimizers(setup.config)
  params = abstract_params(setup)
  state = dmmd_run.DistillState(
      step=_scalar(setup.mesh), student=params, student_ema=params, aux=params,
      student_opt=abstract_opt_state(student_opt, params, setup.mesh),
      aux_opt=abstract_opt_state(aux_opt, params, setup.mesh))
  shardings = jax.tree.map(lambda x: x.sharding, state)
  teacher_shardings = jax.tree.map(lambda x: x.sharding, params)
  cfg = setup_lib.estimator_config_of(setup.config)
  updates = dmmd_run.compile_updates(setup, cfg, student_opt, aux_opt, shardings,
                                     teacher_shardings)
  fn = getattr(updates, which)
  return fn.lower(state, params, _batch(setup, global_batch))


def forward_flops(cfg: denoiser.DenoiserConfig, batch: int, noise: bool) -> float:
  """Matmul FLOPs of one forward pass over `batch` sequences (see the module docstring)."""
  d, length, layers = cfg.width, cfg.seq_len, cfg.num_layers
  per_token = layers * (4 + 2 * cfg.mlp_ratio) * d * d + d * cfg.padded_vocab_size
  per_token += cfg.noise_dim * d if noise and cfg.noise_kind != "none" else 0
  per_seq = d * d + d * cfg.cond_dim + layers * cfg.cond_dim * 6 * d + cfg.cond_dim * 2 * d
  return batch * (length * (2 * per_token + 4 * length * d * layers) + 2 * per_seq)


def analytic_flops(step: str, cfg: denoiser.DenoiserConfig, batch: int) -> float:
  plain = forward_flops(cfg, batch, noise=False)
  if step == "teacher":
    return 3 * plain
  student = forward_flops(cfg, batch, noise=True)
  return (3 * student + 2 * plain) if step == "student" else (student + 4 * plain)


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  return cost[0] if isinstance(cost, list) else cost


def measure(step: str, mesh_name: str, remat: str, per_device: int) -> dict:
  """Compiles one step; returns its per-device memory and FLOPs against the analytic count."""
  setup, global_batch = abstract_setup(_PRESET.value, mesh_name, remat, per_device)
  start = time.perf_counter()
  lowered = (lower_teacher(setup, global_batch) if step == "teacher"
             else lower_distill(setup, global_batch, step))
  compiled = lowered.compile()
  seconds = time.perf_counter() - start
  mem = compiled.memory_analysis()
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
          + mem.temp_size_in_bytes)
  devices = setup.mesh.size
  flops = float(_cost(compiled).get("flops", float("nan")))
  analytic = analytic_flops(step, setup.model_cfg, global_batch)
  return dict(preset=_PRESET.value, step=step, mesh=mesh_name, remat=remat,
              per_device_batch=per_device, global_batch=global_batch, devices=devices,
              params_m=_param_count(setup) / 1e6, peak_gb=peak / GB,
              args_gb=mem.argument_size_in_bytes / GB, temp_gb=mem.temp_size_in_bytes / GB,
              flops_per_device=flops, compiled_over_analytic=flops * devices / analytic,
              compile_s=seconds)


@functools.cache
def _param_count_of(model_cfg) -> int:
  shapes = jax.eval_shape(functools.partial(denoiser.init_params, cfg=model_cfg),
                          jax.random.key(0))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes)))


def _param_count(setup) -> int:
  return _param_count_of(dataclasses.replace(setup.model_cfg, remat="none"))


def fit_batches(rows: list) -> list:
  """Largest per-device batch under 80 GB and 16 GB for each (preset, step, remat) compiled on
  one device at two or more batch sizes: memory is affine in the batch, a + b·c."""
  groups = {}
  for row in rows:
    if row.get("mesh") == "1" and "peak_gb" in row:
      key = (row["preset"], row["step"], row["remat"])
      groups.setdefault(key, {})[row["per_device_batch"]] = row["peak_gb"]
  fits = []
  for (preset, step, remat), points in sorted(groups.items()):
    if len(points) < 2:
      continue
    batches = sorted(points)
    slope, fixed = np.polyfit(batches, [points[b] for b in batches], 1)
    fits.append(dict(preset=preset, step=step, remat=remat, batches=batches, fixed_gb=fixed,
                     gb_per_example=slope, **{f"max_batch_{cap}gb": int((cap - fixed) // slope)
                                               for cap in (80, 16)}))
  return fits


def emit(row: dict) -> None:
  print(" | ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in row.items()), flush=True)
  if _JSON.value:
    with open(_JSON.value, "a") as f:
      f.write(json.dumps(row) + "\n")


def main(argv):
  del argv
  if _FIT.value:
    with open(_FIT.value) as f:
      for row in fit_batches([json.loads(line) for line in f]):
        print(" | ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in row.items()))
    return
  for remat in _REMAT.value:
    for step in _STEPS.value:
      for mesh_name in _MESHES.value:
        try:
          emit(measure(step, mesh_name, remat, _BATCH.value))
        except ValueError as e:  # e.g. a dimension the mesh axis does not divide
          emit(dict(preset=_PRESET.value, step=step, mesh=mesh_name, remat=remat,
                    error=str(e).splitlines()[0][:200]))


if __name__ == "__main__":
  app.run(main)
