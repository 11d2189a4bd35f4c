"""Training-step throughput of zeroforge's GPT-2 vs. a plain PyTorch GPT-2 (not a test).

Measures forward + backward + AdamW step tokens/s for the same config and batch, with
interleaved repetitions after warmup, and prints a table with the ours/plain ratio.

CPU (default):      python benchmarks/model_step.py
GPU (bf16, MFU):    python benchmarks/model_step.py --device cuda --dtype bf16 --compile \
                        --configs gpt2 --seq 1024 --batch 8
"""

from __future__ import annotations

import argparse
import contextlib
import math
import platform
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from zeroforge.model import GPT2, GPT2Config, gpt2_flops_per_token, mfu

CONFIGS = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128),
    "small": dict(n_layer=6, n_head=6, n_embd=384),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
}


# ----------------------------------------------------------------------------- plain baseline
class PlainBlock(nn.Module):
    """Textbook GPT-2 block: explicit attention matrix, masked softmax, nn.Linear/LayerNorm."""

    def __init__(self, d: int, n_head: int, max_len: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.register_buffer("mask", torch.tril(torch.ones(max_len, max_len, dtype=torch.bool)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        hs = C // self.n_head
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)  # (B, nh, T, T)
        att = att.masked_fill(~self.mask[:T, :T], float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class PlainGPT2(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.blocks = nn.ModuleList(
            [PlainBlock(cfg.n_embd, cfg.n_head, cfg.n_positions) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for b in self.blocks:
            x = b(x)
        logits = self.head(self.ln_f(x)).float()
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


# ----------------------------------------------------------------------------- timing
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_steps(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
              steps: int, device: str, dtype: torch.dtype) -> float:
    """Run ``steps`` optimizer steps; return elapsed seconds."""
    ctx = (torch.autocast(device_type=device, dtype=dtype) if dtype != torch.float32
           else contextlib.nullcontext())
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        with ctx:
            loss = model(x, targets=y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--compile", action="store_true", help="torch.compile both models")
    ap.add_argument("--configs", default="tiny,small", help=f"comma list of {list(CONFIGS)}")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per repetition")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--pad-vocab", type=int, default=1, help="ours only, e.g. 128")
    args = ap.parse_args()

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    dev_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor()
    print(f"device={args.device} ({dev_name or 'cpu'}), threads={torch.get_num_threads()}, "
          f"dtype={args.dtype}, compile={args.compile}, torch={torch.__version__}")
    print(f"seq={args.seq} batch={args.batch} steps/rep={args.steps} reps={args.reps} "
          f"warmup={args.warmup}")
    header = f"{'config':<8} {'params':>8} {'ours tok/s':>11} {'plain tok/s':>12} {'ratio':>6}"
    if args.device == "cuda":
        header += f" {'ours MFU':>9} {'plain MFU':>9}"
    rows = [header]
    for name in args.configs.split(","):
        cfg = GPT2Config(**CONFIGS[name], n_positions=max(args.seq, 256))
        torch.manual_seed(0)
        ours = GPT2(GPT2Config.from_dict({**cfg.to_dict(),
                                          "pad_vocab_to_multiple": args.pad_vocab}))
        plain = PlainGPT2(cfg)
        models = {"ours": ours.to(args.device), "plain": plain.to(args.device)}
        opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=args.device == "cuda")
                for k, m in models.items()}
        if args.compile:
            models = {k: torch.compile(m) for k, m in models.items()}
        x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=args.device)
        y = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=args.device)
        for k in models:
            run_steps(models[k], opts[k], x, y, args.warmup, args.device, dtype)
        times: dict[str, list[float]] = {k: [] for k in models}
        for _ in range(args.reps):  # interleaved so drift affects both equally
            for k in models:
                times[k].append(run_steps(models[k], opts[k], x, y, args.steps, args.device,
                                          dtype))
        tokens = args.batch * args.seq * args.steps
        tps = {k: tokens / statistics.median(v) for k, v in times.items()}
        row = (f"{name:<8} {ours.num_params() / 1e6:>7.1f}M {tps['ours']:>11.0f} "
               f"{tps['plain']:>12.0f} {tps['ours'] / tps['plain']:>6.2f}")
        if args.device == "cuda":
            fpt = gpt2_flops_per_token(cfg, args.seq)
            m_o, m_p = mfu(tps["ours"], fpt, device_name=dev_name), mfu(tps["plain"], fpt,
                                                                        device_name=dev_name)
            row += f" {m_o or float('nan'):>9.1%} {m_p or float('nan'):>9.1%}"
        rows.append(row)
        print(rows[-1], flush=True)
    print("\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
