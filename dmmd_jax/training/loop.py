"""The one training loop of every run (teacher, D-MMD student, SDTT), its data and its resume.

Randomness of step n is `fold_in(seed, n)` and the data iterator state is checkpointed with the
training state, so killing a run and restarting the same command reproduces the uninterrupted
loss curve exactly.
"""

import time

import jax
import numpy as np
from tqdm import tqdm

from dmmd_jax.data import loader
from dmmd_jax.infra import checkpoints, sharding
from dmmd_jax.training import setup as setup_lib


class TrainingError(RuntimeError):
  """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


def data_iterator(setup: setup_lib.Setup, batch_size: int, seed: int):
  return loader.batch_iterator(setup.train_tokens, batch_size, seed,
                               process_index=jax.process_index(),
                               process_count=jax.process_count())


def run_loop(*, state, step_fn, iterator, manager, log, num_steps: int, log_every: int,
             checkpoint_every: int, mesh, tokens_per_step: int, periodic=(), desc="train"):
  """The shared loop: steps, NaN guard, logging, periodic hooks, checkpoints, progress bar.

  step_fn(state, global_batch, index) → (state, metrics dict of scalars); index = the number of
  updates before this one (= state.step,
                           known on the host without a device sync). periodic: (every, fn(state,
  step) → dict of scalars to log). A non-finite loss or gradient norm stops the run with
  TrainingError before the next checkpoint, so the last checkpoint on disk is always good (the
  error names its step, or says that none was written).
  """
  start = int(state.step)
  pending = []
  bar = tqdm(total=num_steps, initial=start, desc=desc, disable=jax.process_index() != 0,
             dynamic_ncols=True)
  tick = time.perf_counter()
  try:
    for step in range(start + 1, num_steps + 1):
      batch = sharding.global_batch(next(iterator), mesh)
      state, metrics = step_fn(state, batch, step - 1)
      pending.append(metrics)
      bar.update(1)
      if step % log_every == 0 or step % checkpoint_every == 0 or step == num_steps:
        means = _check_and_average(pending, step - len(pending) + 1)
        rate = tokens_per_step * len(pending) / (time.perf_counter() - tick)
        pending, tick = [], time.perf_counter()
        means["tokens_per_s"] = rate
        for every, hook in periodic:
          if every and step % every == 0:
            means.update(hook(state, step))
        log.write(step, means)
        bar.set_postfix({k: f"{v:.3g}" for k, v in means.items()})
      if step % checkpoint_every == 0 or step == num_steps:
        checkpoints.save_checkpoint(manager, step, state, iterator.get_state())
  except TrainingError as e:  # say which checkpoint is kept only once it is complete on disk
    manager.wait_until_finished()
    kept = manager.latest_step()
    raise TrainingError(f"{e} " + (f"The last good checkpoint (step {kept}) is kept" if kept
                                   else "No checkpoint was written yet") +
                        "; lower the learning rate or check the data.") from None
  finally:  # an error (e.g. a NaN) must not leave the last checkpoint half-written
    bar.close()
    manager.wait_until_finished()
  return state


def _check_and_average(pending, first_step: int) -> dict:
  host = jax.device_get(pending)
  for offset, metrics in enumerate(host):
    # Losses first: when a loss and a gradient norm turn non-finite in one step, name the loss.
    for name in sorted(metrics, key=lambda n: ("loss" not in n, n)):
      value = metrics[name]
      if ("loss" in name or name.endswith("grad_norm")) and not np.isfinite(value):
        raise TrainingError(f"{name} became {value} at step {first_step + offset}; stopping.")
  names = sorted({k for m in host for k in m})  # alternating updates may log different names
  return {k: float(np.mean([m[k] for m in host if k in m])) for k in names}


def restore_or_init(manager, state, shardings, iterator, workdir: str):
  """Resume from the newest readable checkpoint if one exists; returns the state."""
  if not checkpoints.saved_steps(workdir):
    return state
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          state, shardings)
  state, data_state = checkpoints.restore_newest(manager, workdir, abstract)
  iterator.set_state(data_state)
  return state
