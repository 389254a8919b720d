"""Submit-stage commands: `pgolf run`, `pgolf stats` (seed statistics, record test), `pgolf report` (plots,
report.md), `pgolf bundle` and `pgolf ablate` (each technique switched off in turn).

Each command is one `_add_*` function in COMMANDS; a new command adds its function to that list.
Handlers import their module on use, so building the parser stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path


def _add_stats(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stats",
        help="seed mean/std of runs and the record test (≥ 0.005 nats better, p < 0.01)",
        description=(
            "Reads RUN_DIR/summary.json of each run. With --against, runs the one-sided record t-test of "
            "the improvement in nats/token: against a bpb number (converted at each run's own "
            "val_loss/val_bpb ratio, one-sample t-test) or against baseline run directories (Welch). "
            "Exit status 1 when the test fails."
        ),
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories holding summary.json")
    p.add_argument(
        "--against",
        nargs="+",
        metavar="BPB|RUN_DIR",
        help="the SOTA val_bpb (one number) or the baseline's run directories",
    )
    p.add_argument("--threshold", type=float, default=None, help="required improvement, nats (0.005)")
    p.add_argument("--alpha", type=float, default=None, help="significance level (0.01)")
    p.set_defaults(func=_stats)


def _stats(args: argparse.Namespace) -> int:
    from pgolf.submit import stats

    runs = [stats.load_score(d) for d in args.runs]
    threshold = stats.RECORD_THRESHOLD_NATS if args.threshold is None else args.threshold
    alpha = stats.RECORD_ALPHA if args.alpha is None else args.alpha
    baseline, test = None, None
    try:
        if args.against:
            bpb = _as_bpb(args.against)
            if bpb is not None:
                test = stats.compare_to_bpb(runs, bpb, threshold, alpha)
            else:
                baseline = [stats.load_score(d) for d in args.against]
                test = stats.compare_to_runs(runs, baseline, threshold, alpha)
    except ModuleNotFoundError as err:
        print(f"pgolf: error: {err}", file=sys.stderr)
        return 2
    print(stats.format_stats(runs, baseline, test))
    return 0 if test is None or test.passed else 1


def _as_bpb(values: list[str]) -> float | None:
    """--against as a number, or None when it names run directories (a directory wins over a number)."""
    if len(values) != 1 or Path(values[0]).is_dir():
        return None
    try:
        return float(values[0])
    except ValueError:
        raise ValueError(
            f"--against: {values[0]!r} is neither a run directory nor a val_bpb number"
        ) from None


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="write summary.json, loss/bpb/bytes plots and report.md for a run",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", default=None, help="output folder (default RUN_DIR/report)")
    p.set_defaults(func=_report)


def _report(args: argparse.Namespace) -> int:
    from pgolf.submit.report import render_report
    from pgolf.submit.summary import SUMMARY_FILE, code_counts, format_summary, read_run_json, run_budgets

    try:
        path = render_report(args.run_dir, args.out)
    except ModuleNotFoundError as err:
        print(f"pgolf: error: {err}", file=sys.stderr)
        return 2
    summary = read_run_json(args.run_dir, SUMMARY_FILE)
    print(format_summary(summary, *run_budgets(args.run_dir), code_counts(args.run_dir)))
    print(f"\nreport: {path}")
    return 0


def _add_run(sub: argparse._SubParsersAction) -> None:
    from pgolf.config.cli import add_config_arguments

    p = sub.add_parser("run", help="train -> quantize -> evaluate a preset; writes summary.json")
    p.add_argument("--preset", required=True)
    p.add_argument("--data", help="data folder (shards + tokenizer.model); sets data.dir")
    p.add_argument("--out", required=True, metavar="RUN_DIR")
    p.add_argument("--seeds", help="comma list: one run per seed in RUN_DIR/seed_N, then their statistics")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    p.add_argument(
        "--fresh", action="store_true", help="discard RUN_DIR's checkpoint and outputs, start over"
    )
    add_config_arguments(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from pgolf import rundir
    from pgolf.config import resolve
    from pgolf.submit.pipeline import run_pipeline, seed_configs

    sets = list(args.sets) + ([f"data.dir={args.data}"] if args.data else [])
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    cfg = resolve(args.preset, args.config, sets=sets)
    if seeds is None:
        run_pipeline(cfg, args.out, resume=args.resume, fresh=args.fresh)
        return 0
    from pgolf.submit import stats

    dirs = [Path(args.out) / f"seed_{s}" for s in seeds]
    for c, d in zip(seed_configs(cfg, seeds), dirs):
        resume = args.resume and rundir.path(d, rundir.CHECKPOINT).is_file()
        run_pipeline(c, d, resume=resume, fresh=args.fresh)
    if len(dirs) > 1:
        print(stats.format_stats([stats.load_score(d) for d in dirs], None, None))
    return 0


def parse_seeds(text: str) -> list[int]:
    """--seeds "1,2,3" -> [1, 2, 3]: integers, at least one, no repeats."""
    parts = [p.strip() for p in text.split(",")]
    try:
        seeds = [int(p) for p in parts if p]
    except ValueError:
        raise ValueError(
            f"--seeds {text!r}: expected a comma-separated list of integers, e.g. 1337,42,2025"
        ) from None
    if not seeds or len(seeds) != len(parts) or len(set(seeds)) != len(seeds):
        raise ValueError(
            f"--seeds {text!r}: expected distinct integers separated by single commas, e.g. 1337,42"
        )
    return seeds


def _add_bundle(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bundle", help="emit the record folder (single-file train_gpt.py, README, logs)")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", required=True, metavar="RECORD_DIR")
    p.add_argument(
        "--packed",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="lzma+base85 self-extracting train_gpt.py (default: quant.packed_code of the run)",
    )
    p.set_defaults(func=_bundle)


def _bundle(args: argparse.Namespace) -> int:
    from pgolf.submit.bundle import bundle_run

    bundle_run(args.run_dir, args.out, args.packed)
    return 0


def _add_ablate(sub: argparse._SubParsersAction) -> None:
    from pgolf.config.cli import add_config_arguments

    p = sub.add_parser(
        "ablate",
        help="train a preset as is and with each technique switched off; table of Δbpb, bytes, seconds",
        description=(
            "Runs OUT/baseline/seed_S and OUT/TOGGLE/seed_S (each a full `pgolf run`), then writes "
            "OUT/ablation.json and OUT/ablation.md: per technique the mean over seeds of off − baseline "
            "(positive Δbpb = the technique helps) ± the std of the paired differences. Finished runs "
            "of the same config are reused: rerun the command to continue an interrupted ablation."
        ),
    )
    p.add_argument("preset", metavar="PRESET")
    p.add_argument("--data", help="data folder (shards + tokenizer.model); sets data.dir")
    p.add_argument("--out", metavar="OUT", help="ablation folder")
    p.add_argument(
        "--toggle",
        action="append",
        default=[],
        metavar="NAMES",
        help="comma list of techniques to switch off (--list shows them), optionally ending with an "
        "ad-hoc one NAME=section.field=value[;section.field=value]; repeatable",
    )
    p.add_argument(
        "--seeds", default="3", help="a count N (the preset's seed, +1, ...) or a comma list (default 3)"
    )
    p.add_argument("--list", action="store_true", help="list the built-in toggles for PRESET and exit")
    add_config_arguments(p)
    p.set_defaults(func=_ablate)


def _ablate(args: argparse.Namespace) -> int:
    from pgolf.config import ConfigError, resolve
    from pgolf.submit import ablate

    sets = list(args.sets) + ([f"data.dir={args.data}"] if args.data else [])
    base = resolve(args.preset, args.config, sets=sets)
    if args.list:
        print(ablate.list_toggles(base))
        return 0
    if not args.out:
        raise ConfigError("pgolf ablate: --out is required (the folder for the runs and the table)")
    toggles = ablate.parse_toggles(args.toggle)
    seeds = ablate.parse_seeds(args.seeds, base.train.seed)
    ablate.run_ablation(base, toggles, seeds, args.out)
    return 0


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_stats,
    _add_report,
    _add_run,
    _add_bundle,
    _add_ablate,
]


def register(sub: argparse._SubParsersAction) -> None:
    for add in COMMANDS:
        add(sub)
