"""Workdirs that cannot be damaged: kind and run-defining-field checks, config history, a lock.

Every binary that writes a workdir calls `claim` once its config and data are validated and
before it writes anything there:

  1. the workdir must be a directory (or not exist yet) on a writable file system;
  2. a stored run must be of the same kind (teacher, student, sdtt, reference_lm, feature_net) and
     have the same run-defining fields (`RUN_DEFINING`); a mismatch is one `WorkdirError` line
     naming the field, its stored and new value and how to proceed (a new --workdir, or
     --config.resume_override=FIELD,... to continue with the new value);
  3. an exclusive `fcntl.flock` on WORKDIR/lock (the kernel releases it when the process dies,
     however it dies); a second process gets "workdir in use by PID n";
  4. the checks are repeated under the lock, then config.json and run.json are written. A
     config.json whose content changes is first copied to config_history/config_<n>.json, so no
     earlier config is ever lost.

Paths are compared normalised (`a//b` = `a/b`, symlinks resolved). A data location that moved
(data.path, data.tfds_data_dir) does not block when the loaded data hash the same
(run.json "data_fingerprint"); a moved teacher does not block when it is the same run
(run.json "run_id" of the teacher). data.cache_dir never blocks. In a multi-process run only
process 0 takes the lock and writes.
"""

import errno
import fcntl
import functools
import hashlib
import json
import os
import uuid

import jax
import numpy as np

from dmmd_jax import config_lib
from dmmd_jax.infra import provenance
from dmmd_jax.infra import workdir as workdir_lib

KINDS = ("teacher", "student", "sdtt", "reference_lm", "feature_net")
LOCK_FILE = "lock"
HISTORY_DIR = "config_history"
# Files that mark a workdir of a kind without run.json.
RECORD_FILES = {"reference_lm": "reference_lm.json", "feature_net": "feature_net.json"}
_STUDENT_FIELDS = ("seed", "distill.batch_size", "distill.student_steps",
                   "distill.teacher_workdir", "distill.init_workdir", "distill.use_noise",
                   "distill.uniform_noise", "data.*", "kernel.*", "model.*")
# Config fields (dotted; "section.*" = every key of the section) that define a run: a resume must
# keep them. reference_lm and feature_net runs do not resume (they retrain from scratch).
RUN_DEFINING = {
    "teacher": ("seed", "train.batch_size", "data.*", "kernel.*", "model.*"),
    "student": _STUDENT_FIELDS,
    "sdtt": _STUDENT_FIELDS,
    "reference_lm": (),
    "feature_net": (),
}
# Fields compared as file-system locations; never-blocking fields.
PATH_FIELDS = ("data.path", "data.tfds_data_dir", "distill.teacher_workdir",
               "distill.init_workdir")
DATA_LOCATION_FIELDS = ("data.path", "data.tfds_data_dir")
IGNORED_FIELDS = ("data.cache_dir", "resume_override", *workdir_lib.COMPUTE_ONLY_KEYS)
# run.json entries that define an SDTT run besides the config.
RUN_INFO_FIELDS = {"sdtt": ("start_steps",)}

_HELD = {}  # realpath of a workdir → open lock file descriptor (this process)


# ---------------------------------------------------------------------------------------------
# Reading what a workdir holds.


def stored_kind(workdir: str) -> str | None:
  """The kind of run stored in `workdir` (None: empty, missing or not a dmmd_jax workdir)."""
  run_path = os.path.join(workdir, "run.json")
  if os.path.exists(run_path):
    info = workdir_lib.read_json(run_path)
    return "sdtt" if info.get("method") == "sdtt" else info.get("kind")
  for kind, name in RECORD_FILES.items():
    if os.path.exists(os.path.join(workdir, name)):
      return kind
  return None


