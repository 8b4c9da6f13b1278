r"""The teacher's network and training step in plain PyTorch (MDLM-style DiT), for a peer timing.

    python bench/torch_peer.py [--smoke] [--layers=12 --width=768 --heads=12 --vocab=50257 \
        --length=1024 --batch=32] [--steps=20] [--modes=eager,compile]

Written for the benchmark from the same description as `dmmd_jax/denoiser.py` (not imported from
another project): token embedding (K + 1 inputs, the last one MASK), sinusoidal time features
through two SiLU layers, pre-norm blocks with adaLN-Zero modulation (shift/scale/gate from the time
vector), rotary positions, parameter-free LayerNorm, tanh-GELU MLP, final adaLN and a K-way output.
The step is the masked (MDLM) negative ELBO with the linear schedule — t = 1 − antithetic u,
mask each token with probability t, weight 1/t on the masked positions' cross-entropy — then
global-norm clipping at 1, AdamW (b2 = 0.99, weight decay 0.01) and an EMA of the parameters: the
work the library's teacher step does. float32 parameters, bf16 autocast. The D-MMD student's
noise projection is left out (the teacher never uses it).

Prints one JSON object: parameter count, and per mode the step time, tokens/s, peak memory and
(for torch.compile) the time of the first, compiling call.
"""

import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

SMOKE = dict(layers=2, width=64, heads=2, vocab=512, length=32, batch=4, steps=2, warmup=1)
BASE = dict(layers=12, width=768, heads=12, vocab=50257, length=1024, batch=32, steps=20,
            warmup=3)


def timestep_embedding(t, dim: int):
  """[batch] → [batch, dim]: cos and sin of 1000·t at geometric frequencies."""
  half = dim // 2
  freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
  args = 1000.0 * t.float()[:, None] * freqs[None]
  return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rotary(x, positions):
  """x [batch, heads, length, head_dim] rotated by position (computed in float32)."""
  half = x.shape[-1] // 2
  freqs = 1.0 / (10000.0 ** (torch.arange(half, device=x.device, dtype=torch.float32) / half))
  angles = positions[:, None].float() * freqs[None, :]
  sin, cos = torch.sin(angles), torch.cos(angles)
  x1, x2 = x[..., :half].float(), x[..., half:].float()
  return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def dense(fan_in, fan_out, bias=True, zero=False):
  layer = nn.Linear(fan_in, fan_out, bias=bias)
  if zero:
    nn.init.zeros_(layer.weight)
  else:
    nn.init.xavier_uniform_(layer.weight)
  if bias:
    nn.init.zeros_(layer.bias)
  return layer


def modulate(x, shift, scale):
  return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


class Block(nn.Module):
  def __init__(self, width: int, heads: int, mlp_ratio: int = 4):
    super().__init__()
    self.heads = heads
    self.adaln = dense(width, 6 * width, zero=True)
    self.qkv = dense(width, 3 * width, bias=False)
    self.attn_out = dense(width, width, bias=False)
    self.mlp_in = dense(width, mlp_ratio * width)
    self.mlp_out = dense(mlp_ratio * width, width)

  def forward(self, x, cond, positions):
    b, length, width = x.shape
    shift1, scale1, gate1, shift2, scale2, gate2 = self.adaln(cond).chunk(6, dim=-1)
    h = modulate(F.layer_norm(x, (width,), eps=1e-6), shift1, scale1)
    qkv = self.qkv(h).view(b, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
    q, k, v = rotary(qkv[0], positions), rotary(qkv[1], positions), qkv[2]
    attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, length, width)
    x = x + gate1[:, None, :] * self.attn_out(attn)
    h = modulate(F.layer_norm(x, (width,), eps=1e-6), shift2, scale2)
    h = self.mlp_out(F.gelu(self.mlp_in(h), approximate="tanh"))
    return x + gate2[:, None, :] * h


class DiT(nn.Module):
  """tokens [batch, length] in [0, vocab] (vocab is MASK), t [batch] → [batch, length, vocab]."""

  def __init__(self, vocab: int, width: int, layers: int, heads: int):
    super().__init__()
    self.width = width
    self.embed = nn.Embedding(vocab + 1, width)
    nn.init.normal_(self.embed.weight, std=1.0)
    self.time_in = dense(width, width)
    self.time_out = dense(width, width)
    self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
    self.final_adaln = dense(width, 2 * width, zero=True)
    self.logits = dense(width, vocab)

  def forward(self, tokens, t):
    x = self.embed(tokens)
    cond = F.silu(self.time_out(F.silu(self.time_in(timestep_embedding(t, self.width)))))
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    for block in self.blocks:
      x = block(x, cond, positions)
    shift, scale = self.final_adaln(cond).chunk(2, dim=-1)
    x = modulate(F.layer_norm(x, (self.width,), eps=1e-6), shift, scale)
    return self.logits(x).float()


