"""Micro-benchmark: one forward+backward of GPT under bf16 autocast on CPU, fused vs plain loss tail.

    python benchmarks/model_forward.py                 # 6x256, vocab 8192, 32x512 tokens, 2 threads
    python benchmarks/model_forward.py --quick         # tiny shape, seconds
    python benchmarks/model_forward.py --autocast off  # fp32 compute (CPUs without bf16 matmul units)

Prints a table: ms per fwd+bwd (median of --repeats after one warm-up), tokens/s, peak RSS growth.
"plain" is the textbook tail (full fp32 softcapped logits + F.cross_entropy); "fused" is model(ids, y) (the
row-chunked head + loss); "fused_ce" is model(ids, y) with model.fused_ce (#1855: raw logits, then the fused
softcapped cross-entropy).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
import torch.nn.functional as F

from pgolf.config import preset
from pgolf.model import GPT
from pgolf.runtime import autocast


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def time_step(
    model: GPT, ids: torch.Tensor, tgt: torch.Tensor, tail: str, repeats: int, precision: str
) -> list[float]:
    times = []
    for _ in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        with autocast(ids.device, precision):
            if tail in ("fused", "fused_ce"):
                model.cfg.fused_ce = tail == "fused_ce"
                loss = model(ids, tgt)
            else:
                logits = model(ids)
                loss = F.cross_entropy(logits.view(-1, logits.size(-1)), tgt.view(-1))
        loss.backward()
        times.append((time.perf_counter() - start) * 1000.0)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shape for a smoke check")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--looping", action="store_true", help="depth recurrence on (cpu-golf loops 2-3)")
    parser.add_argument("--autocast", choices=("bf16", "off"), default="bf16", help="train.autocast")
    parser.add_argument("--batch", type=int, default=32, help="sequences of 512 tokens")
    parser.add_argument("--tails", default="fused,fused_ce,plain", help="comma list of loss tails to time")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = preset("cpu-golf").model
    cfg.vocab_size = 8192
    batch, seq = args.batch, 512
    if args.quick:
        cfg.num_layers, cfg.model_dim, cfg.num_heads, cfg.num_kv_heads = 2, 64, 2, 1
        cfg.vocab_size, cfg.xsa_last_n, cfg.loop_start, cfg.loop_end, cfg.parallel_start = 512, 2, 0, 1, 1
        batch, seq = 4, 64
    torch.manual_seed(0)
    model = GPT(cfg)
    model.set_looping(args.looping)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    tgt = torch.randint(0, cfg.vocab_size, (batch, seq))
    tokens = batch * seq
    print(
        f"{cfg.num_layers}x{cfg.model_dim} vocab {cfg.vocab_size}, {batch}x{seq} tokens, "
        f"{args.threads} threads, looping {args.looping}, autocast {args.autocast}"
    )
    print(f"{'tail':<9}{'ms/step':>10}{'min ms':>10}{'tok/s':>10}{'RSS MB':>10}")
    for tail in args.tails.split(","):
        times = time_step(model, ids, tgt, tail, args.repeats, args.autocast)
        med = statistics.median(times)
        print(f"{tail:<9}{med:>10.0f}{min(times):>10.0f}{tokens / med * 1000:>10.0f}{peak_rss_mb():>10.0f}")


if __name__ == "__main__":
    main()
