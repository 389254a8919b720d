"""`pgolf config show PRESET`: print the resolved config (TOML, or JSON with --json)."""

from __future__ import annotations

import argparse
import json

from pgolf.config import resolve, to_dict, to_toml, unused_record_vars


def add_set_argument(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    """`--set KEY=VALUE` (repeatable), collected into args.sets."""
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=help or "override one field, e.g. --set model.num_layers=6 (repeatable; wins over env vars)",
    )


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The override chain shared by every command that builds a RunConfig."""
    parser.add_argument("--config", help="TOML file overriding the preset")
    add_set_argument(parser)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="inspect configurations")
    csub = p.add_subparsers(dest="config_command", required=True)
    show = csub.add_parser("show", help="print the resolved config of a preset")
    show.add_argument("preset")
    show.add_argument("--json", action="store_true", help="machine-readable JSON")
    add_config_arguments(show)
    show.set_defaults(func=_show)
    lst = csub.add_parser("list", help="list preset names")
    lst.set_defaults(func=_list)


def _show(args: argparse.Namespace) -> int:
    import os

    cfg = resolve(args.preset, args.config, sets=args.sets)
    if args.json:
        print(json.dumps(to_dict(cfg), indent=2))
    else:
        print(to_toml(cfg), end="")
    for name in unused_record_vars(os.environ):
        print(f"# note: {name} is set but pgolf does not implement it (SPEC §9.2); it has no effect")
    return 0


def _list(args: argparse.Namespace) -> int:
    from pgolf.config.presets import PRESETS

    for name, fn in PRESETS.items():
        doc = (fn.__doc__ or "").strip().splitlines()[0]
        print(f"{name:14s} {doc}")
    return 0
