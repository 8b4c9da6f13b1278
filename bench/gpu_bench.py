r"""One prepared GPU benchmark (H100/H200, ≈15 minutes of device time): one JSON summary.

    python bench/gpu_bench.py --out=$OUT/gpu_bench.json          # on the GPU machine
    python bench/gpu_bench.py --smoke --out=/tmp/gpu_bench.json  # tiny sizes, CPU check

Measures, in three processes run one after another (JAX preallocates GPU memory, so PyTorch gets
its own process):
  train  (JAX)  the bf16 8192³ matmul rate; the library's teacher step and D-MMD updates of
                configs/shakespeare_bpe.py:base (12 layers, width 768, GPT-2 vocabulary, 1024
                tokens, bf16) at batch 32 on synthetic tokens: step time, tokens/s, peak memory,
                model-FLOPs utilisation (MFU) against the matmul rate of the same run; optionally
                a jax.profiler trace of the distillation step (tar.gz next to the JSON).
  torch         bench/torch_peer.py: the same network and batch in plain PyTorch, eager and
                torch.compile (and PyTorch's own matmul rate).
  sample (JAX)  sampling throughput (sequences/s) of a k = 16 student against the teacher at 256
                and 1024 steps (the network is the same size; speed does not depend on training).

After each part the summary (with ratios and goal checks) is rewritten to --out, so a run cut off
by its time limit still returns what it measured; --budget_s bounds the whole run.

Dependencies: the library imports ml-collections and grain (and grain needs array-record and
portpicker), which the GPU image lacks. Carry them as wheels in `.whl/` (bench/README.md); this
script installs them from there into a temporary folder when they are missing. Model FLOPs count
the matmuls and attention products (a forward pass is 2·N·params-per-token plus 4·L·width per
layer and token); a teacher step is 3 forward passes, a D-MMD update 5 (the updated network's
forward and backward, and forward passes of the two others).
"""

import argparse
import datetime
import importlib.util
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
GPU_XLA_FLAGS = ("--xla_gpu_enable_triton_gemm=false "
                 "--xla_gpu_enable_latency_hiding_scheduler=true")
WHEEL_MODULES = ("ml_collections", "grain", "array_record", "portpicker")
GOALS = {"teacher_mfu": 0.75, "distill_mfu": 0.70, "teacher_vs_torch_compile": 1.1}
# Sizes: the base preset as it is, or a tiny network for --smoke.
SMOKE_OVERRIDES = {"model.num_layers": 2, "model.width": 64, "model.num_heads": 2,
                   "model.cond_dim": 32, "model.noise_dim": 8}


# ----------------------------------------------------------------------------------------------
# JAX parts (run in child processes).


def load_config(args, attention: str, batch: int):
  """The preset with the benchmark's batch, length and attention (and tiny sizes for --smoke)."""
  spec = importlib.util.spec_from_file_location("bench_config", REPO / args.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(args.preset)
  config.unlock()
  overrides = {"train.batch_size": batch, "distill.batch_size": batch,
               "data.seq_len": args.length, "model.attention_impl": attention,
               **(SMOKE_OVERRIDES if args.smoke else {})}
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  config.lock()
  return config


def synthetic_setup(config, vocab: int, length: int, batch: int):
  """setup.build_setup on uniform random tokens (speed does not depend on the data)."""
  import numpy as np

  from dmmd_jax import config_lib
  from dmmd_jax.data import types as data_types
  from dmmd_jax.infra import sharding
  from dmmd_jax.models import denoiser
  from dmmd_jax.training import setup as setup_lib

  config_lib.validate(config)
  info = data_types.DataInfo(kind="text", vocab_size=vocab, seq_len=length)
  tokens = np.random.default_rng(0).integers(0, vocab, (batch, length), dtype=np.int32)
  kernel = setup_lib.forward_process_of(config, vocab)
  model_cfg = setup_lib.denoiser_config_of(config, kernel, length)
  denoiser.validate_config(model_cfg)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_divisibility(mesh, batch, model_cfg.width)
  return setup_lib.Setup(config_lib.typed(config), info, tokens, tokens, kernel, model_cfg, mesh)


def forward_flops(cfg, batch: int) -> float:
  """Matmul and attention FLOPs of one forward pass over `batch` sequences."""
  d, length, layers = cfg.width, cfg.seq_len, cfg.num_layers
  per_token = layers * (2 * 3 * d * d + 2 * d * d + 2 * 2 * cfg.mlp_ratio * d * d
                        + 2 * 2 * length * d) + 2 * d * cfg.vocab_size
  per_sequence = layers * 2 * d * 6 * d + 2 * d * 2 * d + 2 * 2 * d * d  # adaLN, time MLP
  return float(batch * (length * per_token + per_sequence))


def param_count(params, skip=("noise_proj",)) -> int:
  import jax

  return int(sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(params)
                 if not any(s in jax.tree_util.keystr(path) for s in skip)))


