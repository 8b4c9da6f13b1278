"""Orbax checkpoints of a workdir: save, restore with fallback to the newest readable step.

    WORKDIR/checkpoints/N/   orbax: train state + data-iterator state (atomic: a step directory
                             exists only once fully written)

Restore from the newest checkpoint that can be read, with a warning naming each one that cannot.

A checkpoint step directory can be damaged after orbax finished it (a deleted or truncated blob,
a full disk, a bad copy). Restoring then falls back to the previous step, prints one
`warning: …` line per unreadable step directory on stderr, and, when training resumes, moves the
unreadable directories aside to `checkpoints/<step>.unreadable` (kept for inspection; orbax
ignores the name) so that the resumed run can write those steps again. With no readable step the
error is one `WorkdirError` line naming the newest step directory; nothing is moved then.
"""

import os
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from dmmd_jax.infra import workdir as workdir_lib


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


def load_params(workdir: str, name: str, step=None):
  """Parameters `name` (e.g. "ema_params", "student_ema") of a run's checkpoint, as host arrays
  (`load_param_trees` with one name)."""
  return load_param_trees(workdir, (name,), step)[name]


def load_param_trees(workdir: str, names, step=None) -> dict:
  """{name: parameters} of several trees of one checkpoint (one read), as host arrays.

  Restores without a target, so it needs no optimizer or model object, and as numpy arrays, so
  it works on any number of devices and processes (not only the topology that saved it). Without
  `step`, an unreadable newest checkpoint falls back to the previous one (with a warning); raises
  WorkdirError with the path when there is no checkpoint or none can be read.
  """
  if not has_checkpoint(workdir):
    raise workdir_lib.WorkdirError(
        f"{workdir} has no checkpoint (expected {workdir}/checkpoints/<step>/).")
  manager = checkpoint_manager(workdir, keep=1_000_000)

  def read(step):
    metadata = ocp.PyTreeCheckpointHandler().metadata(manager.directory / str(step) / "state")
    tree = getattr(metadata, "tree", metadata)
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(restore_args=as_numpy)))["state"]

  try:
    step, state, _ = newest_readable(
        workdir, saved_steps(workdir) if step is None else [step], read)
  finally:
    manager.close()
  missing = [name for name in names if name not in state]
  if missing:
    raise workdir_lib.WorkdirError(f"checkpoint {workdir}/checkpoints/{step} has no "
                                   f"{missing[0]!r} (it holds {sorted(state)}).")
  return {name: state[name] for name in names}


UNREADABLE_SUFFIX = ".unreadable"


def step_dir(workdir: str, step: int) -> str:
  return os.path.join(workdir, "checkpoints", str(step))


def saved_steps(workdir: str) -> list:
  """Steps of every `checkpoints/<step>` directory, including ones orbax would not list (a lost
  commit marker): each is tried, and reported if unreadable, rather than skipped silently."""
  path = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


def _reason(e: Exception) -> str:
  first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
  return f"{type(e).__name__}: {first}" if first else type(e).__name__


def newest_readable(workdir: str, steps, read):
  """(step, read(step)) for the newest step in `steps` that `read` can load.

  read: step → value; any exception means "unreadable" (orbax raises many types for damaged
  files). Returns (step, value, unreadable newer steps); raises WorkdirError if none reads.
  """
  failed = []
  for step in sorted(steps, reverse=True):
    try:
      value = read(step)
    except Exception as e:  # orbax, tensorstore, json, OS errors alike
      failed.append((step, _reason(e)))
      print(f"warning: checkpoint {step_dir(workdir, step)} could not be read ({_reason(e)}); "
            "trying the previous checkpoint.", file=sys.stderr, flush=True)
      continue
    return step, value, [s for s, _ in failed]
  if not failed:
    raise workdir_lib.WorkdirError(f"{workdir} has no checkpoint (expected "
                                   f"{workdir}/checkpoints/<step>/).")
  step, reason = failed[0]
  raise workdir_lib.WorkdirError(
      f"no readable checkpoint in {workdir}/checkpoints (newest {step_dir(workdir, step)}: "
      f"{reason}); restore the files or start a new --workdir.")


def set_aside(manager, workdir: str, steps) -> None:
  """Rename unreadable step directories to `<step>.unreadable` and let orbax re-list the steps."""
  if not steps:
    return
  for step in steps if jax.process_index() == 0 else ():
    source = step_dir(workdir, step)
    target = source + UNREADABLE_SUFFIX
    n = 1
    while os.path.exists(target):
      n += 1
      target = f"{source}{UNREADABLE_SUFFIX}{n}"
    os.replace(source, target)
    print(f"warning: moved the unreadable {source} to {target}; training resumes from the "
          "previous checkpoint.", file=sys.stderr, flush=True)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("dmmd_jax: unreadable checkpoints set aside")
  manager.reload()


def restore_newest(manager, workdir: str, state_target):
  """(state, data_state) of the newest readable checkpoint; unreadable newer ones set aside."""
  step, restored, unreadable = newest_readable(
      workdir, saved_steps(workdir),
      lambda s: restore_checkpoint(manager, state_target, s))
  del step
  set_aside(manager, workdir, unreadable)
  return restored


def silence_closed_event_loop_errors() -> None:
  """Drop the "Event loop is closed" tracebacks of a failed orbax restore.

  When one array of a checkpoint cannot be read, orbax's restore raises and closes its asyncio
  loop while tensorstore still completes the reads of the other arrays; each completion then
  calls into the closed loop and that RuntimeError reaches sys.excepthook (or, depending on the
  thread, sys.unraisablehook). It carries no information (the restore error is reported
  already); every other exception goes to the previous hooks unchanged.
  """
  if getattr(sys.excepthook, "closed_loop_filter", False):  # installed already
    return
  previous, previous_unraisable = sys.excepthook, sys.unraisablehook

  def hook(kind, value, traceback):
    if not _closed_loop_error(value):
      previous(kind, value, traceback)

  def unraisable_hook(unraisable):
    if not _closed_loop_error(unraisable.exc_value):
      previous_unraisable(unraisable)

  hook.closed_loop_filter = True
  sys.excepthook, sys.unraisablehook = hook, unraisable_hook


def _closed_loop_error(value) -> bool:
  return isinstance(value, RuntimeError) and str(value) == "Event loop is closed"
