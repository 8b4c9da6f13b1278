"""Checks on output paths and sizes, made before any expensive work (one-line ValueErrors)."""

import os

# Bytes per sampled token held at once: the int32 batches, their concatenation, the int32 copy
# written to .npy and the decoded text or PNG grid (≈ 4 bytes each).
BYTES_PER_TOKEN = 16


class OutputError(ValueError):
  """An output that cannot be written as asked."""


def npy_path(path: str) -> str:
  """The path numpy.save really writes: `path` with `.npy` appended unless it ends so."""
  return path if path.endswith(".npy") else path + ".npy"


def _nearest_existing(path: str) -> str:
  existing = os.path.abspath(path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  return existing


def check_writable_file(path: str, flag: str = "--output") -> None:
  """`path` can be created or replaced: not a directory, no file in the way, writable parent."""
  if not path:
    raise OutputError(f"{flag} is empty.")
  if os.path.isdir(path):
    raise OutputError(f"{flag}={path} is a directory; give a file name.")
  parent = _nearest_existing(os.path.dirname(os.path.abspath(path)))
  if not os.path.isdir(parent):
    raise OutputError(f"{flag}={path} cannot be written: {parent} is a file, not a directory.")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise OutputError(f"{flag}={path} cannot be written: {parent} is not writable.")


def check_writable_dir(path: str, flag: str = "--output_dir") -> None:
  """`path` is a directory or can be created, and is writable."""
  if not path:
    raise OutputError(f"{flag} is empty.")
  existing = _nearest_existing(path)
  if not os.path.isdir(existing):
    raise OutputError(f"{flag}={path} cannot be created: {existing} is a file.")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise OutputError(f"{flag}={path} is not writable ({existing}: read-only file system or no "
                      "permission).")


def available_memory_bytes() -> int:
  """MemAvailable from /proc/meminfo (Linux), else physical pages × page size."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_sample_memory(num_samples: int, seq_len: int, available: int | None = None) -> None:
  """Refuse a --num_samples whose tokens (and their dump) would not fit in available memory."""
  available = available_memory_bytes() if available is None else available
  need = num_samples * seq_len * BYTES_PER_TOKEN
  if need > available:
    most = max(1, available // (seq_len * BYTES_PER_TOKEN))
    raise OutputError(f"--num_samples={num_samples} needs about {need / 2**30:.1f} GiB for "
                      f"{seq_len}-token samples, more than the {available / 2**30:.1f} GiB "
                      f"available; use at most {most} (several runs with different --seed for "
                      "more).")