def memory_stats():
  import jax

  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" not in stats:
    return {}
  return {"peak_memory_gib": stats["peak_bytes_in_use"] / 2**30,
          "memory_limit_gib": stats.get("bytes_limit", 0) / 2**30}


def compiled_info(compiled) -> dict:
  out = {}
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    out["xla_flops"] = float(cost.get("flops", 0.0))
  except Exception:  # not every backend reports it
    pass
  try:
    m = compiled.memory_analysis()
    out["compiled_memory_gib"] = (m.argument_size_in_bytes + m.output_size_in_bytes
                                  + m.temp_size_in_bytes - m.alias_size_in_bytes) / 2**30
  except Exception:
    pass
  return out


def timed_steps(fn, state, steps: int, warmup: int):
  """Seconds per call of state → fn(state) = (state, metrics), after `warmup` calls."""
  import jax

  for _ in range(warmup):
    state, metrics = fn(state)
  jax.block_until_ready((state, metrics))
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = fn(state)
  jax.block_until_ready((state, metrics))
  return (time.perf_counter() - start) / steps, state, metrics


def matmul_tflops(n: int, repeats: int = 10) -> float:
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
  matmul = jax.jit(jnp.matmul)
  for _ in range(3):
    c = matmul(a, b)
  c.block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    c = matmul(a, b)
  c.block_until_ready()
  return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def step_report(step_s, flops, tokens, matmul) -> dict:
  out = {"step_ms": 1e3 * step_s, "tokens_per_s": tokens / step_s,
         "model_tflops_per_s": flops / step_s / 1e12}
  if matmul:
    out["mfu"] = flops / step_s / 1e12 / matmul
  return out


def train_part(args) -> dict:
  """Matmul rate, then the teacher step and the D-MMD updates.

  A phase that fails is retried once or twice: at half the batch after an out-of-memory error,
  else with XLA's attention instead of cuDNN's; every failure is kept under "failures".
  """
  import jax

  result = {"jax_version": jax.__version__, "backend": jax.default_backend(),
            "device": str(jax.devices()[0].device_kind),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}
  result["matmul_tflops"] = matmul_tflops(args.matmul_n)
  emit(result)
  settings = {"attention": args.attention, "batch": args.batch}
  teacher_params = None
  for phase in ("teacher_step", "distill_step"):
    for _ in range(3):
      config = load_config(args, **settings)
      setup = synthetic_setup(config, args.vocab, args.length, settings["batch"])
      try:
        if phase == "teacher_step":
          report, teacher_params = teacher_phase(setup, config, result, args)
        else:
          report = distill_phase(setup, config, result, teacher_params, args)
      except Exception as e:  # reported; the benchmark goes on
        message = " ".join(f"{type(e).__name__}: {e}".split())
        result.setdefault("failures", []).append({"phase": phase, **settings,
                                                  "error": message[:800]})
        emit(result)
        if "RESOURCE_EXHAUSTED" in message or "out of memory" in message.lower():
          settings["batch"] //= 2
        elif settings["attention"] == "cudnn":
          settings["attention"] = "xla"
        else:
          break
        if settings["batch"] < 1:
          break
        continue
      result[phase] = {**report, **settings}
      emit(result)
      break
  return result


