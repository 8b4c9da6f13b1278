"""Fixtures for every test module: a persistent XLA compilation cache for the whole session."""

from _helpers import jax_compilation_cache  # noqa: F401  (autouse, session scope)
