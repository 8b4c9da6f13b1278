"""An exactly enumerable D-MMD problem: the copy task with tabular networks.

Data: x_1 = … = x_L = c with c ~ U{K} (L positions that must agree). A 1-step student maps
(ε, z_1) to a factorised output, where ε ~ U{num_noise} is its discrete noise input and z_1 ~ π
(uniform tokens, or all MASK); it is a table `[num_noise, V_in**L, L, K]` of logits. The teacher
is the exact denoiser of the data, x̂_θ(z_s, s) (a closed form). The auxiliary is a table
`[num_buckets, V_in**L, L, K]`, one row per z_s state and bucket of s. Every quantity of the
method — E_student[x | z_s], the moment mismatch, the copy rate — can then be summed exactly over
(ε, z_1, x, z_s), while the updates run the library's loss (`dmmd.moment_losses`) on sampled
draws. Used by tests/distill/test_dmmd_enumeration.py (distillation learns) and
bench/uniform_estimator.py (which uniform estimator trains better).
"""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import optax

from dmmd_jax.diffusion import forward_process
from dmmd_jax.distill import dmmd


@dataclasses.dataclass(frozen=True)
class ToyProblem:
  """Copy data over `kernel.vocab_size` tokens and `length` positions; table sizes."""

  kernel: forward_process.ForwardProcess
  length: int = 2
  num_noise: int = 1
  num_buckets: int = 4

  @property
  def num_ids(self) -> int:
    return self.kernel.input_vocab_size

  def states(self, num_ids: int):
    """All sequences over num_ids ids: int `[num_ids**L, L]` (row r is state r)."""
    return jnp.asarray(list(itertools.product(range(num_ids), repeat=self.length)), jnp.int32)

  def index(self, z):
    """State index of z `[..., L]` over the input ids: int `[...]`."""
    powers = self.num_ids ** jnp.arange(self.length - 1, -1, -1)
    return jnp.sum(z * powers, axis=-1)


def copy_teacher_log_probs(problem: ToyProblem, z_s, s):
  """Exact log x̂_θ(z_s, s) of copy data: z_s int `[..., L]`, s `[...]` → `[..., L, K]`."""
  k = problem.kernel.vocab_size
  q = forward_process.marginal_probs(problem.kernel, jnp.eye(k), s[..., None])  # [..., K(c), V_in]
  log_lik = jnp.sum(forward_process.safe_log(jnp.take_along_axis(
      q[..., None, :, :], z_s[..., :, None, None], axis=-1)[..., 0]), axis=-2)  # [..., K]
  posterior = jax.nn.log_softmax(log_lik, axis=-1)
  return jnp.broadcast_to(posterior[..., None, :], z_s.shape + (k,))


@functools.partial(jax.jit, static_argnums=0)
def init_tables(problem: ToyProblem, key, noise_scale: float):
  """(student, auxiliary) logits. Both copy the teacher (the student at t = 1, the auxiliary at
  each bucket's mid time); the student's noise rows get N(0, noise_scale²) offsets."""
  n_states = problem.num_ids ** problem.length
  z = problem.states(problem.num_ids)
  at_one = copy_teacher_log_probs(problem, z, jnp.ones(n_states))
  student = jnp.broadcast_to(at_one, (problem.num_noise,) + at_one.shape)
  if problem.num_noise > 1:
    student = student + noise_scale * jax.random.normal(key, (problem.num_noise, 1, 1,
                                                              problem.kernel.vocab_size))
  mids = (jnp.arange(problem.num_buckets) + 0.5) / problem.num_buckets
  aux = jax.vmap(lambda s: copy_teacher_log_probs(problem, z, jnp.full((n_states,), s)))(mids)
  return student, aux


def bucket(problem: ToyProblem, s):
  return jnp.clip(jnp.floor(s * problem.num_buckets).astype(jnp.int32), 0,
                  problem.num_buckets - 1)


def student_draw(problem: ToyProblem, student, key, batch_size: int):
  """Algorithm 1's draw for the 1-step tabular student (t = 1): `dmmd.student_draw`'s dict."""
  noise_key, zt_key, x_key, s_key, zs_key = jax.random.split(key, 5)
  kernel, shape = problem.kernel, (batch_size, problem.length)
  noise = jax.random.randint(noise_key, (batch_size,), 0, problem.num_noise)
  z_t = forward_process.sample_prior(zt_key, kernel, shape)
  log_p = jax.nn.log_softmax(student[noise, problem.index(z_t)], axis=-1)
  x = jax.random.categorical(x_key, jax.lax.stop_gradient(log_p))
  s, t = jax.random.uniform(s_key, (batch_size,)), jnp.ones((batch_size,))
  log_q = forward_process.posterior_log_probs(kernel, z_t,
                                              forward_process.log_one_hot(x, kernel.vocab_size),
                                      s[:, None], t[:, None])
  z_s = jax.random.categorical(zs_key, log_q).astype(jnp.int32)
  return dict(s=s, t=t, z_t=z_t, x_student=x, z_s=z_s, log_p=log_p)


def losses(problem: ToyProblem, cfg: dmmd.EstimatorConfig, student, aux, key, batch_size: int):
  """`dmmd.moment_losses` of one sampled batch (exact teacher, tabular auxiliary)."""
  draw = student_draw(problem, student, key, batch_size)
  log_teacher = copy_teacher_log_probs(problem, draw["z_s"], draw["s"])
  log_aux = jax.nn.log_softmax(aux[bucket(problem, draw["s"]), problem.index(draw["z_s"])], -1)
  return dmmd.moment_losses(draw, log_teacher, log_aux, kernel=problem.kernel, cfg=cfg)