def teacher_phase(setup, config, result, args):
  from dmmd_jax.infra import sharding
  from dmmd_jax.training import teacher_run

  cfg, batch_size = setup.model_cfg, setup.config.train.batch_size
  fwd = forward_flops(cfg, batch_size)
  result["size"] = dict(layers=cfg.num_layers, width=cfg.width, heads=cfg.num_heads,
                        vocab=cfg.vocab_size, length=cfg.seq_len, batch=batch_size,
                        dtype=cfg.dtype, attention=cfg.attention_impl)
  result["forward_tflop"] = fwd / 1e12
  batch = sharding.global_batch(setup.train_tokens[:batch_size], setup.mesh)
  optimizer = teacher_run.teacher_optimizer(config)
  state, shardings = teacher_run.init_teacher_state(setup, optimizer)
  result["params"] = param_count(state.params)
  start = time.perf_counter()
  step = teacher_run.compile_teacher_step(setup, optimizer, shardings).lower(
      state, batch).compile()
  report = {"compile_s": time.perf_counter() - start, **compiled_info(step)}
  step_s, state, metrics = timed_steps(lambda s: step(s, batch), state, args.steps,
                                       args.warmup)
  report.update(step_report(step_s, 3 * fwd, batch_size * cfg.seq_len, result["matmul_tflops"]),
                **memory_stats(), loss_bpt=float(metrics["loss_bpt"]))
  return report, state.ema_params  # the rest of the state is freed on return


def distill_phase(setup, config, result, teacher_params, args):
  import functools

  import jax

  from dmmd_jax.infra import sharding
  from dmmd_jax.models import denoiser
  from dmmd_jax.training import dmmd_run
  from dmmd_jax.training import setup as setup_lib
  from dmmd_jax.training import state as state_lib

  cfg, batch_size = setup.model_cfg, setup.config.distill.batch_size
  fwd, tokens, matmul = forward_flops(cfg, batch_size), batch_size * cfg.seq_len, result[
      "matmul_tflops"]
  if teacher_params is None:  # the teacher phase failed: any parameters time the same
    init = functools.partial(denoiser.init_params, cfg=cfg)
    teacher_params, _ = sharding.init_sharded(init, jax.random.key(0), setup.mesh)
  batch = sharding.global_batch(setup.train_tokens[:batch_size], setup.mesh)
  dcfg = setup_lib.estimator_config_of(config)
  student_opt, aux_opt = dmmd_run.distill_optimizers(config)
  dstate = dmmd_run.init_distill_state(teacher_params, student_opt, aux_opt, setup.mesh,
                                      jax.random.key(1), config.distill.noise_init_scale)
  start = time.perf_counter()
  updates = dmmd_run.compile_updates(setup, dcfg, student_opt, aux_opt,
                                     state_lib.shardings_of(dstate),
                                     state_lib.shardings_of(teacher_params))
  student_update, aux_update, joint_update = (u.lower(dstate, teacher_params, batch).compile()
                                              for u in updates)
  report = {"compile_s": time.perf_counter() - start, "student_steps": dcfg.student_steps,
            "teacher_top_p": dcfg.teacher_top_p, "samples_per_z": dcfg.samples_per_z}
  times = {}
  for name, update in (("student", student_update), ("aux", aux_update),
                       ("joint", joint_update)):
    times[name], dstate, metrics = timed_steps(lambda s, u=update: u(s, teacher_params, batch),
                                               dstate, args.steps, args.warmup)
    report[f"{name}_update"] = {**step_report(times[name], 5 * fwd, tokens, matmul),
                                **compiled_info(update)}
  # Peak memory is the process's so far: the distillation state is the larger one.
  report.update(step_report((times["student"] + times["aux"]) / 2, 5 * fwd, tokens, matmul),
                **memory_stats(), gen_loss=float(metrics["gen_loss"]))
  if args.profile:

    def both_updates(s):
      s, _ = student_update(s, teacher_params, batch)
      return aux_update(s, teacher_params, batch)

    report["profile"] = profile(both_updates, dstate, args)
  return report


