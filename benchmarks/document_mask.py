"""Step-time overhead of document masking against plain causal attention (not a test).

Forward + backward + AdamW step of zeroforge's GPT-2 on the same window, with plain causal
attention (SDPA's causal fast path) and with packed documents (``segment_ids``: block-diagonal
causal attention, positions restarting per document; on CPU SDPA with a dense boolean mask,
on CUDA FlexAttention's block mask). Repetitions are interleaved after warmup; medians reported.

    python benchmarks/document_mask.py [--configs tiny small] [--seq 256 512] [--batch 8]
        [--vocab 50257]     # a small vocabulary leaves the blocks, where attention is, to time
    python benchmarks/document_mask.py --device cuda --dtype bf16 --configs gpt2 --seq 1024
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from zeroforge.model import GPT2, GPT2Config

CONFIGS = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128),
    "small": dict(n_layer=6, n_head=6, n_embd=384),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
}


def segments(batch: int, seq: int, mean_doc: int, gen: torch.Generator) -> torch.Tensor:
    """(B, T) document ids: documents of random lengths around ``mean_doc``."""
    rows = []
    for _ in range(batch):
        ids, k = [], 0
        while len(ids) < seq:
            n = int(torch.randint(max(1, mean_doc // 4), 2 * mean_doc, (1,), generator=gen))
            ids += [k] * n
            k += 1
        rows.append(ids[:seq])
    return torch.tensor(rows)


def step_fn(model, opt, x, y, seg):
    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(x, y, segment_ids=seg)
        loss.backward()
        opt.step()
    return step


def timed(fn, device) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", default=["tiny", "small"], choices=sorted(CONFIGS))
    p.add_argument("--seq", nargs="+", type=int, default=[256, 512])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--mean-doc", type=int, default=64, help="mean document length")
    p.add_argument("--vocab", type=int, default=50257,
                   help="vocabulary size (GPT-2's by default; its LM head dominates a small "
                        "model's step)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    print("| config | vocab | seq | causal ms/step | document mask ms/step | overhead |")
    print("|---|---|---|---|---|---|")
    for name in args.configs:
        for seq in args.seq:
            cfg = GPT2Config(**CONFIGS[name], n_positions=max(seq, 1024), vocab_size=args.vocab,
                             eos_token_id=args.vocab - 1)
            model = GPT2(cfg).to(args.device)
            if args.dtype == "bf16":
                model = model.to(torch.bfloat16)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            gen = torch.Generator().manual_seed(1)
            x = torch.randint(0, cfg.vocab_size, (args.batch, seq), generator=gen)
            y = torch.randint(0, cfg.vocab_size, (args.batch, seq), generator=gen)
            seg = segments(args.batch, seq, args.mean_doc, gen)
            x, y, seg = x.to(args.device), y.to(args.device), seg.to(args.device)
            plain, docs = step_fn(model, opt, x, y, None), step_fn(model, opt, x, y, seg)
            for _ in range(args.warmup):
                plain()
                docs()
            a, b = [], []
            for _ in range(args.reps):  # interleaved: drift hits both alike
                a.append(timed(plain, args.device))
                b.append(timed(docs, args.device))
            ta, tb = statistics.median(a), statistics.median(b)
            print(f"| {name} | {args.vocab} | {seq} | {ta * 1e3:.1f} | {tb * 1e3:.1f} | "
                  f"{tb / ta:.2f}x |")


if __name__ == "__main__":
    main()
