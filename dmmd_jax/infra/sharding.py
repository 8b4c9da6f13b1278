"""One sharded code path: a (data, fsdp, tensor) device mesh and a logical-axis rule table.

The same jitted step runs on one CPU (mesh 1×1×1) and on a pod. Parameters are created directly
with their shardings (`init_sharded`), batches become global arrays from per-host shards
(`global_batch`), activations are pinned to the batch split inside every jitted training step
(`on_mesh`, `constrain`), and XLA inserts the collectives.

Rule table (logical name → mesh axes):
    batch → (data, fsdp)   embed → fsdp   mlp / heads / vocab → tensor   the rest replicated
"""

import contextvars
import functools
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dmmd_jax import config_lib

MESH_AXES = ("data", "fsdp", "tensor")
_ACTIVATION_MESH = contextvars.ContextVar("activation_mesh", default=None)  # see on_mesh


LOGICAL_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("cond", None),
    ("noise", None),
    ("length", None),
    ("act_embed", None),
)


def mesh_shape(mesh_cfg, num_devices: int) -> tuple:
  """Resolve (data, fsdp, tensor) with at most one −1 meaning 'the remaining devices'.

  mesh_cfg: a `config_lib.MeshConfig` (or a mapping with its fields).
  """
  mesh_cfg = config_lib.typed(mesh_cfg, config_lib.MeshConfig)
  shape = [int(getattr(mesh_cfg, a)) for a in MESH_AXES]
  named = dict(zip(MESH_AXES, shape, strict=True))
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh {named}: sizes must be positive, at most one -1 (fill with the "
                     "remaining devices).")
  known = math.prod(s for s in shape if s != -1)
  if num_devices % known:
    raise ValueError(f"mesh {named} does not divide the {num_devices} devices; change "
                     "config.mesh.")
  shape = [num_devices // known if s == -1 else s for s in shape]
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh {named} uses {math.prod(shape)} devices but {num_devices} are "
                     "present; set one axis to -1 or change config.mesh.")
  return tuple(shape)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def check_divisibility(mesh: Mesh, batch_size: int, width: int) -> None:
  """Errors naming the value to change, before any compile."""
  batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % batch_shards:
    raise ValueError(f"batch size {batch_size} is not divisible by data×fsdp = {batch_shards}; "
                     "change the batch size or config.mesh.")
  if batch_shards % jax.process_count():
    raise ValueError(f"data×fsdp = {batch_shards} is not a multiple of the {jax.process_count()} "
                     "processes (each loads its own rows of the batch); lower config.mesh.tensor.")
  if width % mesh.shape["fsdp"]:
    raise ValueError(f"model.width {width} is not divisible by mesh.fsdp = {mesh.shape['fsdp']}; "
                     "lower config.mesh.fsdp.")


def logical_shardings(boxed_tree, mesh: Mesh):
  """NamedShardings for a (possibly abstract) tree of logically partitioned values."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_RULES)


def init_sharded(init_fn, key, mesh: Mesh):
  """Run `init_fn(key)` (returns boxed params) so the unboxed params are born sharded."""
  abstract = jax.eval_shape(init_fn, key)
  shardings = logical_shardings(abstract, mesh)
  with mesh:
    return jax.jit(lambda k: nn.unbox(init_fn(k)), out_shardings=shardings)(key), shardings


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: np.ndarray, mesh: Mesh):
  """This host's rows `[batch / hosts, length]` → a global `[batch, length]` array on the mesh."""
  return jax.make_array_from_process_local_data(batch_sharding(mesh), local_batch)


def on_mesh(fn, mesh: Mesh):
  """`fn` tracing under which `constrain` pins activations to `mesh`; jit this, not `fn`.

  The jitted steps place parameters and batches with explicit NamedShardings and enter no global
  mesh, so flax's `with_logical_constraint` would be a no-op in them and XLA's propagation alone
  would pick the activation layouts. It does not always pick the batch split: on an fsdp mesh it
  may keep the embed split of the (fsdp-sharded) embedding table and run the networks on the
  global batch instead (redundant attention and element-wise work on every device). Binding the
  mesh here, per traced step, makes the model's constraints real without a global mesh.
  """

  @functools.wraps(fn)
  def traced(*args, **kwargs):
    token = _ACTIVATION_MESH.set(mesh)
    try:
      return fn(*args, **kwargs)
    finally:
      _ACTIVATION_MESH.reset(token)

  return traced


def constrain(x, logical_axes: tuple):
  """x with its layout fixed to `logical_axes` (names of LOGICAL_RULES, one per dimension) on the
  mesh of the step being traced (`on_mesh`); x itself outside such a step."""
  mesh = _ACTIVATION_MESH.get()
  if mesh is None:
    return x
  return nn.with_logical_constraint(x, logical_axes, rules=LOGICAL_RULES, mesh=mesh)


def host_rows(global_rows: np.ndarray) -> np.ndarray:
  """This host's contiguous share of a global batch (matches the batch sharding's row order)."""
  n = len(global_rows) // jax.process_count()
  return global_rows[jax.process_index() * n:(jax.process_index() + 1) * n]
