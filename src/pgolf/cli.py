"""The `pgolf` command: parses arguments and hands each subcommand to its stage's own `cli` module.

No error ends in a Python traceback unless `--debug` (or PGOLF_DEBUG=1) asks for it: user errors (bad
config, file, data) are one line and exit 2; a diverged training exits 3; an interruption exits 128 +
the signal; anything else is reported as an internal error, exit 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from pgolf.config import ConfigError
from pgolf.config import cli as config_cli
from pgolf.data import cli as data_cli
from pgolf.eval import cli as eval_cli
from pgolf.quant import cli as quant_cli
from pgolf.runtime import keep_freed_memory, shutdown_distributed
from pgolf.submit import cli as submit_cli
from pgolf.train import cli as train_cli

STAGE_CLIS = [config_cli, data_cli, train_cli, quant_cli, eval_cli, submit_cli]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgolf", description="parameter golf: train, quantize, evaluate, submit"
    )
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in STAGE_CLIS:
        module.register(sub)
    return parser


def error_exit(err: BaseException) -> tuple[int, str]:
    """(exit status, the one line to print) for an exception that ended a command."""
    from pgolf.submit.pipeline import TrainingInterrupted
    from pgolf.train.loop import TrainingDiverged

    if isinstance(err, (ConfigError, ValueError, OSError)):  # BundleError, ShardError, ... are ValueErrors
        return 2, f"pgolf: error: {err}"
    if isinstance(err, TrainingDiverged):
        return 3, f"pgolf: training diverged: {err}"
    if isinstance(err, TrainingInterrupted):
        return err.exit_code, f"pgolf: {err}"
    if isinstance(err, KeyboardInterrupt):
        return 130, "pgolf: interrupted"
    return 1, f"pgolf: internal error: {type(err).__name__}: {err} (rerun with --debug for the traceback)"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("PGOLF_DEBUG", "") not in ("", "0")
    keep_freed_memory()
    try:
        code = int(args.func(args) or 0)
    except (Exception, KeyboardInterrupt) as err:
        code, line = error_exit(err)
        if debug:
            traceback.print_exc()
        print(line, file=sys.stderr)
        shutdown_distributed(wait=False)
        return code
    shutdown_distributed()
    return code


if __name__ == "__main__":
    sys.exit(main())