def profile(fn, state, args) -> str:
  """A jax.profiler trace of 3 calls, as one tar.gz next to --out (for TensorBoard/Perfetto)."""
  import jax

  target = pathlib.Path(args.out).with_name("distill_profile.tar.gz")  # one file: $OUT keeps
  # only files at most two folders down, and a trace sits deeper
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
      for _ in range(3):
        state, _ = fn(state)
      jax.block_until_ready(state)
    with tarfile.open(target, "w:gz") as tar:
      tar.add(tmp, arcname="distill_profile")
  return str(target)


def sample_part(args) -> dict:
  """Sequences/s of the k-step student (fresh noise every step) and the T-step teachers.

  One timed call each after an ahead-of-time compile; the same sampler options for all (the
  preset's, with float32 Gumbel noise). A failing run with cuDNN attention is retried with XLA's.
  """
  import functools

  import jax

  from dmmd_jax.diffusion import sampling
  from dmmd_jax.infra import sharding
  from dmmd_jax.models import denoiser
  from dmmd_jax.training import dmmd_run
  from dmmd_jax.training import setup as setup_lib

  n = args.sample_batch
  result = {"sample_batch": n, "float64": False, "runs": {}}
  runs = [(f"student_k{args.student_steps}", args.student_steps, True),
          *((f"teacher_{s}", s, False) for s in args.teacher_steps)]
  attention, params = args.attention, None
  for name, steps, student in runs:
    for _ in range(2):
      config = load_config(args, attention, args.batch)
      setup = synthetic_setup(config, args.vocab, args.length, args.batch)
      noise_fn = (dmmd_run.student_noise_fn(setup, setup_lib.estimator_config_of(config))
                  if student else None)
      sampler_cfg = setup_lib.sampler_config_of(config, steps, float64=False)
      result["top_p"] = sampler_cfg.top_p

      def draw(key, p, setup=setup, sampler_cfg=sampler_cfg, noise_fn=noise_fn):
        return sampling.sample(key, setup.apply_fn, p, setup.kernel, sampler_cfg, n,
                               setup.seq_len, noise_fn=noise_fn)

      try:
        if params is None:  # initialising runs the network, so it is inside the try too
          init = functools.partial(denoiser.init_params, cfg=setup.model_cfg)
          params, _ = sharding.init_sharded(init, jax.random.key(0), setup.mesh)
        start = time.perf_counter()
        compiled = jax.jit(draw).lower(jax.random.key(1), params).compile()
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        jax.block_until_ready(compiled(jax.random.key(2), params))
        seconds = time.perf_counter() - start
      except Exception as e:  # reported; the benchmark goes on
        message = " ".join(f"{type(e).__name__}: {e}".split())[:800]
        result.setdefault("failures", []).append({"run": name, "attention": attention,
                                                  "error": message})
        emit(result)
        if attention != "cudnn":
          break
        attention = "xla"
        continue
      result["runs"][name] = {"steps": steps, "seconds": seconds, "sequences_per_s": n / seconds,
                              "compile_s": compile_s, "attention": attention}
      emit(result)
      break
  first = result["runs"].get(runs[0][0])
  if first:
    result["speedup_vs_teacher"] = {k: first["sequences_per_s"] / v["sequences_per_s"]
                                    for k, v in result["runs"].items() if k.startswith("teacher")}
  return result


def emit(result: dict) -> None:
  """One JSON line per progress point; the parent keeps the last one it can parse."""
  print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------
# The parent: wheels, child processes, the summary.


