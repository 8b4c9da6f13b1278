"""Tests for `dmmd_jax.sharding`: one code path from 1 device to a (data, fsdp, tensor) mesh.

The multi-device checks run in a subprocess that sees 8 emulated CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=8`; this pytest process may already have
initialised JAX with one). It builds the digits `tiny` setup (1 layer, width 32) once per mesh,
runs one teacher step and one auxiliary + one student D-MMD update on the same batches, and
reports the differences to the 1-device mesh as JSON. Compiling the D-MMD updates takes ~20–40 s
per mesh on 2 cores, so by default only the teacher step on the (2, 4, 1) mesh runs; the slow
tests add the auxiliary and student updates and the (8, 1, 1) and (4, 2, 1) meshes.
"""

import json
import types

import _helpers
import pytest

from dmmd_jax.infra import sharding

MESHES = [(8, 1, 1), (4, 2, 1), (2, 4, 1)]
DEFAULT_MESHES = [(2, 4, 1)]  # data and fsdp both > 1; the other two meshes are slow tests

WORKER = r'''
import dataclasses, json, math, sys
import jax, jax.numpy as jnp, numpy as np
cache, tests_dir, out_path, meshes, with_distill = sys.argv[1:6]
with_distill = with_distill == "1"
if cache:
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
sys.path.insert(0, tests_dir)
import _helpers
from dmmd_jax.distill import dmmd
from dmmd_jax.infra import sharding
from dmmd_jax.training import dmmd_run, sdtt_run
from dmmd_jax.training import setup as setup_lib
from dmmd_jax.training import state as state_lib
from dmmd_jax.training import teacher_run


assert jax.device_count() == 8, jax.devices()
MESHES = [(1, 1, 1), (8, 1, 1), (4, 2, 1), (2, 4, 1)]
# Warm-up 0: the very first update must move the parameters. One layer of width 32 keeps the
# 4 meshes × 3 programs of compiling short.
config = _helpers.make_config("digits", "tiny", **{
    "train.batch_size": 8, "distill.batch_size": 8, "train.warmup_steps": 0,
    "distill.warmup_steps": 0, "model.num_layers": 1, "model.width": 32})
base = setup_lib.build_setup(config, 8)  # mesh data=-1: all 8 devices
rows = np.asarray(base.train_tokens[:16])
host = lambda tree: jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)

def run(shape):
  mesh_cfg = dict(zip(("data", "fsdp", "tensor"), shape))
  mesh = sharding.make_mesh(mesh_cfg, devices=jax.devices()[:math.prod(shape)])
  setup = dataclasses.replace(base, mesh=mesh)
  sharding.check_divisibility(mesh, 8, setup.model_cfg.width)
  out = {}
  optimizer = teacher_run.teacher_optimizer(config)
  state, shardings = teacher_run.init_teacher_state(setup, optimizer)
  kernel = state.params["block_0"]["mlp_in"]["kernel"]
  out["spec"] = [str(a) for a in kernel.sharding.spec]
  out["shard_shape"] = list(kernel.addressable_shards[0].data.shape)
  out["embed_shard_shape"] = list(
      state.params["embed"]["embedding"].addressable_shards[0].data.shape)
  out["init"] = host(state.params)
  teacher = jax.tree.map(jnp.copy, state.params)
  step = teacher_run.compile_teacher_step(setup, optimizer, shardings)
  state, metrics = step(state, sharding.global_batch(rows[:8], mesh))
  out["teacher_metrics"] = host(metrics)
  out["teacher_params"] = host(state.params)

  student_opt, aux_opt = dmmd_run.distill_optimizers(config)
  dstate = dmmd_run.init_distill_state(teacher, student_opt, aux_opt, mesh, jax.random.key(1),
                                      config.distill.noise_init_scale)
  cfg = setup_lib.estimator_config_of(config)
  updates = dmmd_run.compile_updates(
      setup, cfg, student_opt, aux_opt, state_lib.shardings_of(dstate),
      state_lib.shardings_of(teacher))
  aux_metrics, student_metrics = {}, {}
  if with_distill:
    dstate, aux_metrics = updates.aux(dstate, teacher, sharding.global_batch(rows[:8], mesh))
    # After the auxiliary moved, so that the student gradient is not zero.
    dstate, student_metrics = updates.student(dstate, teacher,
                                              sharding.global_batch(rows[8:16], mesh))
  out["aux_metrics"] = host(aux_metrics)
  out["student_metrics"] = host(student_metrics)
  sdtt_metrics = {}
  if with_distill:  # the SDTT baseline: a new round (optimizer state re-born sharded), one update
    sdtt_opt = sdtt_run.sdtt_optimizer(config)
    sstate = sdtt_run.init_sdtt_state(teacher, sdtt_opt, mesh)
    sstate = sdtt_run.start_round(sstate, sdtt_opt, mesh)
    sdtt_update = sdtt_run.compile_update(setup, sdtt_opt, state_lib.shardings_of(sstate))
    sstate, sdtt_metrics = sdtt_update(sstate, sharding.global_batch(rows[:8], mesh),
                                       np.int32(8))
    out["sdtt_student"] = host(sstate.student)
  out["sdtt_metrics"] = host(sdtt_metrics)
  out["aux"], out["student"] = host(dstate.aux), host(dstate.student)
  out["student_noise_shard_shape"] = list(
      dstate.student["block_0"]["qkv"]["kernel"].addressable_shards[0].data.shape)
  return out

results = {shape: run(shape) for shape in MESHES}
ref = results[(1, 1, 1)]

def max_diff(a, b):
  pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  return max([0.0] + [float(np.max(np.abs(x - y))) for x, y in pairs])

def rel_metric_diff(a, b):
  return {k: abs(float(a[k]) - float(b[k])) / max(1.0, abs(float(b[k]))) for k in b}

report = {}
for shape, got in results.items():
  report["x".join(map(str, shape))] = dict(
      spec=got["spec"], shard_shape=got["shard_shape"],
      embed_shard_shape=got["embed_shard_shape"],
      qkv_shard_shape=got["student_noise_shard_shape"],
      init=max_diff(got["init"], ref["init"]),
      teacher_params=max_diff(got["teacher_params"], ref["teacher_params"]),
      teacher_metrics=rel_metric_diff(got["teacher_metrics"], ref["teacher_metrics"]),
      aux=max_diff(got["aux"], ref["aux"]),
      student=max_diff(got["student"], ref["student"]),
      aux_metrics=rel_metric_diff(got["aux_metrics"], ref["aux_metrics"]),
      student_metrics=rel_metric_diff(got["student_metrics"], ref["student_metrics"]),
      sdtt_student=max_diff(got.get("sdtt_student", {}), ref.get("sdtt_student", {})),
      sdtt_metrics=rel_metric_diff(got["sdtt_metrics"], ref["sdtt_metrics"]),
      moved=dict(teacher=max_diff(got["teacher_params"], got["init"]),
                 aux=max_diff(got["aux"], got["init"]) if with_distill else None,
                 student=max_diff({k: v for k, v in got["student"].items() if k != "noise_proj"},
                                  {k: v for k, v in got["init"].items() if k != "noise_proj"})
                 if with_distill else None,
                 sdtt=max_diff(got["sdtt_student"], got["init"])
                 if with_distill else None),
      values={k: float(v) for k, v in {**got["aux_metrics"], **got["student_metrics"]}.items()})

errors = {}
for name, (shape, batch, width) in {"batch": ((2, 4, 1), 12, 64),
                                    "width": ((1, 8, 1), 8, 36)}.items():
  mesh = sharding.make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)))
  try:
    sharding.check_divisibility(mesh, batch, width)
    errors[name] = None
  except ValueError as e:
    errors[name] = str(e)
report["errors"] = errors
with open(out_path, "w") as f:
  json.dump(report, f, indent=1)
'''