def data_fingerprint(train_tokens: np.ndarray, eval_tokens: np.ndarray) -> str:
  """sha256 of the loaded token arrays (shape, dtype and values): equal iff the data are."""
  digest = hashlib.sha256()
  for tokens in (train_tokens, eval_tokens):
    array = np.ascontiguousarray(tokens)
    digest.update(f"{array.shape}{array.dtype}".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def _defining_keys(kind: str, stored: dict, current: dict) -> list:
  keys = []
  for pattern in RUN_DEFINING[kind]:
    if pattern.endswith(".*"):
      prefix = pattern[:-1]
      keys += sorted(k for k in set(stored) | set(current) if k.startswith(prefix))
    else:
      keys.append(pattern)
  return [k for k in keys if k not in IGNORED_FIELDS]


def _same_value(key: str, old, new) -> bool:
  if key in PATH_FIELDS and isinstance(old, str) and isinstance(new, str):
    return old == new or workdir_lib.norm_path(old) == workdir_lib.norm_path(new)
  return old == new


def field_mismatches(kind: str, stored_config: dict, config: dict, stored_info: dict,
                     info: dict) -> list:
  """[(field, stored value, new value)] of run-defining fields that differ.

  A data location that differs does not count when both runs recorded the same data
  fingerprint; a teacher location that differs does not count when both name the same teacher
  run id.
  """
  new = config_lib.flatten(config)
  old = {**{k: v for k, v in workdir_lib.ADDED_KEYS.items() if k in new},
         **config_lib.flatten(stored_config)}
  out = []
  for key in _defining_keys(kind, old, new):
    if _same_value(key, old.get(key), new.get(key)):
      continue
    if key in DATA_LOCATION_FIELDS and _same_known(stored_info, info, "data_fingerprint"):
      continue
    if key == "distill.teacher_workdir" and _same_known(stored_info, info, "teacher_run_id"):
      continue
    out.append((key, old.get(key), new.get(key)))
  for key in RUN_INFO_FIELDS.get(kind, ()):
    if stored_info.get(key) != info.get(key):
      out.append((f"run.json {key}", stored_info.get(key), info.get(key)))
  return out


def _same_known(a: dict, b: dict, key: str) -> bool:
  return a.get(key) is not None and a.get(key) == b.get(key)


def _teacher_info(teacher_workdir: str) -> dict:
  """{"teacher_run_id": …} from the teacher's run.json, or {} where it has none yet."""
  path = os.path.join(teacher_workdir, "run.json")
  if not os.path.exists(path):
    return {}
  return {"teacher_run_id": workdir_lib.read_json(path).get("run_id")}


def same_teacher(student_info: dict, teacher_workdir: str) -> bool:
  """Whether a student's run.json names the teacher in teacher_workdir: by the teacher's run id
  where both are recorded (a moved or copied teacher still counts, as in `field_mismatches`),
  else by path."""
  teacher = _teacher_info(teacher_workdir)
  if teacher.get("teacher_run_id") is not None and student_info.get("teacher_run_id") is not None:
    return _same_known(student_info, teacher, "teacher_run_id")
  return workdir_lib.norm_path(student_info.get("teacher_workdir") or "") == workdir_lib.norm_path(
      teacher_workdir)


def moved_data_keys(teacher_workdir: str, setup) -> tuple:
  """Data-location keys a student may spell differently from its teacher: data.cache_dir always,
  data.path and data.tfds_data_dir too when the teacher recorded the same data fingerprint."""
  path = os.path.join(teacher_workdir, "run.json")
  stored = workdir_lib.read_json(path).get("data_fingerprint") if os.path.exists(path) else None
  if stored and stored == data_fingerprint(setup.train_tokens, setup.eval_tokens):
    return ("data.cache_dir", *DATA_LOCATION_FIELDS)
  return ("data.cache_dir",)


def overrides(config) -> tuple:
  """The fields --config.resume_override=a.b,c.d allows to change on resume."""
  text = config_lib.typed(config).resume_override
  return tuple(f.strip() for f in text.split(",") if f.strip())


# ---------------------------------------------------------------------------------------------
# Checks (read only).


def check_location(workdir: str) -> None:
  """The workdir is a directory or can be created, on a writable file system."""
  if not workdir:
    raise workdir_lib.WorkdirError("--workdir is empty.")
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise workdir_lib.WorkdirError(f"workdir {workdir} exists and is not a directory; choose "
                                   "another --workdir.")
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise workdir_lib.WorkdirError(f"workdir {workdir} cannot be created: {existing} is a file.")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise workdir_lib.WorkdirError(f"workdir {workdir} is not writable ({existing}: read-only "
                                   "file system or no permission).")


def check_kind(workdir: str, kind: str) -> bool:
  """True if `workdir` holds a run of `kind`, False if none; WorkdirError for another kind."""
  stored = stored_kind(workdir) if os.path.isdir(workdir) else None
  if stored not in (None, kind):
    raise workdir_lib.WorkdirError(
        f"{workdir} holds a {stored!r} run, this command writes a {kind!r} run; use a new "
        f"--workdir (nothing was changed in {workdir}).")
  return stored is not None


def check(workdir: str, kind: str, config, run_info: dict) -> None:
  """Raise WorkdirError (one line) if `workdir` cannot take this run; writes nothing."""
  check_location(workdir)
  if kind in ("student", "sdtt"):
    teacher = config.distill.teacher_workdir
    if teacher and workdir_lib.norm_path(teacher) == workdir_lib.norm_path(workdir):
      raise workdir_lib.WorkdirError(
          f"--workdir {workdir} is the teacher's workdir; a student needs its own --workdir "
          "(distilling there would overwrite the teacher).")
  if not check_kind(workdir, kind) or not RUN_DEFINING[kind]:
    return
  stored_config = workdir_lib.read_json(os.path.join(workdir, "config.json"))
  stored_info = workdir_lib.read_json(os.path.join(workdir, "run.json"))
  allowed = overrides(config)
  for field, old, new in field_mismatches(kind, stored_config,
                                          config_lib.to_dict(config_lib.typed(config)),
                                          stored_info, run_info):
    if field not in allowed:
      hint = ("use a new --workdir" if field.startswith("run.json") else
              f"use a new --workdir, or add --config.resume_override={field} to continue this "
              "run with the new value")
      raise workdir_lib.WorkdirError(
          f"{workdir} holds a {kind!r} run with {field}={old!r}, this command has {new!r}; {hint} "
          f"(nothing was changed in {workdir}).")


# ---------------------------------------------------------------------------------------------
# The lock.


def lock(workdir: str) -> None:
  """Take the exclusive lock of `workdir` (created if needed) for this process.

  Re-entrant within one process. Raises WorkdirError("workdir in use by PID n") when another
  process holds it; the kernel drops the lock when its holder exits or is killed.
  """
  key = workdir_lib.norm_path(workdir)
  if key in _HELD:
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
    os.close(fd)
    if e.errno in (errno.EAGAIN, errno.EACCES):
      raise workdir_lib.WorkdirError(
          f"workdir in use by PID {holder} ({workdir}); wait for it to finish or stop it, or use "
          "another --workdir.") from None
    raise
  os.ftruncate(fd, 0)
  os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
  _HELD[key] = fd


def release(workdir: str) -> None:
  fd = _HELD.pop(workdir_lib.norm_path(workdir), None)
  if fd is not None:
    os.close(fd)  # closing the only descriptor drops the flock


def releases_locks(fn):
  """Decorator: locks taken during fn (by `claim`) are released when it returns or raises."""
  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    before = set(_HELD)
    try:
      return fn(*args, **kwargs)
    finally:
      for key in set(_HELD) - before:
        os.close(_HELD.pop(key))
  return wrapper


# ---------------------------------------------------------------------------------------------
# Writing (under the lock).


def claim(workdir: str, kind: str, config, run_info: dict, data=None) -> None:
  """Check, lock, re-check and record the run in `workdir` (see the module docstring).

  run_info: run.json entries ("kind", "data_info": DataInfo, …). data: optional (train, eval)
  token arrays, recorded as run.json "data_fingerprint".
  """
  run_info = dict(run_info)
  if data is not None:
    run_info["data_fingerprint"] = data_fingerprint(*data)
  teacher = config.distill.teacher_workdir if kind in ("student", "sdtt") else ""
  if teacher:
    run_info.update(_teacher_info(teacher))
  check(workdir, kind, config, run_info)
  if jax.process_index() != 0:
    return
  lock(workdir)
  check(workdir, kind, config, run_info)
  config = config_lib.to_dict(config_lib.typed(config))
  record_config(workdir, config)
  record_run_info(workdir, dict(run_info, config=config))


def record_config(workdir: str, config: dict) -> None:
  """Write config.json; a differing earlier one is kept as config_history/config_<n>.json."""
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    previous = workdir_lib.read_json(path)
    if previous == config:
      return
    history = os.path.join(workdir, HISTORY_DIR)
    os.makedirs(history, exist_ok=True)
    n = len([f for f in os.listdir(history) if f.startswith("config_")]) + 1
    write_json_atomically(os.path.join(history, f"config_{n}.json"), previous)
  write_json_atomically(path, config)


def record_run_info(workdir: str, run_info: dict) -> None:
  """Write run.json (keeping a stored run_id; a new run gets a fresh one) with the code's
  provenance: that of the first launch, and "resumed_with" each different one since."""
  path = os.path.join(workdir, "run.json")
  stored = workdir_lib.read_json(path) if os.path.exists(path) else {}
  now = provenance.current()
  first = stored.get("provenance") or now
  resumed_with = list(stored.get("resumed_with", []))
  if now != (resumed_with[-1] if resumed_with else first):
    resumed_with.append(now)
  info = dict(run_info, data_info=run_info["data_info"].to_json(),
              run_id=stored.get("run_id") or uuid.uuid4().hex, provenance=first)
  if resumed_with:
    info["resumed_with"] = resumed_with
  if info != stored:
    write_json_atomically(path, info)


def write_json_atomically(path: str, value) -> None:
  """Replace the file in one step: other hosts may be reading it at this moment (a resume)."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=2)
  os.replace(tmp, path)


def claim_record(workdir: str, kind: str) -> None:
  """Kind check and lock for a run that does not resume but retrains (reference LM, feature
  net); call it before training, in a function decorated with `releases_locks`."""
  check_location(workdir)
  check_kind(workdir, kind)
  if jax.process_index() == 0:
    lock(workdir)
