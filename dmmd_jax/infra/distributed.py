"""Multi-host start-up: `jax.distributed` from flags or environment, with timeouts and clear errors.

Every process of a multi-host run calls `initialize()` before any other JAX call (the absl binaries
do it in `cli.setup_jax`). Settings, flag first, then environment:

    --coordinator_address  DMMD_COORDINATOR_ADDRESS  host:port of process 0 (JAX's own
                                                     JAX_COORDINATOR_ADDRESS works too)
    --num_processes        DMMD_NUM_PROCESSES        number of processes (hosts)
    --process_id           DMMD_PROCESS_ID           this process, in [0, num_processes)
    --local_device_count   DMMD_LOCAL_DEVICE_COUNT   CPU only: emulated devices per process
    --distributed_timeout  DMMD_DISTRIBUTED_TIMEOUT  seconds to wait for all processes (300)
    --heartbeat_timeout    DMMD_HEARTBEAT_TIMEOUT    seconds of silence before a process counts as
                                                     dead and every other process stops (60)
    DMMD_JAX_DISTRIBUTED=1  no address given: let JAX detect the cluster (SLURM, Open MPI, TPU pods)

Without a coordinator address (and without DMMD_JAX_DISTRIBUTED) the run is single-process and
nothing is initialised.

Failure behaviour:
- A coordinator that cannot be reached (process 0 not started, wrong host or port, a firewall):
  processes other than 0 probe the address with plain TCP for `--distributed_timeout` seconds
  before starting JAX's client, then raise `DistributedError` with one line naming the address and
  the setting to change. (JAX itself would abort with a C++ stack trace and a message about a
  "task that died".) Process 0 checks that the port is free before starting the coordinator.
- A process that dies mid-run: a process waiting on it in a collective gets an error from gloo
  at once (the connection is reset), and `cli.run` turns that into one line (`exit_after_failure`)
  and exits with status 1 without waiting for the dead process at shutdown. Otherwise the
  coordination service notices the missing heartbeats (or, if process 0 died, the lost
  connection) and terminates every other process with a non-zero status and the log line
  "Terminating process because the JAX distributed service detected fatal errors. This most
  likely indicates that another task died", within about `--heartbeat_timeout` seconds; nothing
  is left blocked forever. Restart all processes with the same command to resume from the last
  checkpoint. (At a normal exit, processes wait up to JAX's shutdown timeout, 300 s, for each
  other.)

CPU collectives across processes use gloo (`jax_cpu_collectives_implementation`), which is set
when the installed JAX leaves it unset.
"""

import dataclasses
import errno
import inspect
import os
import socket
import sys
import time

import jax

DEFAULT_TIMEOUT = 300


DEFAULT_HEARTBEAT_TIMEOUT = 60


PROBE_INTERVAL = 0.5


# (option, flag name, environment variables in order of precedence); the binaries' flags are
# defined in cli.py.
SOURCES = (
    ("coordinator_address", "coordinator_address",
     ("DMMD_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")),
    ("num_processes", "num_processes", ("DMMD_NUM_PROCESSES",)),
    ("process_id", "process_id", ("DMMD_PROCESS_ID",)),
    ("local_device_count", "local_device_count", ("DMMD_LOCAL_DEVICE_COUNT",)),
    ("timeout", "distributed_timeout", ("DMMD_DISTRIBUTED_TIMEOUT",)),
    ("heartbeat_timeout", "heartbeat_timeout", ("DMMD_HEARTBEAT_TIMEOUT",)),
)


class DistributedError(RuntimeError):
  """Multi-host start-up failed; the message names the setting to change."""


@dataclasses.dataclass(frozen=True)
class Options:
  """How this process joins a run. `names` maps each option to where it was set (for errors)."""

  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_count: int | None = None
  timeout: int = DEFAULT_TIMEOUT
  heartbeat_timeout: int = DEFAULT_HEARTBEAT_TIMEOUT
  auto_detect: bool = False
  names: tuple = ()

  def name(self, option: str) -> str:
    return dict(self.names).get(option, f"--{option}")

  @property
  def multi_process(self) -> bool:
    return bool(self.coordinator_address) or self.auto_detect