# Per-device FLOPs of the compiled (not run) D-MMD updates: the digits `tiny` setup (1 layer of
# width 64) at 4 sequences per device, on one device and on a (1, 8, 1) fsdp mesh.
FLOPS_WORKER = r"""
import dataclasses, json, sys
import jax, jax.numpy as jnp
cache, tests_dir, out_path = sys.argv[1:4]
if cache:
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
sys.path.insert(0, tests_dir)
import _helpers
from dmmd_jax.infra import sharding
from dmmd_jax.training import dmmd_run, teacher_run
from dmmd_jax.training import setup as setup_lib
from dmmd_jax.training import state as state_lib

config = _helpers.make_config("digits", "tiny", **{"model.num_layers": 1, "model.width": 64})
base = setup_lib.build_setup(config, 32)

def flops(compiled):
  cost = compiled.cost_analysis()
  return float((cost[0] if isinstance(cost, list) else cost)["flops"])

def per_device_flops(shape):
  devices = jax.devices()[:shape[0] * shape[1]]
  mesh = sharding.make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)), devices=devices)
  setup = dataclasses.replace(base, mesh=mesh)
  batch = jax.ShapeDtypeStruct((4 * len(devices), setup.seq_len), jnp.int32,
                               sharding=sharding.batch_sharding(mesh))
  optimizer = teacher_run.teacher_optimizer(config)
  state, _ = teacher_run.init_teacher_state(setup, optimizer)
  student_opt, aux_opt = dmmd_run.distill_optimizers(config)
  dstate = dmmd_run.init_distill_state(state.params, student_opt, aux_opt, mesh,
                                      jax.random.key(1), config.distill.noise_init_scale)
  updates = dmmd_run.compile_updates(setup, setup_lib.estimator_config_of(config), student_opt,
                                     aux_opt, state_lib.shardings_of(dstate),
                                     state_lib.shardings_of(state.params))
  return {name: flops(update.lower(dstate, state.params, batch).compile())
          for name, update in (("student", updates.student), ("aux", updates.aux))}

with open(out_path, "w") as f:
  json.dump({"1": per_device_flops((1, 1, 1)), "fsdp8": per_device_flops((1, 8, 1))}, f)
"""


