"""`pgolf eval RUN_DIR` (the eval plan into eval.json) and `pgolf check RUN_DIR` (legality checks)."""

from __future__ import annotations

import argparse

from pgolf.cliargs import non_negative_float
from pgolf.config.cli import add_set_argument
from pgolf.eval.modes import EVAL_MODES

MODE_FLAGS = EVAL_MODES


def _add_sets(parser: argparse.ArgumentParser) -> None:
    add_set_argument(
        parser, "override a field of the run's config.toml, e.g. --set eval.stride=256 (repeatable)"
    )


def register(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="evaluate a run directory (writes RUN_DIR/eval.json)")
    ev.add_argument("run_dir")
    for mode in MODE_FLAGS:
        ev.add_argument(f"--{mode}", action="store_true", help=f"run the '{mode}' mode")
    ev.add_argument("--budget", type=non_negative_float, default=None, help="eval time budget in seconds (0 = none)")
    _add_sets(ev)
    ev.set_defaults(func=_eval)

    ck = sub.add_parser("check", help="behavioural legality checks (C1-C4) of the run's eval modes")
    ck.add_argument("run_dir")
    _add_sets(ck)
    ck.set_defaults(func=_check)


def _eval(args: argparse.Namespace) -> int:
    from pgolf.eval.run_eval import evaluate_run

    modes = [m for m in MODE_FLAGS if getattr(args, m)] or None
    evaluate_run(args.run_dir, modes=modes, budget_seconds=args.budget, sets=args.sets)
    return 0


def _check(args: argparse.Namespace) -> int:
    from pgolf.eval.legality import check_run

    results = check_run(args.run_dir, sets=args.sets)
    return 0 if all(r.passed for r in results) else 1
