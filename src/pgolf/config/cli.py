"""`pgolf config show|list|keys`: the resolved config of a preset, the presets, every key with what it accepts."""

from __future__ import annotations

import argparse
import json

from pgolf.config import resolve, to_dict, to_toml, unused_record_vars
from pgolf.config.presets import PRESETS
from pgolf.config.schema import SECTIONS


def add_set_argument(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    """`--set KEY=VALUE` (repeatable), collected into args.sets."""
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=help
        or "override one field, e.g. --set model.num_layers=6 (repeatable; wins over env vars); "
        "`pgolf config keys` lists every key with its type and allowed values",
    )


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The override chain shared by every command that builds a RunConfig."""
    parser.add_argument("--config", help="TOML file overriding the preset")
    add_set_argument(parser)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="inspect configurations")
    csub = p.add_subparsers(dest="config_command", required=True)
    show = csub.add_parser("show", help="print the resolved config of a preset")
    show.add_argument("preset", choices=sorted(PRESETS), metavar="PRESET", help=", ".join(sorted(PRESETS)))
    show.add_argument("--json", action="store_true", help="machine-readable JSON")
    add_config_arguments(show)
    show.set_defaults(func=_show)
    lst = csub.add_parser("list", help="list preset names")
    lst.set_defaults(func=_list)
    keys = csub.add_parser(
        "keys", help="every config key: type, value in a preset, allowed values (what --set accepts)"
    )
    keys.add_argument("section", nargs="?", choices=SECTIONS, help="only this section")
    keys.add_argument("--preset", default="pr1394", choices=sorted(PRESETS), metavar="PRESET")
    keys.set_defaults(func=_keys)


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
    for name, fn in PRESETS.items():
        doc = (fn.__doc__ or "").strip().splitlines()[0]
        print(f"{name:14s} {doc}")
    return 0


def _keys(args: argparse.Namespace) -> int:
    from pgolf.config import preset
    from pgolf.config.overrides import describe_keys

    rows = [
        r
        for r in describe_keys(preset(args.preset))
        if not args.section or r[0].startswith(args.section + ".")
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'key':{width}s}  {'type':9s}  {args.preset:14s}  allowed")
    for key, tp, value, allowed in rows:
        print(f"{key:{width}s}  {tp:9s}  {value:14s}  {allowed}")
    return 0
