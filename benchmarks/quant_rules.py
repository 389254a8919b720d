"""Requantize a trained run under several (bits, clip mode, method) settings: bytes, bpb and per-role errors.

    python benchmarks/quant_rules.py RUN_DIR [--val-tokens 65536] [--batches 16]

Prints one row per setting: brotli-11 artifact bytes, bpb on the first val tokens (non-overlapping windows)
and its gap to the unquantized weights, the embedding's head-Hessian-weighted relative error tr(D H Dᵀ) /
tr(W H Wᵀ), its input-role error (token-frequency-weighted Σ‖D_t‖² / Σ‖W_t‖²: what the tied embedding's
lookup sees) and the matrices' Hessian-weighted relative error. The run directory is not modified.
Results and the command that made them: docs/quantization.md.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from pgolf.config import load_run_config
from pgolf.eval.run_eval import load_eval_data, load_prequant_model
from pgolf.eval.score import eval_nonoverlap
from pgolf.model import param_role
from pgolf.quant import encode_artifact, quant_error, quantize_state_dict
from pgolf.quant.hessian import calibration_batches, collect_hessians
from pgolf.quant.scheme import dequantize_state_dict
from pgolf.runtime import init_distributed

SETTINGS = [  # (label, matrix_bits, embed_bits, method, overrides)
    ("8/8 gptq", 8, 8, "gptq", {}),
    ("8/8 rtn", 8, 8, "rtn", {}),
    ("6/8 gptq", 6, 8, "gptq", {}),
    *((f"6/6 {m} {mode}", 6, 6, m, {"clip_mode": mode}) for m in ("gptq", "rtn") for mode in ("sigma", "step", "search")),
    *((f"5/5 gptq {mode}", 5, 5, "gptq", {"clip_mode": mode}) for mode in ("sigma", "step")),
    ("6/6 gptq damp 0.1", 6, 6, "gptq", {"gptq_damp": 0.1}),
    ("6/6 gptq lqer top-3", 6, 6, "gptq", {"lqer_top_k": 3}),
]


def relative_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    return quant_error(W, W_hat, H) / max(quant_error(W, torch.zeros_like(W), H), 1e-30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--val-tokens", type=int, default=65_536)
    ap.add_argument("--batches", type=int, default=16, help="calibration batches")
    args = ap.parse_args()
    cfg = load_run_config(args.run_dir)
    cfg.data.max_val_tokens, cfg.quant.calibration_batches = args.val_tokens, args.batches
    dist = init_distributed("cpu")
    tokens, tables = load_eval_data(cfg)
    model = load_prequant_model(args.run_dir, cfg, torch.device("cpu"))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    kw = {"seq_len": cfg.eval.seq_len, "batch_seqs": cfg.eval.batch_seqs, "autocast_mode": "off"}

    def bpb(weights: dict[str, torch.Tensor]) -> float:
        m = copy.deepcopy(model)
        m.load_state_dict({k: v.to(state[k].dtype) for k, v in weights.items()})
        return eval_nonoverlap(m.eval(), tokens, tables, **kw).bpb

    pre = bpb(state)
    batches = list(calibration_batches(cfg, dist))
    H = collect_hessians(model, batches, "cpu", "off", average_across_ranks=False, looping=model.looping)
    freq = torch.bincount(tokens, minlength=cfg.model.vocab_size).double()
    mats = [n for n in state if param_role(n, state[n]) == "matrix" and n in H]
    print(f"prequant bpb {pre:.5f} on {tokens.numel():,} val tokens; {args.batches} calibration batches")
    print(f"{'setting':24s} {'bytes':>9s} {'bpb':>8s} {'gap':>8s} {'emb H-err':>10s} {'emb in-err':>10s} {'mat H-err':>10s}")
    for label, mb, eb, method, over in SETTINGS:
        q = copy.deepcopy(cfg.quant)
        q.matrix_bits, q.embed_bits, q.method = mb, eb, method
        for key, value in over.items():
            setattr(q, key, value)
        qt = quantize_state_dict(state, H, q, param_role)
        deq = dequantize_state_dict(qt)
        nbytes = len(encode_artifact(qt, "brotli", "bshf2")[0])
        W, D = state["tok_emb.weight"].float(), state["tok_emb.weight"].float() - deq["tok_emb.weight"].float()
        emb_h = relative_error(W, deq["tok_emb.weight"].float(), H["tok_emb.weight"])
        emb_in = float((freq * D.double().pow(2).sum(1)).sum() / (freq * W.double().pow(2).sum(1)).sum())
        num = sum(quant_error(state[n].float(), deq[n].float(), H[n]) for n in mats)
        den = sum(quant_error(state[n].float(), torch.zeros_like(state[n]).float(), H[n]) for n in mats)
        b = bpb(deq)
        print(f"{label:24s} {nbytes:>9,} {b:>8.5f} {b - pre:>+8.4f} {emb_h:>10.2e} {emb_in:>10.2e} {num / max(den, 1e-30):>10.2e}")


if __name__ == "__main__":
    main()