def _run_worker(tmp, meshes, with_distill):
  script, out = tmp / "worker.py", tmp / "report.json"
  script.write_text(WORKER)
  env = _helpers.cache_env({"XLA_FLAGS": "--xla_force_host_platform_device_count=8",
                            "JAX_PLATFORMS": "cpu"})
  proc = _helpers.run_python([script, env.get("DMMD_JAX_COMPILATION_CACHE", ""),
                              _helpers.REPO / "tests", out, json.dumps(meshes),
                              "1" if with_distill else "0"], env=env,
                             timeout=900)
  assert proc.returncode == 0, proc.stderr[-5000:]
  return json.loads(out.read_text())


@pytest.fixture(scope="module")
def mesh_reports(tmp_path_factory):
  """report(shape, full): the worker runs once for the default mesh (teacher step only) and, for
  the slow tests, once for every mesh with the distillation updates (full)."""
  reports = {}

  def report(shape=None, full=False):
    full = full or (shape is not None and shape not in DEFAULT_MESHES)
    if full not in reports:
      reports[full] = _run_worker(tmp_path_factory.mktemp("sharding"),
                                  MESHES if full else DEFAULT_MESHES, with_distill=full)
    return reports[full] if shape is None else reports[full]["x".join(map(str, shape))]

  return report


def _mesh_params(meshes):
  return [pytest.param(m, id="x".join(map(str, m)),
                       marks=() if m in DEFAULT_MESHES else pytest.mark.slow) for m in meshes]


@pytest.mark.parametrize("shape", _mesh_params(MESHES))
def test_sharded_steps_match_one_device(mesh_reports, shape):
  """One teacher step — and, in the slow run, one auxiliary then one student D-MMD update, and a
  new SDTT round with one update — give the same losses and updated parameters on an 8-device
  mesh as on one device (to ~1e-5), starting from identical parameters."""
  got = mesh_reports(shape)
  assert got["init"] == 0.0
  assert got["teacher_params"] < 1e-5 and got["aux"] < 1e-5 and got["student"] < 1e-5
  for metrics in ("teacher_metrics", "aux_metrics", "student_metrics", "sdtt_metrics"):
    assert max(got[metrics].values(), default=0.0) < 1e-5, (metrics, got[metrics])
  # SDTT: the same loss; its first AdamW step (no warm-up) moves every parameter by about ±lr
  # whatever the gradient's size, so parameters whose gradient is at float-noise level may step
  # either way on different meshes: the parameters agree to 2.5 lr, not 1e-5.
  assert got["sdtt_student"] < 2.5e-4
  # The updates did something (so equality is not vacuous).
  moved = {k: v for k, v in got["moved"].items() if v is not None and k != "sdtt"}
  assert min(moved.values()) > 1e-4, moved
  if shape not in DEFAULT_MESHES:
    assert set(moved) == {"teacher", "aux", "student"} and got["moved"]["sdtt"] > 1e-5
    assert got["values"]["aux_loss"] > 0.0 and got["values"]["gen_loss"] != 0.0


@pytest.mark.slow
def test_sharded_distillation_updates_match_one_device_on_the_default_mesh(mesh_reports):
  """The auxiliary and student updates on the (2, 4, 1) mesh."""
  got = mesh_reports((2, 4, 1), full=True)
  assert got["aux"] < 1e-5 and got["student"] < 1e-5
  assert max(got["aux_metrics"].values()) < 1e-5 and max(got["student_metrics"].values()) < 1e-5
  assert min(v for k, v in got["moved"].items() if k != "sdtt") > 1e-4


