"""Bundle size: the packed `train_gpt.py` pgolf ships per preset, next to the record scripts' packed files.

    python benchmarks/bundle_size.py                  # pr1394 pr1541 pr1557 pr1855 cpu-golf
    python benchmarks/bundle_size.py pr1394 --modules # and where the bytes go, module by module

Columns: `closure` packs every module of the entry point's static import closure (docstrings and comments
stripped, nothing shaken: what bundles shipped before they were cut to the recipe); `lzma` and `brotli`
pack the shipped source (the config folded in and dead code cut, docs/bundle.md) with each codec,
`shipped` is the smaller (what `pgolf bundle` writes). Record
sizes are the counted code bytes of the record logs (SPEC §6.1, §9.5, SPEC-1855 §5; #1557 counted its unpacked
122,618-byte script); the goal is at most 1.25x the record's size for the same recipe.
"""

from __future__ import annotations

import argparse
import ast

import brotli

from pgolf.config import preset, to_toml
from pgolf.minify import strip_tree
from pgolf.singlefile import bundle_modules, bundle_title, collect_modules, pack, render_bundle

RECORD_CODE_BYTES = {"pr1394": 15_516, "pr1541": 17_184, "pr1557": 122_618, "pr1855": 31_999}
GOAL = 1.25


def closure_bytes() -> int:
    """Packed size of the whole static closure, docstrings stripped and nothing shaken."""
    modules = {name: ast.unparse(strip_tree(ast.parse(src))) for name, (_, src) in collect_modules().items()}
    return len(pack(repr(modules)))


def preset_row(name: str, closure: int) -> str:
    cfg = preset(name)
    source = render_bundle(to_toml(cfg), bundle_title(name), minify=True)
    lz, br = len(pack(source, "lzma")), len(pack(source, "brotli"))
    shipped = min(lz, br)
    record = RECORD_CODE_BYTES.get(name)
    ratio = f"{shipped / record:6.2f}x" if record else "      -"
    ref = f"{record:>9,d}" if record else "        -"
    mods = len(bundle_modules(cfg, packed=True))
    return f"{name:<10s} {ref} {closure:>9,d} {len(source):>9,d} {lz:>9,d} {br:>9,d} {shipped:>9,d} {ratio} {mods:>5d}"


def module_table(name: str) -> str:
    """Each shipped module's compacted size and its brotli-11 size alone (the sum exceeds the joint stream)."""
    rows = []
    for module, (_, source) in bundle_modules(preset(name), packed=True).items():
        rows.append((len(brotli.compress(source.encode(), quality=11)), len(source), module))
    lines = [f"{'module':<28s} {'source':>8s} {'brotli':>8s}"]
    for packed, raw, module in sorted(rows, reverse=True):
        lines.append(f"{module:<28s} {raw:>8,d} {packed:>8,d}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", default=["pr1394", "pr1541", "pr1557", "pr1855", "cpu-golf"])
    parser.add_argument("--modules", action="store_true", help="per-module bytes of each preset's bundle")
    args = parser.parse_args()
    closure = closure_bytes()
    print(f"goal: shipped <= {GOAL}x the record's packed train_gpt.py")
    print(f"{'preset':<10s} {'record':>9s} {'closure':>9s} {'source':>9s} {'lzma':>9s} {'brotli':>9s} {'shipped':>9s} {'/record':>7s} {'mods':>5s}")
    for name in args.presets:
        print(preset_row(name, closure))
    if args.modules:
        for name in args.presets:
            print(f"\n{name}\n{module_table(name)}")


if __name__ == "__main__":
    main()
