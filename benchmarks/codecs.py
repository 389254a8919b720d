"""The codec table per code group on a trained run's quantized codes (issue 14.3 / SPEC-1855 §5).

    python benchmarks/codecs.py RUN_DIR [--matrix-bits 6 --embed-bits 8 --calibration-batches 8 --rtn]

Quantizes RUN_DIR/model.pt (read only; GPTQ with Hessians from the run's training shards unless --rtn)
and prints one row per group of the per-group artifact: raw bytes, the order-0 entropy bound n·H/8 of the
stored stream, every codec's bytes, the chosen codec, its ratio to the bound, brotli-11 on the same stream
and whether the rows were reordered; then the artifact totals against the version-1 brotli container
(byte shuffle + brotli-11 per class) and the goal: the artifact <= 1.03 x (the bound of every stream +
headers and the permutation stream).
"""

from __future__ import annotations

import argparse
import time

import torch

from pgolf.config import load_run_config
from pgolf.quant.artifact import DEFAULT_REORDER, encode_artifact, encode_pergroup
from pgolf.quant.codecs import CODECS
from pgolf.quant.hessian import collect_run_hessians
from pgolf.quant.pipeline import load_trained_model
from pgolf.quant.scheme import quantize_state_dict
from pgolf.runtime import dist_info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--matrix-bits", type=int, default=None)
    ap.add_argument("--embed-bits", type=int, default=None)
    ap.add_argument("--calibration-batches", type=int, default=8)
    ap.add_argument("--rtn", action="store_true", help="round to nearest, no calibration")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = load_run_config(args.run_dir)
    q = cfg.quant
    q.matrix_bits = args.matrix_bits or q.matrix_bits
    q.embed_bits = args.embed_bits or q.embed_bits
    q.calibration_batches = 0 if args.rtn else args.calibration_batches
    q.method = "rtn" if args.rtn else q.method
    model = load_trained_model(args.run_dir, cfg)
    hessians, h_s = collect_run_hessians(model, cfg, dist_info())
    t0 = time.perf_counter()
    qts = quantize_state_dict(model.state_dict(), hessians, q, None)
    q_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    blob, sizes, report = encode_pergroup(qts, {}, list(CODECS), DEFAULT_REORDER)
    enc_s = time.perf_counter() - t0
    v1, _ = encode_artifact(qts, "brotli", "bshf2")
    params = sum(p.numel() for p in model.parameters())
    print(
        f"run {args.run_dir}: {params:,} parameters, matrices int{q.matrix_bits}, embedding int{q.embed_bits}, "
        f"{q.method} ({len(hessians)} Hessians, {h_s:.1f} s; quantize {q_s:.1f} s; per-group encode {enc_s:.1f} s)"
    )
    names = list(CODECS)
    head = f"{'group':10s} {'raw':>8s} {'bound':>8s} " + " ".join(f"{n:>8s}" for n in names)
    print(head + f" {'chosen':>9s} {'ratio':>6s} {'vs br11':>7s} reord")
    bound_total = 0.0
    for g, r in report.items():
        bound = r["entropy_bound"]
        bound_total += bound if g != "perms" else r["bytes"]  # a uniform permutation is its own bound
        cells = " ".join(f"{r['codecs'].get(n, 0):8,d}" for n in names)
        ratio = r["bytes"] / bound if bound else float("nan")
        print(
            f"{g:10s} {r['raw']:8,d} {bound:8,.0f} {cells} {r['codec']:>9s} {ratio:6.3f} "
            f"{r['bytes'] / r['brotli11']:7.3f} {'yes' if r['reordered'] else 'no'}"
        )
    header = sizes["header"]
    print(
        f"artifact {len(blob):,} B (header frame + tables {header:,} B) | version-1 bshf2+brotli-11 "
        f"{len(v1):,} B ({len(blob) / len(v1):.3f}x) | bound of the streams {bound_total:,.0f} B + header "
        f"{header:,} B: ratio {len(blob) / (bound_total + header):.4f} (goal <= 1.03)"
    )


if __name__ == "__main__":
    main()