@pytest.mark.parametrize("shape", _mesh_params(MESHES))
def test_parameters_are_sharded_over_fsdp(mesh_reports, shape):
  """`embed` dimensions are split over the fsdp axis (mlp over tensor): with fsdp = f each device
  holds width / f rows of an [embed, mlp] kernel and of every student parameter alike."""
  got = mesh_reports(shape)
  fsdp = shape[1]
  assert got["spec"] == ["fsdp", "tensor"]
  assert got["shard_shape"] == [32 // fsdp, 128]  # width 32, mlp 4 × 32
  assert got["embed_shard_shape"] == [18, 32 // fsdp]  # 17 levels + MASK
  assert got["qkv_shard_shape"][0] == 32 // fsdp


def test_fsdp_distillation_updates_split_the_work_over_devices(tmp_path):
  """On an fsdp mesh each device computes its own share of the batch: the compiled per-device
  FLOPs of both D-MMD updates at 4 sequences per device equal one device's at 4 sequences (within
  15%). Regression: without the activation constraints bound by `sharding.on_mesh`, XLA ran the
  networks on the global batch, contracting over the fsdp-split width (auxiliary update: 1.90×
  one device's FLOPs per device at this size)."""
  script, out = tmp_path / "flops_worker.py", tmp_path / "flops.json"
  script.write_text(FLOPS_WORKER)
  env = _helpers.cache_env({"XLA_FLAGS": "--xla_force_host_platform_device_count=8",
                            "JAX_PLATFORMS": "cpu"})
  proc = _helpers.run_python([script, env.get("DMMD_JAX_COMPILATION_CACHE", ""),
                              _helpers.REPO / "tests", out], env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-5000:]
  got = json.loads(out.read_text())
  ratios = {step: got["fsdp8"][step] / got["1"][step] for step in got["1"]}
  assert all(0.85 < r < 1.15 for r in ratios.values()), ratios


def test_divisibility_errors_on_a_real_mesh(mesh_reports):
  errors = mesh_reports()["errors"]
  assert "batch size 12 is not divisible by data×fsdp = 8" in errors["batch"]
  assert "model.width 36 is not divisible by mesh.fsdp = 8" in errors["width"]


@pytest.mark.parametrize("mesh_cfg, devices, expected", [
    ({"data": -1, "fsdp": 1, "tensor": 1}, 8, (8, 1, 1)),
    ({"data": -1, "fsdp": 2, "tensor": 1}, 8, (4, 2, 1)),
    ({"data": 2, "fsdp": -1, "tensor": 2}, 8, (2, 2, 2)),
    ({"data": 1, "fsdp": 1, "tensor": -1}, 4, (1, 1, 4)),
    ({"data": -1, "fsdp": 1, "tensor": 1}, 1, (1, 1, 1)),
    ({"data": 2, "fsdp": 4, "tensor": 1}, 8, (2, 4, 1)),
])
def test_mesh_shape_resolves_minus_one(mesh_cfg, devices, expected):
  assert sharding.mesh_shape(mesh_cfg, devices) == expected


@pytest.mark.parametrize("mesh_cfg, devices, message", [
    ({"data": -1, "fsdp": -1, "tensor": 1}, 8, "at most one -1"),
    ({"data": 0, "fsdp": 1, "tensor": 1}, 8, "must be positive"),
    ({"data": -2, "fsdp": 1, "tensor": 1}, 8, "must be positive"),
    ({"data": 3, "fsdp": -1, "tensor": 1}, 8, "does not divide the 8 devices"),
    ({"data": -1, "fsdp": 3, "tensor": 1}, 8, "does not divide the 8 devices"),
    ({"data": 2, "fsdp": 2, "tensor": 1}, 8, "uses 4 devices but 8 are present"),
    ({"data": 4, "fsdp": 4, "tensor": 1}, 8, "does not divide the 8 devices"),
])
def test_mesh_shape_errors(mesh_cfg, devices, message):
  with pytest.raises(ValueError, match=message) as info:
    sharding.mesh_shape(mesh_cfg, devices)
  assert "config.mesh" in str(info.value) or "-1" in str(info.value)


def _mesh(data, fsdp, tensor=1):
  """check_divisibility reads only `mesh.shape`; a stand-in avoids needing 8 devices here."""
  return types.SimpleNamespace(shape={"data": data, "fsdp": fsdp, "tensor": tensor})


@pytest.mark.parametrize("mesh, batch, width, message", [
    (_mesh(4, 1), 6, 64, "batch size 6 is not divisible by data×fsdp = 4"),
    (_mesh(2, 4), 12, 64, "batch size 12 is not divisible by data×fsdp = 8"),
    (_mesh(1, 4), 8, 66, "model.width 66 is not divisible by mesh.fsdp = 4"),
])
def test_check_divisibility_errors(mesh, batch, width, message):
  with pytest.raises(ValueError, match=message):
    sharding.check_divisibility(mesh, batch, width)


@pytest.mark.parametrize("mesh, batch, width", [
    (_mesh(4, 1), 8, 64), (_mesh(2, 4), 16, 64), (_mesh(1, 8), 8, 64), (_mesh(1, 1), 3, 10)])
def test_check_divisibility_accepts(mesh, batch, width):
  sharding.check_divisibility(mesh, batch, width)
