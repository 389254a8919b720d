"""The `pgolf` command: parses arguments and hands each subcommand to its stage's own `cli` module."""

from __future__ import annotations

import argparse
import sys

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
    sub = parser.add_subparsers(dest="command", required=True)
    for module in STAGE_CLIS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    try:
        code = int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError, ValueError) as err:  # BundleError, ShardError, ... are ValueErrors
        # Expected user errors (bad key, bad file, bad data) get one clear line, not a traceback.
        print(f"pgolf: error: {err}", file=sys.stderr)
        shutdown_distributed(wait=False)
        return 2
    shutdown_distributed()
    return code


if __name__ == "__main__":
    sys.exit(main())
