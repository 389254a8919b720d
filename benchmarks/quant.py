"""Quantization benchmark: the quality/size of a trained run's artifact, and GPTQ speed at full pr1541 size.

    python benchmarks/quant.py RUN_DIR            # pre/post-quant bpb, gap, bytes, bits/weight, seconds
    python benchmarks/quant.py                    # only the full-size pr1541 GPTQ timing (2 threads)
    python benchmarks/quant.py RUN_DIR --quick    # small val slice and a 1/4-scale synthetic model

The run directory is not modified: config.toml, model.pt and train.json are copied to a temp folder and
quantized there. The synthetic model has the pr1541 shapes (11 blocks of c_q/c_k/c_v/proj/fc/mlp.proj,
8192x512 tied embedding), heavy-tailed weights and Hessians from random correlated activations.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from pgolf.config import load_run_config
from pgolf.config.schema import QuantConfig
from pgolf.quant import encode_artifact, quantize_state_dict


def pr1541_shapes(scale: int = 1, layers: int = 11) -> dict[str, tuple[int, int]]:
    d, kv, hidden, vocab = 512 // scale, 256 // scale, 2048 // scale, 8192 // scale
    shapes = {}
    for i in range(layers):
        for name, shape in {
            "attn.c_q": (d, d),
            "attn.c_k": (kv, d),
            "attn.c_v": (kv, d),
            "attn.proj": (d, d),
            "mlp.fc": (hidden, d),
            "mlp.proj": (d, hidden),
        }.items():
            shapes[f"blocks.{i}.{name}.weight"] = shape
    shapes["tok_emb.weight"] = (vocab, d)
    return shapes


def synthetic_model(scale: int, layers: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Orthogonal-ish heavy-tailed weights; per tensor H = D·H_base·D (H_base from correlated activations)."""
    torch.manual_seed(0)
    shapes = pr1541_shapes(scale, layers)
    base: dict[int, torch.Tensor] = {}
    for cols in sorted({c for _, c in shapes.values()}):
        mix = torch.randn(cols, cols) / cols**0.5
        X = torch.randn(cols + 512, cols) @ mix + 0.3 * torch.randn(cols + 512, cols)
        base[cols] = X.T @ X / X.shape[0]
    state, hessians = {}, {}
    student = torch.distributions.StudentT(4.0)
    for name, (rows, cols) in shapes.items():
        W = student.sample((rows, cols)) * (0.005 if name.startswith("tok_emb") else 0.02)
        state[name] = W.to(torch.bfloat16) if name.startswith("tok_emb") else W
        D = torch.rand(cols) + 0.5
        hessians[name] = base[cols] * D[:, None] * D[None, :]
    return state, hessians


def role(name: str, t: torch.Tensor) -> str:
    return "embed" if name == "tok_emb.weight" else "matrix"


def time_synthetic(scale: int, layers: int, compress: bool) -> None:
    state, hessians = synthetic_model(scale, layers)
    params = sum(t.numel() for t in state.values())
    wall, cpu = time.perf_counter(), time.process_time()
    qt = quantize_state_dict(state, hessians, QuantConfig(), role)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    label = "pr1541 full size" if scale == 1 else f"pr1541 at 1/{scale} scale, {layers} blocks"
    print(f"\nGPTQ on {label}: {len(state)} tensors, {params:,} weights, {torch.get_num_threads()} threads")
    print(f"  GPTQ (scales + quantization) wall {wall:8.1f} s   cpu {cpu:8.1f} s")
    if compress:
        t0 = time.perf_counter()
        blob, sizes = encode_artifact(qt, "brotli", "bshf2")
        dt = time.perf_counter() - t0
        print(f"  brotli-11 artifact {len(blob):,} B in {dt:.1f} s; per class {sizes}")


def run_dir_report(run_dir: Path, quick: bool) -> None:
    from pgolf.eval.run_eval import load_eval_data, load_prequant_model, load_quant_model
    from pgolf.eval.score import eval_nonoverlap
    from pgolf.quant import quantize_run
    from pgolf.singlefile import bundle_code_bytes

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in ("config.toml", "model.pt", "train.json"):
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, work / name)
        cfg = load_run_config(work)
        report = quantize_run(work, verbose=False, code_bytes=bundle_code_bytes(cfg))
        if quick:
            cfg.data.max_val_tokens = 16 * cfg.eval.seq_len
        tokens, tables = load_eval_data(cfg)
        kw = {
            "seq_len": cfg.eval.seq_len,
            "batch_seqs": cfg.eval.batch_seqs,
            "autocast_mode": cfg.train.autocast,
        }
        device = torch.device("cpu")
        pre = eval_nonoverlap(load_prequant_model(work, cfg, device), tokens, tables, **kw)
        post = eval_nonoverlap(load_quant_model(work, cfg, device), tokens, tables, **kw)
    print(f"\nrun {run_dir} ({tokens.numel():,} val tokens)")
    print(f"  pre-quant bpb   {pre.bpb:.5f}")
    print(f"  post-quant bpb  {post.bpb:.5f}")
    print(f"  gap             {post.bpb - pre.bpb:+.5f}")
    print(
        f"  artifact bytes  {report['artifact_bytes']:,} (+ code {report['code_bytes']:,} = {report['total_bytes']:,}, cap {report['cap_bytes']:,})"
    )
    print(f"  {'class':8s} {'params':>12s} {'bits':>4s} {'bytes':>11s} {'bits/weight':>11s}")
    for cls, row in report["classes"].items():
        print(
            f"  {cls:8s} {row['params']:>12,} {row['bits']:>4d} {row['bytes']:>11,} {row['bits_per_weight']:>11.3f}"
        )
    print(
        f"  hessian {report['hessian_seconds']:.1f} s, gptq {report['gptq_seconds']:.1f} s, compress {report['compress_seconds']:.1f} s"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", nargs="?", help="trained run directory (config.toml + model.pt)")
    ap.add_argument("--quick", action="store_true", help="small val slice; 1/4-scale 3-block synthetic model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-synthetic", action="store_true", help="skip the synthetic pr1541 GPTQ timing")
    ap.add_argument("--compress", action="store_true", help="also time brotli-11 on the synthetic artifact")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (timings share the machine)")
    if args.run_dir:
        run_dir_report(Path(args.run_dir), args.quick)
    if not args.no_synthetic:
        scale, layers = (4, 3) if args.quick else (1, 11)
        time_synthetic(scale, layers, args.compress or args.quick)


if __name__ == "__main__":
    main()