def exact_moments(problem: ToyProblem, student, s):
  """Exact (m(z_s), E_student[x | z_s]) at time s: `[V_in**L]`, `[V_in**L, L, K]`.

  Sums over ε, z_1 ~ π, x ~ student and z_s ~ q(z_s | z_1, x); impossible z_s get m = 0 and
  moments 1/K.
  """
  kernel, k = problem.kernel, problem.kernel.vocab_size
  z = problem.states(problem.num_ids)  # z_1 and z_s states
  xs = problem.states(k)
  prior_z1 = jnp.prod(forward_process.marginal_probs(kernel, jnp.zeros(k), 1.0)[z], -1)
  probs = jax.nn.softmax(student, axis=-1)  # [N, Z1, L, K]
  p_x = jnp.prod(jnp.take_along_axis(probs[:, :, None], xs[None, None, :, :, None], -1)[..., 0],
                 -1)  # [N, Z1, X]
  shape = (z.shape[0], xs.shape[0], problem.length)
  log_q = forward_process.posterior_log_probs(
      kernel, jnp.broadcast_to(z[:, None, :], shape),
      jnp.broadcast_to(forward_process.log_one_hot(xs, k)[None],
                       shape + (k,)), s, 1.0)  # [Z1, X, L, V]
  q = jnp.exp(jnp.sum(_gather_states(log_q, z), axis=-1))  # [Z1, X, Zs]
  joint = (jnp.mean(p_x, axis=0) * prior_z1[:, None])[..., None] * q  # [Z1, X, Zs]
  m = jnp.sum(joint, axis=(0, 1))
  one_hot = jax.nn.one_hot(xs, k)  # [X, L, K]
  moments = jnp.einsum("axz,xlk->zlk", joint, one_hot) / jnp.maximum(m, 1e-30)[:, None, None]
  return m, jnp.where((m > 0)[:, None, None], moments, 1.0 / k)


def _gather_states(log_q, z):
  """log q per position at every z_s state: `[Z1, X, L, V_in]` → `[Z1, X, Zs, L]`."""
  return jnp.take_along_axis(log_q[:, :, None], z[None, None, :, :, None], axis=-1)[..., 0]


@functools.partial(jax.jit, static_argnums=0)
def exact_mismatch(problem: ToyProblem, student, s_grid):
  """Mean over s in s_grid of E_{z_s}[mean_i ½ ‖E_student[x_i | z_s] − x̂_θ(z_s)_i‖₁] (exact)."""
  z = problem.states(problem.num_ids)

  def at(s):
    m, moments = exact_moments(problem, student, s)
    teacher = jnp.exp(copy_teacher_log_probs(problem, z, jnp.full(z.shape[:1], s)))
    tv = 0.5 * jnp.mean(jnp.sum(jnp.abs(moments - teacher), -1), -1)
    return jnp.sum(m * tv)

  return jnp.mean(jax.vmap(at)(jnp.asarray(s_grid)))


@functools.partial(jax.jit, static_argnums=0)
def copy_rate(problem: ToyProblem, student):
  """P(x_1 = … = x_L) for one student step from z_1 ~ π (exact)."""
  z = problem.states(problem.num_ids)
  kernel = problem.kernel
  prior_z1 = jnp.prod(forward_process.marginal_probs(kernel, jnp.zeros(kernel.vocab_size), 1.0)[z],
                      -1)
  agree = jnp.sum(jnp.prod(jax.nn.softmax(student, -1), axis=-2), axis=-1)  # [N, Z1]
  return jnp.sum(jnp.mean(agree, 0) * prior_z1)


@functools.partial(jax.jit, static_argnames=("problem", "cfg", "num_updates", "batch_size",
                                             "learning_rate", "aux_learning_rate"))
def train(problem: ToyProblem, cfg: dmmd.EstimatorConfig, student, aux, key, *,
          num_updates: int, batch_size: int, learning_rate: float, aux_learning_rate: float):
  """num_updates rounds of one auxiliary then one student Adam step; returns (student, aux)."""
  opt, aux_opt = optax.adam(learning_rate), optax.adam(aux_learning_rate)

  def one_round(carry, round_key):
    student, aux, opt_state, aux_state = carry
    aux_key, gen_key = jax.random.split(round_key)
    grads = jax.grad(lambda a: losses(problem, cfg, student, a, aux_key, batch_size)["aux_loss"])(
        aux)
    updates, aux_state = aux_opt.update(grads, aux_state)
    aux = optax.apply_updates(aux, updates)
    grads = jax.grad(lambda p: losses(problem, cfg, p, aux, gen_key, batch_size)["gen_loss"])(
        student)
    updates, opt_state = opt.update(grads, opt_state)
    return (optax.apply_updates(student, updates), aux, opt_state, aux_state), None

  carry = (student, aux, opt.init(student), aux_opt.init(aux))
  (student, aux, _, _), _ = jax.lax.scan(one_round, carry, jax.random.split(key, num_updates))
  return student, aux


def initial_state(problem: ToyProblem, seed: int, noise_scale: float):
  """(student, aux, training key) for a seed."""
  init_key, train_key = jax.random.split(jax.random.key(seed))
  return (*init_tables(problem, init_key, noise_scale), train_key)