def options_from_flags_and_env(flag_values=None, environ=None) -> Options:
  """Options from flag values ({flag name: value or None}) and then the environment; validated."""
  environ = os.environ if environ is None else environ
  flag_values = flag_values or {}
  values, names = {}, {}
  for option, flag_name, env_names in SOURCES:
    flag = f"--{flag_name}"
    if flag_values.get(flag_name) is not None:
      values[option], names[option] = flag_values[flag_name], flag
      continue
    names[option] = f"{flag} (or ${env_names[0]})"
    for env in env_names:
      if environ.get(env, "").strip():
        values[option], names[option] = environ[env].strip(), f"${env}"
        break
  for option in ("num_processes", "process_id", "local_device_count", "timeout",
                 "heartbeat_timeout"):
    if option in values:
      try:
        values[option] = int(values[option])
      except ValueError:
        raise DistributedError(f"{names[option]}={values[option]!r} is not an integer.") from None
  auto = environ.get("DMMD_JAX_DISTRIBUTED", "").strip().lower() not in ("", "0", "false", "no")
  options = Options(**values, auto_detect=auto and not values.get("coordinator_address"),
                    names=tuple(names.items()))
  validate(options)
  return options


def split_address(address: str, name: str = "--coordinator_address") -> tuple[str, int]:
  """'host:port' (or '[ipv6]:port') → (host, port); DistributedError otherwise."""
  host, sep, port = address.strip().rpartition(":")
  host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise DistributedError(f"{name}={address!r} must be host:port with a port in 1..65535 "
                           "(process 0's address, e.g. 10.0.0.1:1234).")
  return host, int(port)


def validate(options: Options) -> None:
  """Check the options without touching the network or JAX; raise DistributedError."""
  o = options
  for option in ("local_device_count", "timeout", "heartbeat_timeout"):
    value = getattr(o, option)
    if value is not None and value < 1:
      raise DistributedError(f"{o.name(option)} must be positive, got {value}.")
  if not o.coordinator_address:
    given = [n for n in ("num_processes", "process_id") if getattr(o, n) is not None]
    if given and not o.auto_detect:
      raise DistributedError(f"{o.name(given[0])} is set but no coordinator address; set "
                             f"{o.name('coordinator_address')} to process 0's host:port.")
    return
  split_address(o.coordinator_address, o.name("coordinator_address"))
  for option in ("num_processes", "process_id"):
    if getattr(o, option) is None:
      raise DistributedError(f"multi-host run ({o.name('coordinator_address')}="
                             f"{o.coordinator_address}) needs {o.name(option)}.")
  if o.num_processes < 1:
    raise DistributedError(f"{o.name('num_processes')} must be positive, got {o.num_processes}.")
  if not 0 <= o.process_id < o.num_processes:
    raise DistributedError(f"{o.name('process_id')}={o.process_id} must lie in "
                           f"[0, {o.num_processes}) ({o.name('num_processes')}="
                           f"{o.num_processes}).")


def check_coordinator(options: Options, deadline: float) -> None:
  """Before JAX's client starts: process 0 needs a free port, the others a reachable one."""
  o = options
  name = o.name("coordinator_address")
  host, port = split_address(o.coordinator_address, name)
  try:
    socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
  except socket.gaierror as e:
    raise DistributedError(f"coordinator host {host!r} cannot be resolved ({e.strerror}); set "
                           f"{name} to process 0's reachable host:port.") from None
  if o.process_id == 0:
    _check_port_free(port, name, o.coordinator_address)
    _warn_if_not_local(host, name)
    return
  last = None
  while True:
    try:
      with socket.create_connection((host, port), timeout=max(0.1, min(2.0, deadline -
                                                                         time.monotonic()))):
        return
    except OSError as e:
      last = e.strerror or type(e).__name__
    if time.monotonic() >= deadline:
      raise DistributedError(
          f"coordinator {o.coordinator_address} not reachable after {o.timeout} s ({last}); "
          f"start process 0 first, or set {name} to process 0's host:port, or raise "
          f"{o.name('timeout')}.")
    time.sleep(PROBE_INTERVAL)


