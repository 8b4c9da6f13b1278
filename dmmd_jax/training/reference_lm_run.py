"""Training the reference LM (`models/reference_lm.py`) of the generative-perplexity and GM metrics.

`train_reference_lm` is the one trainer (arrays in, parameters out); `train_reference` is the run
of experiments/train_reference_lm.py: it loads the config's data, trains, and stores the LM with
`reference_lm.save`.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from dmmd_jax import config_lib
from dmmd_jax.data import loader, sources
from dmmd_jax.evaluation import metrics as metrics_lib
from dmmd_jax.infra import workdir_guard
from dmmd_jax.models import reference_lm
from dmmd_jax.training import setup as setup_lib
from dmmd_jax.training import state as state_lib


@functools.lru_cache(maxsize=8)
def _lm_step(config: reference_lm.ReferenceLMConfig, optimizer):
  """Jitted (params, opt_state, batch `[b, L]`) → (params, opt_state, mean token NLL)."""

  @jax.jit
  def step(params, opt_state, batch):
    def loss_fn(p):
      return -jnp.mean(reference_lm.token_log_probs(p, batch, config=config))

    nll, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, nll

  return step


def evaluate_nll(params, tokens, *, config: reference_lm.ReferenceLMConfig,
                 batch_size: int = 64) -> float:
  """Token-weighted mean NLL (nats) of int `[n, L]` tokens, accumulated in float64."""
  log_prob_fn = functools.partial(reference_lm.token_log_probs, params, config=config)
  return metrics_lib.generative_perplexity(log_prob_fn, tokens, micro_batch=batch_size).nll


def train_reference_lm(tokens, config: reference_lm.ReferenceLMConfig, *, num_steps: int,
                       batch_size: int, lr: float, seed: int, eval_tokens=None,
                       log_every: int = 100, weight_decay: float = 0.01, progress: bool = False):
  """Trains the reference LM by next-token prediction with AdamW (deterministic for a seed).

  Args:
    tokens: int `[N, L]` training sequences (numpy), L ≤ config.max_len.
    config: model sizes.
    num_steps: optimiser steps.
    batch_size: sequences per step (the grain iterator of `data/loader.py`, shuffled epochs).
    lr: peak learning rate (warm-up over 5% of the steps, cosine decay; `state.make_optimizer`).
    seed: seeds the parameter initialisation and the batch order.
    eval_tokens: optional int `[M, L]` held-out sequences, evaluated at every log point.
    log_every: log every this many steps (and at the last step).
    weight_decay: AdamW decoupled weight decay.
    progress: show a progress bar.

  Returns:
    (params, history): history is a dict of lists, "step", "train_nll" (mean training NLL over
    the steps since the previous log point) and, with eval_tokens, "eval_nll".
  """
  optimizer = state_lib.make_optimizer(lr, max(1, num_steps // 20), num_steps, weight_decay)
  params = reference_lm.init_params(jax.random.PRNGKey(seed), config)
  opt_state, step = optimizer.init(params), _lm_step(config, optimizer)
  batches = loader.batch_iterator(np.asarray(tokens, np.int32), batch_size, seed)
  history = {"step": [], "train_nll": []} | ({"eval_nll": []} if eval_tokens is not None else {})
  window = []
  bar = tqdm(range(1, num_steps + 1), desc="reference LM", disable=not progress)
  for i in bar:
    params, opt_state, nll = step(params, opt_state, next(batches))
    window.append(nll)
    if i % log_every == 0 or i == num_steps:
      history["step"].append(i)
      history["train_nll"].append(float(np.mean(jax.device_get(window))))
      window = []
      if eval_tokens is not None:
        history["eval_nll"].append(evaluate_nll(params, eval_tokens, config=config))
        bar.set_postfix(train_nll=history["train_nll"][-1], eval_nll=history["eval_nll"][-1])
  return params, history


def _check_train_config(t: config_lib.ReferenceTrainConfig) -> None:
  for key in ("num_steps", "batch_size", "learning_rate", "log_every", "eval_examples"):
    if getattr(t, key) <= 0:
      raise config_lib.ConfigError(f"config.train.{key} must be positive, got "
                                   f"{getattr(t, key)}.")


@workdir_guard.releases_locks
def train_reference(config, workdir: str, progress: bool = True) -> dict:
  """Trains the reference LM on config.data (or config.data_from's data) and stores it.

  The held-out NLL is measured on the first train.eval_examples eval rows every train.log_every
  steps. Returns {"eval_nll", "eval_ppl", "train_nll"} (nats per token).
  """
  config = config_lib.typed(config, config_lib.ReferenceLMRunConfig)
  t, m = config.train, config.model
  _check_train_config(t)
  data_cfg = setup_lib.data_config_of(config)
  train_tokens, eval_tokens, info = sources.load_dataset(data_cfg)
  workdir_guard.claim_record(workdir, "reference_lm")
  lm_cfg = reference_lm.ReferenceLMConfig(
      info.vocab_size, info.seq_len, m.num_layers, m.width, m.num_heads, m.mlp_ratio,
      m.positions, m.tie_embeddings)
  params, history = train_reference_lm(
      train_tokens, lm_cfg, num_steps=t.num_steps, batch_size=t.batch_size, lr=t.learning_rate,
      seed=config.seed, eval_tokens=eval_tokens[:t.eval_examples], log_every=t.log_every,
      weight_decay=t.weight_decay, progress=progress)
  result = {"eval_nll": history["eval_nll"][-1], "eval_ppl": math.exp(history["eval_nll"][-1]),
            "train_nll": history["train_nll"][-1]}
  reference_lm.save(workdir, reference_lm.Trained(lm_cfg, params, info),
                    {"data": config_lib.to_dict(data_cfg), "history": history, **result})
  return result
