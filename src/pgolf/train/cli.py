"""`pgolf train --preset NAME --data DIR --out RUN_DIR [--config F] [--set k=v ...] [--resume]`.

Under `torchrun --nproc_per_node=N -m pgolf.cli train ...` every rank runs this; the process group is
created by the loop (runtime.init_distributed).
"""

from __future__ import annotations

import argparse

from pgolf.cliargs import non_negative_float
from pgolf.config import load_run_config, resolve
from pgolf.config.cli import add_config_arguments
from pgolf.config.overrides import apply_sets


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model into a run directory (SPEC §3)")
    p.add_argument("--preset", help="preset name (optional with --resume: RUN_DIR/config.toml is used)")
    p.add_argument("--data", help="folder with fineweb_{train,val}_*.bin (sets data.dir)")
    p.add_argument("--out", required=True, help="run directory (created)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.pt")
    p.add_argument(
        "--fresh", action="store_true", help="discard RUN_DIR's checkpoint and outputs, start over"
    )
    p.add_argument(
        "--quant-reserve",
        type=non_negative_float,
        default=None,
        help="seconds kept from the wallclock cap for quantization (default: train.quant_reserve_seconds)",
    )
    add_config_arguments(p)
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from pgolf.train.loop import SIGNAL_EXIT, train

    sets = list(args.sets) + ([f"data.dir={args.data}"] if args.data else [])
    if args.preset:
        cfg = resolve(args.preset, args.config, sets=sets)
    elif args.resume:
        cfg = load_run_config(args.out)
        apply_sets(cfg, sets)
    else:
        raise ValueError("pgolf train: --preset is required (unless --resume continues RUN_DIR/config.toml)")
    result = train(cfg, args.out, args.resume, args.quant_reserve, fresh=args.fresh)
    return SIGNAL_EXIT.get(result["stopped_reason"], 0)
