"""Training-step throughput: tokens/s, ms/step, MFU and peak RSS of pgolf's training step.

Rows (each in a fresh process, so peak RSS is per row):
  ref-unlooped / ref-looped  SPEC §11 reference shape: #1394 recipe at sp8192, 6×256 (4H/2KV, MLP 4×),
                             seq 512, 16,384 tokens/step (the #1394 script ran 3,990 / 2,910 tok/s eager)
  cpu-golf-unlooped / -looped  the cpu-golf preset
  pr1541-fwdbwd-unlooped / -looped  the full pr1541 model, forward+backward of 1×2048 tokens (no optimizer)

A step is exactly the loop's: micro-steps of forward/backward (TrainStep, autocast), global grad clip,
Muon + AdamW step, zero_grad, EMA update. Tokens are random (the loader costs ~nothing).
MFU = tokens/s × training FLOPs/token ÷ the matmul peak measured here (bf16 at 2048², or fp32 with
--autocast off); FLOPs/token = 6·(Σ over virtual layers of block matmul params + vocab·d) + 6·passes·d·T.

  python benchmarks/train_throughput.py [--threads 2] [--autocast off] [--ns-dtype fp32] [--compile]
                                        [--grad-accum 8] [--quick] [--rows cpu-golf-unlooped]
                                        [--ab model.smear_gate=true] [--repeat 3]
--ab KEY=VALUE: each chosen row twice, as is and with the switch, alternated --repeat times in fresh
processes (A B A B ...), so a switch's step-time cost is a ratio measured side by side.
--quick: tiny batches and a 512² peak, to check the script runs (numbers then mean little).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time
from dataclasses import dataclass, replace

RECORD_1394_EAGER = {False: 3990.0, True: 2910.0}  # SPEC §11: #1394 script, eager, tokens/s


@dataclass
class Row:
    name: str
    preset: str
    looping: bool
    tokens_per_step: int
    seq_len: int
    grad_accum: int
    fwd_bwd_only: bool = False
    reference_shape: bool = False
    sets: tuple[str, ...] = ()


def build_cfg(row: Row):
    from pgolf.config import preset
    from pgolf.config.overrides import apply_sets

    cfg = preset(row.preset)
    if row.reference_shape:
        m = cfg.model
        m.vocab_size, m.num_layers, m.model_dim, m.num_heads, m.num_kv_heads = 8192, 6, 256, 4, 2
        m.xsa_last_n = 6  # XSA_LAST_N=11 covers every layer of a 6-layer model
    cfg.data.train_seq_len = row.seq_len
    cfg.data.train_batch_tokens = row.tokens_per_step
    apply_sets(cfg, list(row.sets))
    return cfg


def flops_per_token(model, seq_len: int) -> float:
    """6·(Σ_virtual block matmul params + V·d) + 6·passes·d·T (SPEC §11)."""
    from pgolf.model import recurrence_indices

    cfg = model.cfg
    enc, dec = recurrence_indices(cfg, model.looping)
    virtual = enc + dec
    per_block = [
        sum(p.numel() for n, p in blk.named_parameters() if p.dim() == 2 and n.endswith("weight"))
        for blk in model.blocks
    ]
    block_params = sum(per_block[i] for i in virtual)
    return (
        6.0 * (block_params + cfg.vocab_size * cfg.model_dim) + 6.0 * len(virtual) * cfg.model_dim * seq_len
    )


def matmul_peak(n: int, dtype_name: str, threads: int, seconds: float = 2.0) -> float:
    import torch

    if threads:
        torch.set_num_threads(threads)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or count < 2:
        a @ b
        count += 1
    return 2.0 * n**3 * count / (time.perf_counter() - t0)


def run_row(
    row: Row, threads: int, autocast: str, ns_dtype: str, compile_model: bool, warmup: int, steps: int
) -> dict:
    import torch

    from pgolf.model import GPT
    from pgolf.optim import build_optimizers
    from pgolf.runtime import DistInfo, keep_freed_memory, resolve_precision
    from pgolf.train import EMA, TrainStep

    keep_freed_memory()  # as the pgolf command does
    if threads:
        torch.set_num_threads(threads)
    cfg = build_cfg(row)
    cfg.optim.muon_ns_dtype = ns_dtype
    torch.manual_seed(0)
    raw = GPT(cfg.model)
    autocast = resolve_precision(autocast, torch.device("cpu"))
    if autocast == "off":
        raw.tok_emb.float()
    raw.set_looping(row.looping)
    dist = DistInfo(0, 1, 0, torch.device("cpu"))
    opts = build_optimizers(raw, cfg.optim, dist)
    ema = EMA(raw, cfg.optim.ema_decay)
    model = torch.compile(raw, dynamic=False) if compile_model else raw
    stepper = TrainStep(model, list(raw.parameters()), dist.device, autocast, cfg.optim.grad_clip_norm)
    micro = row.tokens_per_step // (row.grad_accum * row.seq_len)
    gen = torch.Generator().manual_seed(1)

    def batches():
        out = []
        for _ in range(row.grad_accum):
            toks = torch.randint(0, cfg.model.vocab_size, (micro, row.seq_len + 1), generator=gen)
            out.append((toks[:, :-1], toks[:, 1:]))
        return out

    def one_step():
        stepper.run(batches())
        if not row.fwd_bwd_only:
            opts.step()
            ema.update(raw, 1.0)
        opts.zero_grad()

    for _ in range(warmup):
        one_step()
    t0 = time.perf_counter()
    for _ in range(steps):
        one_step()
    sec = (time.perf_counter() - t0) / steps
    tps = row.tokens_per_step / sec
    return {
        "ms_per_step": sec * 1000,
        "tokens_per_s": tps,
        "flops_per_token": flops_per_token(raw, row.seq_len),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "params": sum(p.numel() for p in raw.parameters()),
    }


def in_fresh_process(fn, *args):
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--autocast", choices=("auto", "bf16", "off"), default="auto", help="auto: bf16 only where it is fast")
    ap.add_argument(
        "--ns-dtype",
        choices=("bf16", "fp32"),
        help="Newton–Schulz dtype (default: bf16 with autocast, else fp32)",
    )
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (CPU inductor)")
    ap.add_argument(
        "--grad-accum", type=int, default=1, help="micro-steps per step (the records' CPU runs: 8)"
    )
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny batches and peak size: checks the script runs")
    ap.add_argument("--rows", default="", help="comma-separated row names (default: all)")
    ap.add_argument("--ab", action="append", default=[], metavar="KEY=VALUE", help="the B side's config switch")
    ap.add_argument("--repeat", type=int, default=1, help="with --ab: A/B pairs per row")
    args = ap.parse_args()

    tokens, pr_tokens, peak_n, steps, warmup = 16_384, 2048, 2048, args.steps, args.warmup
    if args.quick:
        tokens, pr_tokens, peak_n, steps, warmup = 1024, 256, 512, 1, 1
    ga = args.grad_accum
    rows = [
        Row("ref-unlooped", "pr1394", False, tokens, 512, ga, reference_shape=True),
        Row("ref-looped", "pr1394", True, tokens, 512, ga, reference_shape=True),
        Row("cpu-golf-unlooped", "cpu-golf", False, tokens, 512, ga),
        Row("cpu-golf-looped", "cpu-golf", True, tokens, 512, ga),
        Row("pr1541-fwdbwd-unlooped", "pr1541", False, pr_tokens, pr_tokens, 1, fwd_bwd_only=True),
        Row("pr1541-fwdbwd-looped", "pr1541", True, pr_tokens, pr_tokens, 1, fwd_bwd_only=True),
    ]
    if args.rows:
        rows = [r for r in rows if r.name in args.rows.split(",")]
    if args.ab:  # "<row> B": the row with the --ab switches (named in the header)
        rows = [
            r2 for r in rows for _ in range(args.repeat) for r2 in (r, replace(r, name=f"{r.name} B", sets=tuple(args.ab)))
        ]
    import torch

    from pgolf.runtime import resolve_precision

    # MFU is against the peak of the precision the step really runs in (bf16 only where it is fast)
    dtype = "bf16" if resolve_precision(args.autocast, torch.device("cpu")) == "bf16" else "fp32"
    ns_dtype = args.ns_dtype or dtype
    peak = in_fresh_process(matmul_peak, peak_n, dtype, args.threads, 0.5 if args.quick else 3.0)
    print(
        f"# {dtype} matmul peak at {peak_n}²: {peak / 1e12:.3f} TFLOP/s (threads={args.threads or 'default'})"
    )
    print(
        f"# autocast={args.autocast} ns_dtype={ns_dtype} compile={args.compile} grad_accum={ga} steps={steps} warmup={warmup}"
    )
    if args.ab:
        print(f"# B rows: {' '.join(args.ab)}")
    header = f"{'row':24s} {'params':>11s} {'tok/step':>8s} {'ms/step':>9s} {'tok/s':>9s} {'MFU':>6s} {'vs#1394':>7s} {'RSS GB':>7s}"
    print(header)
    print("-" * len(header))
    for row in rows:
        res = in_fresh_process(
            run_row, row, args.threads, args.autocast, ns_dtype, args.compile, warmup, steps
        )
        mfu = res["tokens_per_s"] * res["flops_per_token"] / peak
        ratio = f"{res['tokens_per_s'] / RECORD_1394_EAGER[row.looping]:.2f}x" if row.reference_shape else "-"
        print(
            f"{row.name:24s} {res['params']:11,d} {row.tokens_per_step:8d} {res['ms_per_step']:9.1f} "
            f"{res['tokens_per_s']:9.0f} {mfu:6.1%} {ratio:>7s} {res['peak_rss_gb']:7.2f}"
        )


if __name__ == "__main__":
    main()
