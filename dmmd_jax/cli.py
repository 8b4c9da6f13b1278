"""What every absl binary shares: config typing, compilation cache, multi-host start-up, errors."""

import os
import sys

import jax
from absl import flags, logging

from dmmd_jax import config_lib
from dmmd_jax.data import types as data_types
from dmmd_jax.infra import distributed
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


def setup_jax() -> None:
  """Persistent compilation cache (≈4× faster small runs) and, if asked, jax.distributed.

  Multi-host settings (coordinator address, process count and id, timeouts) come from flags or
  the environment; see `infra/distributed.py`. Raises distributed.DistributedError (one line).
  """
  logging.set_verbosity(logging.WARNING)  # orbax logs every file and jax every backend at INFO
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
  """absl flags parser for app.run that reports a bad flag or config key as one line."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # flags.Error, or KeyError/ValueError from config_flags
    message = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    unknown = [a.split("=")[0] for a in argv if a.startswith("--config.")
               and message.strip("\"'") == a.split("=")[0].split(".")[-1]]
    if unknown:  # config_flags reports an unknown key as just its quoted name
      message = f"unknown config key {unknown[0]}; see the config file for the known keys"
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def run(fn, *args, **kwargs):
  """Call fn; print user errors as one line `error: …` and exit 1 (no traceback).

  In a multi-host run a failed collective (another process died) is reported the same way.
  """
  try:
    setup_jax()
    return fn(*args, **kwargs)
  except USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  except Exception as e:
    distributed.exit_after_failure(e)  # multi-host: one line, no wait for a dead process
    raise
