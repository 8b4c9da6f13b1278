"""Binding a block model's clean context to its apply_fn, for code written for whole sequences.

A block-autoregressive denoiser (`models/blocks.py`) is called as
apply_fn(params, tokens, t, noise, clean); the ELBO, the samplers and the D-MMD estimator call
apply_fn(params, tokens, t, noise). `with_context` closes over the clean tokens.
"""

import functools


def with_context(apply_fn, clean):
  """apply_fn with the clean context `[batch, length]` bound: (params, tokens, t, noise=None)."""
  return functools.partial(_bound, apply_fn=apply_fn, clean=clean)


def _bound(params, tokens, t, noise=None, *, apply_fn, clean):
  return apply_fn(params, tokens, t, noise, clean)