def ensure_wheels(args) -> dict:
  """Environment for the JAX children; installs carried wheels for modules this Python lacks."""
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  path = [str(REPO)]
  missing = [m for m in WHEEL_MODULES if importlib.util.find_spec(m) is None]
  if missing:
    wheels = sorted(pathlib.Path(args.wheels).glob("*.whl"))
    if not wheels:
      raise RuntimeError(f"modules {missing} are missing and {args.wheels} has no wheels; carry "
                         "them as bench/README.md explains.")
    target = pathlib.Path(tempfile.gettempdir()) / "dmmd_bench_site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--no-compile", "--upgrade", "--target", str(target), *map(str, wheels)],
                   check=True)
    path.append(str(target))
  env["PYTHONPATH"] = os.pathsep.join([*path, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  gpu = shutil.which("nvidia-smi") is not None
  flags = (GPU_XLA_FLAGS if gpu else "") if args.xla_flags == "auto" else args.xla_flags
  if gpu:  # JAX takes 75% of the GPU by default; the D-MMD step holds three networks
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
  env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flags}".strip()
  return env


def run_child(cmd, env, timeout: float) -> dict:
  """The last RESULT line of a child (partial results survive a timeout or a crash)."""
  try:
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=max(1.0, timeout))
    out, err, code = proc.stdout, proc.stderr, proc.returncode
  except subprocess.TimeoutExpired as e:
    out, err, code = _text(e.stdout), _text(e.stderr), "timeout"
  result = {}
  for line in out.splitlines():
    if line.startswith("RESULT ") or line.startswith("{"):
      try:
        result = json.loads(line.removeprefix("RESULT "))
      except json.JSONDecodeError:
        pass
  if code != 0:
    result["error"] = f"exit {code}: " + "\n".join(err.strip().splitlines()[-15:])[-3000:]
  return result


def _text(data) -> str:
  return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def derive(summary: dict) -> dict:
  """Ratios and goal checks from whatever parts are there."""
  train, peer = summary.get("train", {}), summary.get("torch", {})
  out = {}
  teacher, dist = train.get("teacher_step", {}), train.get("distill_step", {})
  if "mfu" in teacher:
    out["teacher_mfu"] = teacher["mfu"]
    out["teacher_mfu_goal_met"] = teacher["mfu"] >= GOALS["teacher_mfu"]
  if "mfu" in dist:
    out["distill_mfu"] = dist["mfu"]
    out["distill_mfu_goal_met"] = dist["mfu"] >= GOALS["distill_mfu"]
  if "tokens_per_s" in teacher and "tokens_per_s" in dist:
    out["distill_step_cost_vs_teacher"] = teacher["tokens_per_s"] / dist["tokens_per_s"]
  matmul = train.get("matmul_tflops")
  for mode in ("eager", "compile"):
    rate = peer.get(mode, {}).get("tokens_per_s")
    if rate and "tokens_per_s" in teacher:
      out[f"teacher_vs_torch_{mode}"] = teacher["tokens_per_s"] / rate
    if rate and matmul and "forward_tflop" in train:
      step_s = train["size"]["batch"] * train["size"]["length"] / rate
      out[f"torch_{mode}_mfu"] = 3 * train["forward_tflop"] / step_s / matmul
  if "teacher_vs_torch_compile" in out:
    out["torch_compile_goal_met"] = out["teacher_vs_torch_compile"] >= GOALS[
        "teacher_vs_torch_compile"]
  if "params" in train and "params" in peer:
    out["same_parameter_count"] = train["params"] == peer["params"]
  if "speedup_vs_teacher" in summary.get("sample", {}):
    out["student_sampling_speedup"] = summary["sample"]["speedup_vs_teacher"]
  return out


