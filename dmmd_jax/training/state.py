"""Training state, the one optimizer factory, EMA, and optimizer states born sharded."""

import flax
import jax
import optax

from dmmd_jax.infra import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  ema_params: dict
  opt_state: optax.OptState


def make_optimizer(learning_rate, warmup_steps, total_steps, weight_decay=0.0, grad_clip=1.0,
                   b1=0.9, b2=0.99, final_fraction=0.1):
  """AdamW, linear warm-up, cosine decay to final_fraction · learning_rate, global-norm clipping.

  Every network of the project (teacher, student, auxiliary, SDTT student, reference LM, feature
  net) is trained with this optimizer; grad_clip=None: no clipping.
  """
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, warmup_steps, max(total_steps, warmup_steps + 1),
      end_value=final_fraction * learning_rate)
  adamw = optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay)
  return adamw if grad_clip is None else optax.chain(optax.clip_by_global_norm(grad_clip), adamw)


def ema_update(ema, params, decay: float):
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def init_opt_state(optimizer, params, mesh):
  """optimizer.init(params) with every moment sharded like its parameter, counters replicated.

  A plain jax.jit(optimizer.init) puts its outputs (zeros that do not depend on the parameters'
  values) on one device, which a multi-device or multi-process step cannot take. A state leaf is
  matched to the parameter whose key path ends its own (optax.multi_transform nests them too).
  """
  by_path = {_key_names(path): x for path, x in jax.tree_util.tree_leaves_with_path(params)}
  depth = max(map(len, by_path), default=0)

  def leaf_sharding(path, leaf):
    names = _key_names(path)
    for n in range(min(depth, len(names)), 0, -1):
      param = by_path.get(names[-n:])
      if param is not None and param.shape == leaf.shape:
        return param.sharding
    return sharding.replicated(mesh)

  abstract = jax.eval_shape(optimizer.init, params)
  shardings = jax.tree_util.tree_map_with_path(leaf_sharding, abstract)
  return jax.jit(optimizer.init, out_shardings=shardings)(params)


def _key_names(path) -> tuple:
  return tuple(str(k) for k in path)


def shardings_of(tree):
  """The NamedShardings of a tree of live arrays (params, optimizer states, …)."""
  return jax.tree.map(lambda x: x.sharding, tree)
