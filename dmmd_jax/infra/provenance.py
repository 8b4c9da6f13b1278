"""Which code made a run: the git commit of the dmmd_jax checkout and the library versions.

Recorded in a workdir's run.json ("provenance" at the first launch, "resumed_with" for each
later launch from different code), so a number can be traced to the code that produced it.
"""

import functools
import importlib.metadata
import os
import subprocess

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint")


def _git(*args) -> str | None:
  package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    done = subprocess.run(["git", "-C", package_dir, *args], capture_output=True,
                          text=True, timeout=10, check=True)
  except (OSError, subprocess.SubprocessError):
    return None
  return done.stdout.strip()


@functools.cache
def current() -> dict:
  """{"git_commit": 40 hex digits or None (not a git checkout), "git_dirty": uncommitted
  changes to tracked files (None without git), "versions": {package: version}}."""
  commit = _git("rev-parse", "HEAD")
  dirty = None if commit is None else bool(_git("status", "--porcelain", "--untracked-files=no"))
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return {"git_commit": commit, "git_dirty": dirty, "versions": versions}