def orchestrate(args) -> dict:
  deadline = time.monotonic() + args.budget_s
  summary = {"command": " ".join([pathlib.Path(sys.executable).name, *sys.argv]),
             "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "host": platform.node(), "smoke": args.smoke, "goals": GOALS}
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)

  def save():
    summary["derived"] = derive(summary)
    out.write_text(json.dumps(summary, indent=2))

  try:
    env = ensure_wheels(args)
  except (RuntimeError, subprocess.CalledProcessError) as e:
    summary["wheels_error"] = str(e)
    env = None
  common = [f"--config={args.config}", f"--preset={args.preset}", f"--batch={args.batch}",
            f"--length={args.length}", f"--vocab={args.vocab}", f"--steps={args.steps}",
            f"--warmup={args.warmup}", f"--attention={args.attention}", f"--out={args.out}",
            f"--matmul_n={args.matmul_n}", f"--sample_batch={args.sample_batch}",
            f"--student_steps={args.student_steps}",
            "--teacher_steps=" + ",".join(map(str, args.teacher_steps))]
  common += ["--smoke"] * args.smoke + ["--profile"] * args.profile
  parts = [("train", [sys.executable, __file__, "--part=train", *common]), ("torch", None),
           ("sample", [sys.executable, __file__, "--part=sample", *common])]
  for name, cmd in parts:
    if name not in args.parts:
      continue
    remaining = deadline - time.monotonic()
    if remaining < 30:
      summary[name] = {"skipped": f"only {remaining:.0f} s of --budget_s left"}
      continue
    if name == "torch":
      size = summary.get("train", {}).get("size") or {}  # the JAX run's (batch may be halved)
      cmd = [sys.executable, str(REPO / "bench" / "torch_peer.py"), f"--steps={args.steps}",
             f"--warmup={args.warmup}", f"--matmul_n={args.matmul_n}",
             f"--batch={size.get('batch', args.batch)}", f"--length={args.length}",
             f"--vocab={args.vocab}"]
      cmd += [f"--{k}={size[k]}" for k in ("layers", "width", "heads") if k in size]
      cmd += ["--smoke"] * args.smoke
      child_env = dict(os.environ, PYTHONUNBUFFERED="1")
    elif env is None:
      summary[name] = {"skipped": "JAX dependencies missing (see wheels_error)"}
      continue
    else:
      child_env = env
    print(f"[gpu_bench] {name}: up to {remaining:.0f} s", file=sys.stderr, flush=True)
    start = time.monotonic()
    summary[name] = run_child(cmd, child_env, remaining)
    summary[name]["wall_s"] = time.monotonic() - start
    save()
  save()
  return summary


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."),
                                                    "gpu_bench.json"))
  parser.add_argument("--smoke", action="store_true", help="tiny sizes: a CPU check of the script")
  parser.add_argument("--parts", default="train,torch,sample")
  parser.add_argument("--part", default=None, help=argparse.SUPPRESS)  # child mode
  parser.add_argument("--config", default="configs/shakespeare_bpe.py")
  parser.add_argument("--preset", default="base")
  parser.add_argument("--batch", type=int, default=None)
  parser.add_argument("--length", type=int, default=None)
  parser.add_argument("--vocab", type=int, default=50257, help="GPT-2's")
  parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement")
  parser.add_argument("--warmup", type=int, default=None)
  parser.add_argument("--attention", default=None, help="xla | cudnn (default: cudnn on GPU)")
  parser.add_argument("--matmul_n", type=int, default=None)
  parser.add_argument("--sample_batch", type=int, default=None)
  parser.add_argument("--student_steps", type=int, default=None)
  parser.add_argument("--teacher_steps", default=None)
  parser.add_argument("--profile", action="store_true",
                      help="also write distill_profile.tar.gz (jax.profiler) next to --out")
  parser.add_argument("--xla_flags", default="auto",
                      help=f"added to XLA_FLAGS for JAX; auto: '{GPU_XLA_FLAGS}' on a GPU")
  parser.add_argument("--wheels", default=str(REPO / ".whl"))
  parser.add_argument("--budget_s", type=float, default=570.0,
                      help="the whole run, all parts (a device command may run 600 s)")
  args = parser.parse_args(argv)
  smoke = args.smoke
  defaults = dict(batch=4 if smoke else 32, length=32 if smoke else 1024,
                  steps=2 if smoke else 20, warmup=1 if smoke else 3,
                  matmul_n=256 if smoke else 8192, sample_batch=4 if smoke else 32,
                  student_steps=2 if smoke else 16, teacher_steps="4,8" if smoke else "256,1024")
  for key, value in defaults.items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  if smoke and args.vocab == 50257:
    args.vocab = 512
  if args.attention is None:
    args.attention = "cudnn" if shutil.which("nvidia-smi") and not smoke else "xla"
  args.teacher_steps = [int(s) for s in str(args.teacher_steps).split(",")]
  args.parts = args.parts.split(",")
  return args


def main(argv=None):
  args = parse_args(argv)
  if args.part:
    emit({"train": train_part, "sample": sample_part}[args.part](args))
    return
  summary = orchestrate(args)
  print(json.dumps(summary, indent=2))


if __name__ == "__main__":
  main()
