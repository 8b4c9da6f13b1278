"""A run directory: stored config, run description, metrics log, samples and orbax checkpoints.

    WORKDIR/config.json      the full config of the run (read back by sample.py / distill.py)
    WORKDIR/run.json         {"kind": "teacher" | "student", "data_info": …, "student_steps": k}
    WORKDIR/metrics.jsonl    one JSON object per logged step (also TensorBoard events in logs/)
    WORKDIR/checkpoints/N/   orbax: train state + data-iterator state (atomic: a step directory
                             exists only once fully written)
    WORKDIR/samples/         sample dumps (text or PNG)
"""

import json
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from dmmd_jax import data as data_lib

# Sections that must agree between a stored run and a resumed / consuming run.
ARCHITECTURE_SECTIONS = ("data", "kernel", "model")
# Keys a student may set differently from its teacher: the noise input is the student's own
# (the teacher never uses it), and compute choices do not change the float32 parameters.
STUDENT_FREE_KEYS = ("model.noise_kind", "model.noise_dim", "model.pyramid_levels",
                     "model.dtype", "model.attention_impl")
# Keys no run has to agree on (how activations are recomputed, how shards are checked), so runs
# stored before these keys existed resume too.
COMPUTE_ONLY_KEYS = ("model.remat", "data.verify_shards")


class WorkdirError(ValueError):
  """A workdir that cannot be used as asked."""


def config_to_dict(config) -> dict:
  return json.loads(config.to_json_best_effort())


def read_json(path):
  with open(path) as f:
    return json.load(f)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise WorkdirError(f"{workdir} has no config.json: not a dmmd_jax workdir (or not written "
                       "yet).")
  return ml_collections.ConfigDict(read_json(path))


def load_run_info(workdir: str) -> dict:
  path = os.path.join(workdir, "run.json")
  if not os.path.exists(path):
    raise WorkdirError(f"{workdir} has no run.json: not a dmmd_jax workdir.")
  info = read_json(path)
  info["data_info"] = data_lib.DataInfo.from_json(info["data_info"])
  return info


def architecture_mismatch(stored: dict, current: dict, ignore=()):
  """First differing `section.key` (outside `ignore`) between two config dicts, or None."""
  for section in ARCHITECTURE_SECTIONS:
    a, b = stored.get(section, {}), current.get(section, {})
    for key in sorted(set(a) | set(b)):
      name = f"{section}.{key}"
      if a.get(key) != b.get(key) and name not in ignore and name not in COMPUTE_ONLY_KEYS:
        return f"{section}.{key}: stored {a.get(key)!r}, now {b.get(key)!r}"
  return None


def prepare(workdir: str, config, run_info: dict) -> None:
  """Create the workdir and store config/run info; refuse a workdir of a different run."""
  current = config_to_dict(config)
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    mismatch = architecture_mismatch(read_json(path), current)
    if mismatch:
      raise WorkdirError(f"{workdir} holds a different run ({mismatch}); use a new --workdir.")
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    _write_json_atomically(path, current)
    info = dict(run_info, data_info=run_info["data_info"].to_json())
    _write_json_atomically(os.path.join(workdir, "run.json"), info)


def _write_json_atomically(path: str, value) -> None:
  """Replace the file in one step: other hosts may be reading it at this moment (a resume)."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=2)
  os.replace(tmp, path)


def checkpoint_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                               options=options)


def save_checkpoint(manager, step: int, state, data_state) -> None:
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)))


def restore_checkpoint(manager, state_target, step=None):
  """(state, data_state) of `step` (default: latest), with the target's shardings."""
  step = manager.latest_step() if step is None else step
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(state_target), data=ocp.args.JsonRestore()))
  return restored["state"], restored["data"]


def has_checkpoint(workdir: str) -> bool:
  path = os.path.join(workdir, "checkpoints")
  return os.path.isdir(path) and any(d.isdigit() for d in os.listdir(path))


class MetricsLog:
  """Appends scalars to metrics.jsonl and TensorBoard events; drops rows past a resume point."""

  def __init__(self, workdir: str, resume_step: int = 0):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = jax.process_index() == 0
    self.writer = None
    if not self.enabled:
      return
    if os.path.exists(self.path):
      with open(self.path) as f:
        rows = [r for r in f if json.loads(r)["step"] <= resume_step]
      with open(self.path, "w") as f:
        f.writelines(rows)
    from tensorboardX import SummaryWriter  # noqa: PLC0415 (heavy import, host 0 only)
    self.writer = SummaryWriter(os.path.join(workdir, "logs"), purge_step=resume_step + 1)

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    for k, v in scalars.items():
      self.writer.add_scalar(k, float(v), step)

  def close(self):
    if self.writer is not None:
      self.writer.close()


def read_metrics(workdir: str) -> list:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(r) for r in f]


def load_params(workdir: str, name: str, step=None):
  """Parameters `name` (e.g. "ema_params", "student_ema") of a run's checkpoint, as host arrays.

  Restores without a target, so it needs no optimizer or model object, and as numpy arrays, so
  it works on any number of devices and processes (not only the topology that saved it); raises
  WorkdirError with the path when there is no checkpoint or it cannot be read.
  """
  if not has_checkpoint(workdir):
    raise WorkdirError(f"{workdir} has no checkpoint (expected {workdir}/checkpoints/<step>/).")
  manager = checkpoint_manager(workdir, keep=1_000_000)
  step = manager.latest_step() if step is None else step
  try:
    metadata = ocp.PyTreeCheckpointHandler().metadata(manager.directory / str(step) / "state")
    tree = getattr(metadata, "tree", metadata)
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(restore_args=as_numpy)))
  except Exception as e:  # orbax raises many types for unreadable files
    raise WorkdirError(f"checkpoint {workdir}/checkpoints/{step} could not be read "
                       f"({type(e).__name__}: {str(e)[:200]}).") from None
  finally:
    manager.close()
  state = restored["state"]
  if name not in state:
    raise WorkdirError(f"checkpoint {workdir}/checkpoints/{step} has no {name!r} "
                       f"(it holds {sorted(state)}).")
  return state[name]
