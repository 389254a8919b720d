"""`pgolf quantize RUN_DIR [--set k=v]`: calibrate, quantize and write RUN_DIR/model.ptz + quant.json."""

from __future__ import annotations

import argparse
import sys

from pgolf.config.cli import add_set_argument


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize a trained run directory into its artifact (model.ptz)")
    p.add_argument("run_dir", help="run directory with config.toml and model.pt")
    add_set_argument(p, "override a field of the run's config, e.g. --set quant.matrix_clip_sigmas=14 (repeatable)")
    p.set_defaults(func=_quantize)


def _quantize(args: argparse.Namespace) -> int:
    from pgolf.config import load_run_config, validate
    from pgolf.config.overrides import apply_sets
    from pgolf.quant.pipeline import OverCapError, quantize_run
    from pgolf.singlefile import bundle_code_bytes

    cfg = load_run_config(args.run_dir)
    if args.sets:
        apply_sets(cfg, args.sets)
        validate(cfg)
    try:
        quantize_run(args.run_dir, args.sets, code_bytes=bundle_code_bytes(cfg))
    except OverCapError as err:
        print(f"pgolf quantize: over the cap: {err}", file=sys.stderr)
        return 1
    return 0
