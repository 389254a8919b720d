"""`pgolf quantize RUN_DIR [--set k=v] [--explain]`: calibrate, quantize and write RUN_DIR/model.ptz +
quant.json; --explain prints the rule each tensor matched (bits, clip, method) and quantizes nothing."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pgolf.config.cli import add_set_argument


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize a trained run directory into its artifact (model.ptz)")
    p.add_argument("run_dir", help="run directory with config.toml and model.pt")
    add_set_argument(p, "override a field of the run's config, e.g. --set quant.matrix_clip_sigmas=14 (repeatable)")
    p.add_argument(
        "--explain",
        action="store_true",
        help="print, for each tensor, the quantization rule that matched and its bits / clip; quantize nothing",
    )
    p.set_defaults(func=_quantize)


def _run_config(run_dir: str, sets: list[str] | None):
    from pgolf.config import load_run_config, validate
    from pgolf.config.overrides import apply_sets

    cfg = load_run_config(Path(run_dir))
    if sets:
        apply_sets(cfg, sets)
        validate(cfg)
    return cfg


def explain_lines(state, qcfg) -> list[str]:
    """One line per state_dict entry: name, shape, class, rule, method, bits, clip k and its step in σ."""
    from pgolf.model import param_role
    from pgolf.quant.rules import CLIP_SEARCH_FACTORS, qmax_of
    from pgolf.quant.scheme import plan_tensors

    rows = [("tensor", "shape", "class", "rule", "method", "bits", "clip k", "step σ", "lqer")]
    for p in plan_tensors(state, qcfg, param_role):
        rule = p.rule
        assert rule is not None
        clip = step = "-"
        if p.scheme.startswith("int") and rule.method == "int8-row":
            clip = "absmax"
        elif p.scheme.startswith("int") and qcfg.clip_percentile > 0:
            clip = f"p{qcfg.clip_percentile:g}"
        elif p.scheme.startswith("int"):
            clip, step = f"{p.clip_sigmas:.4g}", f"{p.clip_sigmas / qmax_of(p.bits):.4f}"
            if rule.clip_search:
                clip += f" x[{CLIP_SEARCH_FACTORS[0]:g}..{CLIP_SEARCH_FACTORS[-1]:g}]"
            if p.hessian_clip and qcfg.hessian_clip_lambda:
                clip += f" (hessian λ={qcfg.hessian_clip_lambda:g})"
        lqer = "candidate" if rule.lqer and p.scheme.startswith("int") else "-"
        shape = "x".join(map(str, state[p.name].shape)) or "scalar"
        rows.append((p.name, shape, p.cls, rule.describe(), rule.method, str(p.bits), clip, step, lqer))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _explain(args: argparse.Namespace) -> int:
    import torch

    cfg = _run_config(args.run_dir, args.sets)
    weights = Path(args.run_dir) / "model.pt"
    if weights.is_file():
        state = torch.load(weights, map_location="cpu", weights_only=True)
    else:  # the shapes are the config's: explain a plan before training
        from pgolf.model import GPT

        state = GPT(cfg.model).state_dict()
    for line in explain_lines(state, cfg.quant):
        print(line)
    if cfg.quant.lqer_top_k:
        print(f"lqer: the {cfg.quant.lqer_top_k} candidates with the largest ‖W − Q·s‖_F get a rank-"
              f"{cfg.quant.lqer_rank} correction (chosen at quantization)")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from pgolf.quant.pipeline import OverCapError, quantize_run
    from pgolf.singlefile import bundle_code_bytes

    if args.explain:
        return _explain(args)
    code = bundle_code_bytes(_run_config(args.run_dir, args.sets))
    try:
        quantize_run(args.run_dir, args.sets, code_bytes=code)
    except OverCapError as err:
        print(f"pgolf quantize: over the cap: {err}", file=sys.stderr)
        return 1
    return 0