def _check_port_free(port: int, name: str, address: str) -> None:
  """Process 0's coordinator binds [::]:port (or 0.0.0.0:port); fail early if it is taken."""
  for family, anywhere in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
    try:
      sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
      continue  # no IPv6 on this machine
    with sock:
      sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      try:
        sock.bind((anywhere, port))
        return
      except OSError as e:
        if e.errno == errno.EADDRINUSE:
          raise DistributedError(f"port {port} of {name}={address} is already in use on process "
                                 "0's machine; choose a free port.") from None


def _warn_if_not_local(host: str, name: str) -> None:
  """Process 0 runs the coordinator; the others will look for it at `host`."""
  try:
    infos = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)
  except OSError:
    return
  for family, kind, proto, _, address in infos:
    try:
      with socket.socket(family, kind, proto) as sock:
        sock.bind((address[0], 0))
        return
    except OSError:
      continue
  print(f"warning: {name} host {host!r} is not an address of this machine, but process 0 runs "
        "the coordinator; the other processes will not find it unless the address forwards here.",
        file=sys.stderr, flush=True)


def _set_local_devices(options: Options) -> None:
  try:
    jax.config.update("jax_num_cpu_devices", options.local_device_count)
  except (AttributeError, KeyError):  # older JAX: only the XLA flag exists
    flag = f"--xla_force_host_platform_device_count={options.local_device_count}"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
  except RuntimeError:
    raise DistributedError(f"{options.name('local_device_count')} must be set before any JAX "
                           "computation (it is read when the CPU backend starts).") from None


def _supported(fn, kwargs: dict) -> dict:
  """Keep the keyword arguments that the installed JAX's `fn` accepts (0.10 and 0.11 differ)."""
  params = inspect.signature(fn).parameters
  return {k: v for k, v in kwargs.items() if k in params}


def initialize(options: Options | None = None) -> bool:
  """Join the multi-host run described by options (default: the environment).

  Returns True when jax.distributed is (now) initialised, False for a single-process run. Must
  run before any JAX computation; raises DistributedError with a one-line message.
  """
  options = options_from_flags_and_env() if options is None else options
  validate(options)
  if options.local_device_count:
    _set_local_devices(options)
  if not options.multi_process:
    return False
  if jax.distributed.is_initialized():
    return True
  if not getattr(jax.config, "jax_cpu_collectives_implementation", "gloo"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  deadline = time.monotonic() + options.timeout
  if options.coordinator_address and options.num_processes > 1:
    check_coordinator(options, deadline)
  kwargs = _supported(jax.distributed.initialize, dict(
      coordinator_address=options.coordinator_address, num_processes=options.num_processes,
      process_id=options.process_id,
      initialization_timeout=max(10, int(deadline - time.monotonic())),
      heartbeat_timeout_seconds=options.heartbeat_timeout))
  try:
    jax.distributed.initialize(**kwargs)
  except (RuntimeError, ValueError, TypeError) as e:
    where = (f"{options.name('coordinator_address')}={options.coordinator_address}"
             if options.coordinator_address else "cluster auto-detection (DMMD_JAX_DISTRIBUTED)")
    raise DistributedError(f"jax.distributed.initialize failed for {where}: "
                           f"{' '.join(str(e).split())}") from None
  return True


def exit_after_failure(error: BaseException) -> None:
  """In a multi-process run, report a runtime failure in one line and exit 1 at once.

  A failed collective usually means another process died. A normal exit would first wait in
  jax.distributed's shutdown barrier for the dead process (up to the heartbeat timeout) and then
  abort with a C++ stack trace. Returns (does nothing) in a single-process run or for errors that
  are not JAX runtime errors, so the caller re-raises them as usual.
  """
  if not (isinstance(error, jax.errors.JaxRuntimeError) and jax.distributed.is_initialized()):
    return
  detail = " ".join(str(error).split())[:300]
  print(f"error: process {jax.process_index()} of {jax.process_count()} stopped: {detail}. In a "
        "multi-host run this usually means another process died (see its log); restart all "
        "processes with the same command to resume from the last checkpoint.", file=sys.stderr,
        flush=True)
  os._exit(1)
