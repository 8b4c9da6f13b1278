"""`model.remat`: activation checkpointing changes how the backward pass is computed, never what.

Loss and gradients of the diffusion loss with every remat mode equal those without (same
parameters, same key), and the differentiated program really contains a checkpoint.
"""

import dataclasses
import functools

import _helpers
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmmd_jax import config_lib
from dmmd_jax.diffusion import elbo, forward_process
from dmmd_jax.models import denoiser
from dmmd_jax.training import setup as setup_lib

CFG = denoiser.DenoiserConfig(vocab_size=7, input_vocab_size=8, seq_len=12, num_layers=2,
                              width=32, num_heads=2, cond_dim=16, mask_id=7,
                              noise_kind="projection", noise_dim=4)
KERNEL = forward_process.ForwardProcess("masked", 7, "linear")


def loss_and_grads(remat: str, params, x):
  cfg = dataclasses.replace(CFG, remat=remat)
  apply_fn = functools.partial(denoiser.apply, cfg=cfg)
  loss = lambda p: jnp.mean(elbo.diffusion_loss(jax.random.key(1), p, apply_fn, KERNEL, x, 1))
  return jax.jit(jax.value_and_grad(loss))(params), jax.make_jaxpr(jax.grad(loss))(params)


@pytest.mark.parametrize("remat", [pytest.param(r, marks=() if r == "block" else pytest.mark.slow)
                                   for r in denoiser.REMAT if r != "none"])
def test_remat_gives_identical_loss_and_gradients(remat):
  params = nn.unbox(denoiser.init_params(jax.random.key(0), CFG))
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape),
                        params)  # leave the zero-initialised gates: every block contributes
  x = jax.random.randint(jax.random.key(3), (4, CFG.seq_len), 0, 7)
  (loss, grads), plain_jaxpr = loss_and_grads("none", params, x)
  (loss_r, grads_r), remat_jaxpr = loss_and_grads(remat, params, x)
  np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads_r,
               grads)
  assert "checkpoint" in str(remat_jaxpr) or "remat" in str(remat_jaxpr)
  assert "checkpoint" not in str(plain_jaxpr) and "remat" not in str(plain_jaxpr)
  assert jax.tree.structure(grads_r) == jax.tree.structure(grads)


def test_unknown_remat_is_a_config_error():
  config = _helpers.make_config("digits", "tiny", **{"model.remat": "sometimes"})
  with pytest.raises(config_lib.ConfigError, match="model.remat"):
    setup_lib.build_setup(config, config.train.batch_size)  # before anything compiles
  with pytest.raises(ValueError, match="model.remat"):
    denoiser.validate_config(dataclasses.replace(CFG, remat="sometimes"))
