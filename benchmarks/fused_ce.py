"""Fused softcapped cross-entropy (#1855, SPEC-1855 §3) vs the eager path on raw logits [N, V], CPU.

    python benchmarks/fused_ce.py                  # N = 32x512 rows, V = 8192, bf16 logits, 2 threads
    python benchmarks/fused_ce.py --quick          # small shape, seconds
    python benchmarks/fused_ce.py --dtype fp32

"eager" is softcap·tanh(z/softcap) in fp32 + F.cross_entropy; "fused" is
pgolf.model.loss.softcapped_cross_entropy. Both run forward + backward to the logits' gradient.
ms: median of --repeats, the variants alternating in this process. Peak MB: growth of the peak RSS of a
fresh child process per variant over its inputs (one fwd+bwd, nothing else allocated).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from pgolf.model.loss import softcapped_cross_entropy

SOFTCAP = 30.0
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def eager(z: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(SOFTCAP * torch.tanh(z.float() / SOFTCAP), tgt)


VARIANTS = {"eager": eager, "fused": lambda z, tgt: softcapped_cross_entropy(z, tgt, SOFTCAP)}


def inputs(rows: int, vocab: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    z = torch.empty(rows, vocab, dtype=dtype)
    for a in range(0, rows, 256):  # filled in slices: no full-size temporary raises the baseline peak
        z[a : a + 256] = 4 * torch.randn(min(256, rows - a), vocab, generator=gen)
    return z.requires_grad_(), torch.randint(0, vocab, (rows,), generator=gen)


def step(variant: str, z: torch.Tensor, tgt: torch.Tensor) -> float:
    z.grad = None
    start = time.perf_counter()
    VARIANTS[variant](z, tgt).backward()
    return (time.perf_counter() - start) * 1000.0


def child(variant: str, rows: int, vocab: int, dtype: str) -> None:
    z, tgt = inputs(rows, vocab, DTYPES[dtype])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step(variant, z, tgt)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(json.dumps({"peak_mb": grown / 1024.0}))


def peak_mb(variant: str, args: argparse.Namespace) -> float:
    cmd = [sys.executable, __file__, "--child", variant, "--rows", str(args.rows), "--vocab", str(args.vocab),
           "--dtype", args.dtype, "--threads", str(args.threads)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32 * 512)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.rows, args.vocab, args.repeats = 512, 1024, 3
    if args.child:
        child(args.child, args.rows, args.vocab, args.dtype)
        return
    # Children first: a child's peak RSS starts at its parent's at fork time, so the parent stays small.
    peaks = {name: peak_mb(name, args) for name in VARIANTS}
    z, tgt = inputs(args.rows, args.vocab, DTYPES[args.dtype])
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for name in VARIANTS:  # warm-up
        step(name, z, tgt)
    for _ in range(args.repeats):
        for name in VARIANTS:
            times[name].append(step(name, z, tgt))
    print(f"logits {args.rows}x{args.vocab} {args.dtype}, softcap {SOFTCAP}, {args.threads} threads, fwd+bwd")
    print(f"{'variant':<8}{'ms':>10}{'min ms':>10}{'peak MB':>10}")
    rows = {}
    for name in VARIANTS:
        med, peak = statistics.median(times[name]), peaks[name]
        rows[name] = (med, peak)
        print(f"{name:<8}{med:>10.1f}{min(times[name]):>10.1f}{peak:>10.1f}")
    (em, ep), (fm, fp) = rows["eager"], rows["fused"]
    best = min(times["fused"]) / min(times["eager"])
    print(f"fused/eager: time {fm / em:.2f}x (median), {best:.2f}x (min); peak memory {fp / max(ep, 1e-9):.2f}x")


if __name__ == "__main__":
    main()