def masked_elbo(model, x, vocab: int):
  """Mean over the batch of the masked negative ELBO (nats per sequence), linear schedule."""
  b = x.shape[0]
  u = torch.rand((), device=x.device)
  t = 1.0 - torch.remainder(u + torch.arange(b, device=x.device) / b, 1.0)  # in (0, 1]
  masked = torch.rand(x.shape, device=x.device) < t[:, None]
  z = torch.where(masked, torch.full_like(x, vocab), x)
  logits = model(z, t)
  nll = F.cross_entropy(logits.transpose(1, 2), x, reduction="none")  # [batch, length]
  return torch.mean(torch.sum(torch.where(masked, nll, 0.0), dim=-1) / t)


class Trainer:
  """One training step: loss, backward, clip at 1, AdamW, EMA (decay 0.999)."""

  def __init__(self, model, vocab: int, compile_loss: bool):
    self.model, self.vocab = model, vocab
    self.params = [p for p in model.parameters()]
    self.ema = [p.detach().clone() for p in self.params]
    fused = next(model.parameters()).is_cuda
    self.opt = torch.optim.AdamW(self.params, lr=3e-4, betas=(0.9, 0.99), weight_decay=0.01,
                                 fused=fused)
    self.loss_fn = torch.compile(masked_elbo) if compile_loss else masked_elbo
    self.device_type = "cuda" if fused else "cpu"

  def step(self, x):
    with torch.autocast(self.device_type, dtype=torch.bfloat16):
      loss = self.loss_fn(self.model, x, self.vocab)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.params, 1.0)
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    with torch.no_grad():
      torch._foreach_lerp_(self.ema, self.params, 1.0 - 0.999)
    return loss


def synchronize(device):
  if device.type == "cuda":
    torch.cuda.synchronize()


def bench_mode(size: dict, mode: str, device) -> dict:
  torch.manual_seed(0)
  model = DiT(size["vocab"], size["width"], size["layers"], size["heads"]).to(device)
  trainer = Trainer(model, size["vocab"], compile_loss=(mode == "compile"))
  x = torch.randint(0, size["vocab"], (size["batch"], size["length"]), device=device)
  if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
  start = time.perf_counter()
  loss = trainer.step(x)
  synchronize(device)
  first = time.perf_counter() - start
  for _ in range(size["warmup"] - 1):
    trainer.step(x)
  synchronize(device)
  start = time.perf_counter()
  for _ in range(size["steps"]):
    loss = trainer.step(x)
  synchronize(device)
  step_s = (time.perf_counter() - start) / size["steps"]
  out = {"step_ms": 1e3 * step_s, "tokens_per_s": size["batch"] * size["length"] / step_s,
         "first_call_s": first, "loss": float(loss.detach())}
  if device.type == "cuda":
    out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
  return out


def matmul_tflops(device, n: int, repeats: int = 10) -> float:
  a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
  b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
  for _ in range(3):
    c = a @ b
  synchronize(device)
  start = time.perf_counter()
  for _ in range(repeats):
    c = a @ b
  synchronize(device)
  del c
  return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def param_count(size: dict) -> int:
  with torch.device("meta"):
    model = DiT(size["vocab"], size["width"], size["layers"], size["heads"])
  return sum(p.numel() for p in model.parameters())


def run(size: dict, modes, matmul_n: int) -> dict:
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  if device.type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True
  result = {"torch_version": torch.__version__, "device": (
      torch.cuda.get_device_name() if device.type == "cuda" else "cpu"), "size": size,
      "params": param_count(size)}
  try:
    result["matmul_tflops"] = matmul_tflops(device, matmul_n)
  except Exception as e:  # a benchmark part that fails is reported, not fatal
    result["matmul_error"] = f"{type(e).__name__}: {e}"[:500]
  for mode in modes:
    try:
      result[mode] = bench_mode(size, mode, device)
    except Exception as e:
      result[mode] = {"error": f"{type(e).__name__}: {e}"[:500]}
    if device.type == "cuda":
      torch.cuda.empty_cache()
  return result


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--smoke", action="store_true", help="tiny sizes (CPU check)")
  for name in ("layers", "width", "heads", "vocab", "length", "batch", "steps", "warmup"):
    parser.add_argument(f"--{name}", type=int, default=None)
  parser.add_argument("--modes", default="eager,compile")
  parser.add_argument("--matmul_n", type=int, default=None)
  args = parser.parse_args(argv)
  size = dict(SMOKE if args.smoke else BASE)
  size.update({k: v for k in size if (v := getattr(args, k)) is not None})
  matmul_n = args.matmul_n or (256 if args.smoke else 8192)
  json.dump(run(size, args.modes.split(","), matmul_n), sys.stdout)
  print()


if __name__ == "__main__":
  main()
