"""A run directory: stored config, run description, metrics log, samples and orbax checkpoints.

    WORKDIR/config.json      the full config of the run (read back by sample.py / distill.py)
    WORKDIR/run.json         {"kind": "teacher" | "student", "data_info": …, "student_steps": k,
                             "run_id", "data_fingerprint", "config": the full config,
                             "provenance": {"git_commit", "git_dirty", "versions"} of the first
                             launch, "resumed_with": [later launches' provenance], …}
    WORKDIR/metrics.jsonl    one JSON object per logged step (also TensorBoard events in logs/)
    WORKDIR/checkpoints/N/   orbax: train state + data-iterator state (`checkpoints.py`)
    WORKDIR/samples/         sample dumps (text or PNG)
    WORKDIR/config_history/  earlier config.json versions (workdir_guard: never overwritten)
    WORKDIR/lock             holds the PID of the process using the workdir (fcntl.flock)
"""

import json
import os
import sys

import jax

from dmmd_jax import config_lib
from dmmd_jax.data import types as data_types

# Sections that must agree between a stored run and a resumed / consuming run.
ARCHITECTURE_SECTIONS = ("data", "kernel", "model")
# Keys a student may set differently from its teacher: the noise input is the student's own
# (the teacher never uses it), and compute choices do not change the float32 parameters.
STUDENT_FREE_KEYS = ("model.noise_kind", "model.noise_dim", "model.pyramid_levels",
                     "model.dtype", "model.attention_impl")


# Keys whose values are file-system locations, compared normalised (`a//b` = `a/b`).
PATH_KEYS = ("path", "tfds_data_dir", "cache_dir")


# Keys no run has to agree on (how activations are recomputed, how shards are checked), so runs
# stored before these keys existed resume too.
COMPUTE_ONLY_KEYS = ("model.remat", "data.verify_shards")


# Keys added after runs were stored, with the value every earlier run had: a stored config without
# one compares as that value (model.vocab_multiple 1: no padding).
ADDED_KEYS = {"model.vocab_multiple": 1, "distill.joint_updates": False,
              "model.absolute_positions": False, "distill.init_workdir": "",
              "distill.curriculum": False, "distill.time_sampling": "continuous"}


class WorkdirError(ValueError):
  """A workdir that cannot be used as asked."""


def read_json(path):
  """The JSON value stored at `path`; WorkdirError naming the path if it is not valid JSON."""
  try:
    with open(path) as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise WorkdirError(f"{path} is not valid JSON ({e}); the file is damaged.") from None


def load_config(workdir: str) -> config_lib.ExperimentConfig:
  """The typed config stored in the workdir (keys of older versions are ignored)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise WorkdirError(f"{workdir} has no config.json: not a dmmd_jax workdir (or not written "
                       "yet).")
  return config_lib.typed(read_json(path), strict=False)


def load_run_info(workdir: str) -> dict:
  path = os.path.join(workdir, "run.json")
  if not os.path.exists(path):
    raise WorkdirError(f"{workdir} has no run.json: not a dmmd_jax workdir.")
  info = read_json(path)
  info["data_info"] = data_types.DataInfo.from_json(info["data_info"])
  return info


def architecture_mismatch(stored: dict, current: dict, ignore=()):
  """First differing `section.key` (outside `ignore`) between two config dicts, or None."""
  for section in ARCHITECTURE_SECTIONS:
    a, b = stored.get(section, {}), current.get(section, {})
    for key in sorted(set(a) | set(b)):
      name = f"{section}.{key}"
      old = a.get(key, ADDED_KEYS.get(name))
      same = old == b.get(key) or (key in PATH_KEYS and norm_path(old) == norm_path(b.get(key)))
      if not same and name not in ignore and name not in COMPUTE_ONLY_KEYS:
        return f"{section}.{key}: stored {old!r}, now {b.get(key)!r}"
  return None


def norm_path(path):
  """A location as compared between runs: user expanded, `a//b/./c` → `a/b/c`, links resolved
  (non-strings and "" unchanged)."""
  return os.path.realpath(os.path.expanduser(path)) if isinstance(path, str) and path else path


class MetricsLog:
  """Appends scalars to metrics.jsonl and TensorBoard events; drops rows past a resume point."""

  def __init__(self, workdir: str, resume_step: int = 0):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = jax.process_index() == 0
    self.writer = None
    if not self.enabled:
      return
    if os.path.exists(self.path):
      rows = [r for r in _complete_rows(self.path) if json.loads(r)["step"] <= resume_step]
      with open(self.path, "w") as f:
        f.writelines(rows)
    from tensorboardX import SummaryWriter  # heavy import, host 0 only
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


def _complete_rows(path: str) -> list:
  """The lines of a metrics log; a damaged last line (a write cut by a kill) is dropped with a
  warning, a damaged earlier line is a WorkdirError naming it."""
  with open(path) as f:
    lines = f.readlines()
  for number, line in enumerate(lines, 1):
    try:
      json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
      if number < len(lines):
        raise WorkdirError(f"{path} line {number} is damaged ({line[:60]!r}); repair or remove "
                           "the line.") from None
      print(f"warning: dropped the incomplete last line of {path} ({line[:60]!r}).",
            file=sys.stderr, flush=True)
      return lines[:-1]
  if lines and not lines[-1].endswith("\n"):  # complete JSON, cut before its newline
    lines[-1] += "\n"
  return lines


def read_metrics(workdir: str) -> list:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(r) for r in f]
