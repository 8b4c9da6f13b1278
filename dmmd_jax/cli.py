"""What every absl binary shares: compilation cache, multi-host start-up, one-line errors."""

import json
import os
import re
import sys

import jax
from absl import flags, logging

from dmmd_jax import config_lib
from dmmd_jax.data import types as data_types
from dmmd_jax.infra import checkpoints, distributed
from dmmd_jax.infra import workdir as workdir_lib
from dmmd_jax.training import dmmd_run, loop

# Multi-host flags of every binary (each also readable from the environment; `distributed.py`).
flags.DEFINE_string("coordinator_address", None,
                    "Multi-host: host:port of process 0 (else $DMMD_COORDINATOR_ADDRESS or "
                    "$JAX_COORDINATOR_ADDRESS). Unset: single process.")
flags.DEFINE_integer("num_processes", None,
                     "Multi-host: number of processes (else $DMMD_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's id (else $DMMD_PROCESS_ID).")
flags.DEFINE_integer("local_device_count", None,
                     "CPU only: emulated devices per process (else $DMMD_LOCAL_DEVICE_COUNT).")
flags.DEFINE_integer("distributed_timeout", None,
                     "Seconds to wait for all processes at start-up (else "
                     f"$DMMD_DISTRIBUTED_TIMEOUT, default {distributed.DEFAULT_TIMEOUT}).")
flags.DEFINE_integer("heartbeat_timeout", None,
                     "Seconds without heartbeat before a process counts as dead and the others "
                     "stop (else $DMMD_HEARTBEAT_TIMEOUT, default "
                     f"{distributed.DEFAULT_HEARTBEAT_TIMEOUT}).")

# Errors a user can fix by changing a flag, a config value, a path or the data.
USER_ERRORS = (config_lib.ConfigError, data_types.DataError, workdir_lib.WorkdirError,
               dmmd_run.DistillError, loop.TrainingError, distributed.DistributedError,
               ValueError, FileNotFoundError)
# absl config-file flags of the binaries (loaded eagerly by parse_flags).
CONFIG_FLAGS = ("config",)


def setup_jax() -> None:
  """Persistent compilation cache (≈4× faster small runs) and, if asked, jax.distributed.

  Multi-host settings (coordinator address, process count and id, timeouts) come from flags or
  the environment; see `infra/distributed.py`. Raises distributed.DistributedError (one line).
  """
  logging.set_verbosity(logging.WARNING)  # orbax logs every file and jax every backend at INFO
  checkpoints.silence_closed_event_loop_errors()
  cache = os.environ.get("DMMD_JAX_COMPILATION_CACHE",
                         os.path.expanduser("~/.cache/dmmd_jax/xla"))
  if cache:
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  values = ({name: flags.FLAGS[name].value for _, name, _ in distributed.SOURCES}
            if flags.FLAGS.is_parsed() else {})
  distributed.initialize(distributed.options_from_flags_and_env(values))
  logging.info("process %d/%d, devices %s", jax.process_index(), jax.process_count(),
               jax.devices())


def parse_flags(argv):
  """absl flags parser for app.run that reports a bad flag, config file or config key as one line.

  Config files load lazily in ml_collections; they are loaded here, so that a missing file or a
  failing get_config() is reported before main() runs.
  """
  try:
    rest = flags.FLAGS(argv)
    for name in CONFIG_FLAGS:
      if name in flags.FLAGS and flags.FLAGS[name].value is not None:
        flags.FLAGS[name].value.keys()  # a config that failed to load raises OSError here
    return rest
  except Exception as e:  # flags.Error, or KeyError/ValueError/OSError from config_flags
    print(f"error: {_flag_error_message(e, argv)}", file=sys.stderr)
    sys.exit(2)


def _flag_error_message(e: Exception, argv) -> str:
  lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
  if not lines:
    return type(e).__name__
  if isinstance(e, OSError) and "Failed loading config file" in lines[0]:
    return f"cannot load the config file: {lines[-1]}"
  name = lines[-1].strip("\"'")
  unknown = [a.split("=")[0] for a in argv if a.startswith("--config.")
             and name in a.split("=")[0].split(".")[1:]]
  if unknown:  # config_flags reports an unknown key or section as just its quoted name
    return (f"unknown config key {unknown[0]} ({name!r} does not exist); see the config file "
            "for the known keys")
  return re.sub(r"^[\w.]+(Error|Exception): ", "", lines[-1])


def _os_error_message(e: OSError) -> str:
  """`error: PATH: reason` for an OSError (a missing, unreadable or unwritable file)."""
  path = e.filename if e.filename is not None else ""
  reason = e.strerror or str(e)
  return f"{path}: {reason}" if path else reason


def run(fn, *args, **kwargs):
  """Call fn; print user errors as one line `error: …` and exit 1 (no traceback).

  In a multi-host run a failed collective (another process died) is reported the same way.
  """
  try:
    setup_jax()
    return fn(*args, **kwargs)
  except USER_ERRORS as e:
    _fail(str(e))
  except OSError as e:  # a file that is missing, unreadable, unwritable, or a full disk
    _fail(_os_error_message(e))
  except (EOFError, json.JSONDecodeError) as e:  # a truncated file read outside workdir/data
    _fail(f"a file ended early or is not valid JSON ({type(e).__name__}: {e})")
  except Exception as e:
    distributed.exit_after_failure(e)  # multi-host: one line, no wait for a dead process
    raise


def _fail(message: str) -> None:
  """Print `error: message` and exit 1 at once.

  A failed orbax restore leaves tensorstore reads completing on its threads; during interpreter
  finalisation (sys.excepthook no longer consulted) they print "Event loop is closed"
  tracebacks. A single-process run therefore exits without finalisation (output flushed first);
  a multi-process run exits normally, through jax.distributed's shutdown.
  """
  print(f"error: {message}", file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  if jax.distributed.is_initialized():
    sys.exit(1)
  os._exit(1)
