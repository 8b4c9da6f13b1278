"""Mutation score of the core D-MMD / kernel / ELBO tests (issue 11).

Each mutation is one exact source edit (it must match once) applied to a temporary copy of
`dmmd_jax/`; the core tests then run against the copy (PYTHONPATH first, `pytest -x`, so the
first failure ends the run). A mutation is killed when the tests fail, survived when they pass.
The unmutated copy must pass first. Prints a table and the score.

    python bench/mutation_score.py                # all mutations
    python bench/mutation_score.py --only sign    # names containing "sign"
"""

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
CORE_TESTS = [
    "tests/distill/test_dmmd_enumeration.py",
    "tests/distill/test_dmmd_defects.py",
    "tests/distill/test_dmmd_losses.py::test_auxiliary_optimum_is_half_student_moments_plus_teacher",
    "tests/distill/test_dmmd_losses.py::test_soft_target_identity",
    "tests/distill/test_dmmd_losses.py::test_masked_gen_loss_is_the_papers_weighted_log_ratio",
    "tests/distill/test_dmmd_losses.py::test_losses_are_finite_when_s_is_exactly_zero",
    "tests/training/test_dmmd_run.py::test_joint_update_is_a_student_and_an_aux_update_from_the_same_state",
    "tests/diffusion/test_forward_process.py",
    "tests/diffusion/test_elbo.py",
    "tests/diffusion/test_schedules.py",
]

# (name, file under dmmd_jax/, old text, new text)
MUTATIONS = [
    ("generator loss sign flipped", "distill/dmmd.py",
     "gen = rate * jnp.sum(p_student * log_ratio, axis=-1)",
     "gen = -rate * jnp.sum(p_student * log_ratio, axis=-1)"),
    ("generator 1/h rate dropped", "distill/dmmd.py",
     "gen = rate * jnp.sum(p_student * log_ratio, axis=-1)",
     "gen = jnp.sum(p_student * log_ratio, axis=-1)"),
    ("s-dependent weight (−α'_s) dropped", "distill/dmmd.py",
     "slope = -schedules.alpha_derivative(s, kernel.schedule)",
     "slope = jnp.ones_like(s)"),
    ("teacher and auxiliary swapped in the log-ratio", "distill/dmmd.py",
     "log_ratio = jax.lax.stop_gradient(rev_aux - rev_teacher)",
     "log_ratio = jax.lax.stop_gradient(rev_teacher - rev_aux)"),
    ("teacher and auxiliary swapped in the auxiliary KL", "distill/dmmd.py",
     "_kl(rev_teacher, rev_aux))", "_kl(rev_aux, rev_teacher))"),
    ("auxiliary target: teacher term dropped", "distill/dmmd.py",
     "aux = rate * (_kl(rev(target), rev_aux) + _kl(rev_teacher, rev_aux))",
     "aux = rate * _kl(rev(target), rev_aux)"),
    ("auxiliary target always soft", "distill/dmmd.py",
     "  if cfg.soft_targets:\n    target", "  if True:\n    target"),
    ("stop_gradient on the Rao-Blackwell weights removed", "distill/dmmd.py",
     "  log_p = jax.lax.stop_gradient(draw[\"log_p\"])\n  return jax.lax.stop_gradient(\n"
     "      log_q - jax.nn.logsumexp(log_p + log_q, axis=-1, keepdims=True))",
     "  log_p = draw[\"log_p\"]\n  return (\n"
     "      log_q - jax.nn.logsumexp(log_p + log_q, axis=-1, keepdims=True))"),
    ("Rao-Blackwell weights without the student's p", "distill/dmmd.py",
     "log_q - jax.nn.logsumexp(log_p + log_q, axis=-1, keepdims=True))",
     "log_q - jax.nn.logsumexp(log_q, axis=-1, keepdims=True))"),
    ("Rao-Blackwell estimator ignored", "distill/dmmd.py",
     "if not kernel.is_masked and cfg.uniform_estimator == \"rao_blackwell\":",
     "if False:"),
    ("stop_gradient on the generator's log-ratio removed (joint updates)", "distill/dmmd.py",
     "log_ratio = jax.lax.stop_gradient(rev_aux - rev_teacher)",
     "log_ratio = rev_aux - rev_teacher"),
    ("per-token normalisation dropped", "distill/dmmd.py",
     "gen_loss=jnp.mean(jnp.sum(gen, -1)) / length,",
     "gen_loss=jnp.mean(jnp.sum(gen, -1)),"),
    ("1 / q(z_t given c) dropped from the class likelihoods", "diffusion/forward_process.py",
     "log_q = log_a + log_m - log_n  # q(z_t | z_s) q(z_s | c) / q(z_t | c)",
     "log_q = log_a + log_m  # q(z_t | z_s) q(z_s | c) / q(z_t | c)"),
    ("masked posterior γ not divided by 1 − α_t", "diffusion/forward_process.py",
     "gamma = jnp.where(positive, jnp.clip(gap / denom, 0.0, 1.0), 0.0)\n  stay_masked",
     "gamma = jnp.where(positive, jnp.clip(gap, 0.0, 1.0), 0.0)\n  stay_masked"),
    ("uniform posterior: α_s dropped from the direct term", "diffusion/forward_process.py",
     "direct = safe_log(alpha_s) + x_over_n", "direct = x_over_n"),
    ("cancelling float32 1 − α (cosine)", "diffusion/schedules.py",
     "return t if schedule == \"linear\" else 2.0 * jnp.sin(0.25 * jnp.pi * t) ** 2",
     "return t if schedule == \"linear\" else 1.0 - jnp.cos(0.5 * jnp.pi * t)"),
    ("masked ELBO weight w(t) dropped", "diffusion/elbo.py",
     "return schedules.elbo_weight(t, kernel.schedule) * jnp.sum(",
     "return jnp.sum("),
    ("uniform ELBO: the T scale dropped", "diffusion/elbo.py",
     "return num_steps * posterior_kl(", "return posterior_kl("),
    ("learning-rate schedules: student and auxiliary shares swapped", "training/dmmd_run.py",
     "  return student, num_steps - student\n", "  return num_steps - student, student\n"),
]


def run_tests(package_root: pathlib.Path, tests) -> tuple[bool, float]:
  env = dict(os.environ, PYTHONPATH=str(package_root))
  env.pop("XLA_FLAGS", None)
  start = time.perf_counter()
  # Run from the copy's root: `python -m` puts the working directory first on sys.path, so from
  # the repository the unmutated package would be imported.
  result = subprocess.run(
      [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
       f"--rootdir={REPO}", *(str(REPO / t) for t in tests)],
      cwd=package_root, env=env, capture_output=True, text=True, check=False)
  imported = subprocess.run([sys.executable, "-c", "import dmmd_jax; print(dmmd_jax.__file__)"],
                            cwd=package_root, env=env, capture_output=True, text=True, check=True)
  if not imported.stdout.startswith(str(package_root)):
    raise SystemExit(f"the tests would import {imported.stdout.strip()}, not the copy.")
  return result.returncode == 0, time.perf_counter() - start


def mutated_copy(root: pathlib.Path, mutation) -> pathlib.Path:
  name, filename, old, new = mutation
  target = root / "dmmd_jax"
  shutil.rmtree(target, ignore_errors=True)
  shutil.copytree(REPO / "dmmd_jax", target, ignore=shutil.ignore_patterns("__pycache__"))
  if old is not None:
    path = target / filename
    text = path.read_text()
    if text.count(old) != 1:
      raise SystemExit(f"mutation {name!r}: the text to replace occurs {text.count(old)} times "
                       f"in {filename}; update bench/mutation_score.py.")
    path.write_text(text.replace(old, new))
  return root


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", default="", help="run mutations whose name contains this")
  parser.add_argument("--skip_baseline", action="store_true")
  args = parser.parse_args()
  chosen = [m for m in MUTATIONS if args.only in m[0]]
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    if not args.skip_baseline:
      passed, seconds = run_tests(mutated_copy(root, ("baseline", "", None, None)), CORE_TESTS)
      print(f"baseline (no mutation): {'pass' if passed else 'FAIL'} ({seconds:.0f} s)",
            flush=True)
      if not passed:
        raise SystemExit("the core tests fail without any mutation; fix them first.")
    killed = 0
    print("| mutation | file | result | seconds |\n|---|---|---|---|", flush=True)
    for mutation in chosen:
      passed, seconds = run_tests(mutated_copy(root, mutation), CORE_TESTS)
      killed += not passed
      print(f"| {mutation[0]} | {mutation[1]} | {'survived' if passed else 'killed'} | "
            f"{seconds:.0f} |", flush=True)
  print(f"mutation score: {killed}/{len(chosen)} killed")


if __name__ == "__main__":
  main()
