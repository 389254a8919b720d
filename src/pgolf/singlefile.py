"""Single-file source bundles: one self-contained `train_gpt.py` carrying exactly the pgolf code a record
runs. `pgolf bundle` writes it; its exact size on disk is the code bytes of the submission (SPEC §4.7).

Why an embedded-module importer rather than concatenating sources: concatenation breaks on name clashes
between modules and on `from pgolf.x import y` lines; embedding each module's source and serving it through a
`sys.meta_path` finder keeps every module's namespace intact, so the bundled file runs the very code the tests
ran. The module set starts as the closure of static imports (AST, function-level imports included) from the
record entry point; the modules of eval modes the config's plan does not run (record.FEATURE_MODULES) are
left out, and `pgolf.minify.shake` keeps only the definitions the entry point reaches, so CLI, bundler,
report, data building and test oracles stay out. `packed` also strips docstrings and annotations, compacts
the source and compresses it (LZMA or brotli, whichever is smaller) into a two-line self-extracting shim,
as the record scripts ship. Every source, the payload included, must parse under the Python 3.10 grammar
(SPEC §9.1).
"""

from __future__ import annotations

import ast
import base64
import copy
import importlib.util
import lzma
from pathlib import Path
from typing import Any

import brotli

from pgolf.config import RunConfig, to_toml, validate
from pgolf.config.overrides import from_dict, tomllib
from pgolf.deadcode import prune_methods
from pgolf.fold import fold_config
from pgolf.minify import compact, from_module, imported_modules, shake, strip_tree
from pgolf.submit.record import FEATURE_MODULES

ENTRY_MODULE = "pgolf.submit.record"
ENTRY_ROOTS = frozenset({"main"})
PACKAGE = "pgolf"
# Reached only through lazy imports a bundled run never executes (a bundle knows its own size).
NOT_BUNDLED = frozenset({"pgolf.singlefile", "pgolf.minify"})
# LZMA1 in the .lzma container: a 13-byte header that lzma.decompress recognises with no arguments.
_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA1, "preset": 9 | lzma.PRESET_EXTREME, "lc": 4, "lp": 0, "pb": 0}]
_SHIMS = {
    "lzma": ("import lzma as L,base64 as B\nexec(L.decompress(B.b85decode(", ")))\n"),
    "brotli": ("import brotli as L,base64 as B\nexec(L.decompress(B.b85decode(", ")))\n"),
}


class BundleError(ValueError):
    """The bundle cannot be built or would break a rule (grammar, cap)."""


def _module_file(name: str) -> tuple[Path, bool]:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise BundleError(f"cannot find module {name}")
    return Path(spec.origin), spec.submodule_search_locations is not None


def collect_modules(entry: str = ENTRY_MODULE) -> dict[str, tuple[bool, str]]:
    """{module name: (is_package, source)} for the static import closure of `entry`, parents included."""
    out: dict[str, tuple[bool, str]] = {}
    todo = [entry]
    while todo:
        name = todo.pop()
        if name in out or name in NOT_BUNDLED:
            continue
        try:
            path, is_package = _module_file(name)
        except (BundleError, ModuleNotFoundError):
            if name == entry:
                raise BundleError(f"bundle entry module {entry} does not exist") from None
            continue  # `from pgolf.x import some_function`: not a module
        source = path.read_text(encoding="utf-8")
        check_py310(source, name)
        out[name] = (is_package, source)
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        todo.extend(imported_modules(name, ast.parse(source), is_package))
    return dict(sorted(out.items()))


def check_py310(source: str, name: str) -> None:
    """Refuse code the challenge's Python 3.10 image cannot parse (e.g. PEP 701 f-strings)."""
    try:
        ast.parse(source, filename=name, feature_version=(3, 10))
    except SyntaxError as err:
        raise BundleError(f"{name}:{err.lineno}: not valid Python 3.10 syntax ({err.msg})") from None


# Definitions reached only on branches that data selects, not the config (an artifact's format version,
# its LQER entries):
# a bundled run reads only the files it wrote itself, so without the feature they are never called. Each
# entry: (does the config use the feature, the "module:name" definitions it needs). A bundle without the
# feature binds each name to None (pgolf.fold then lets minify.shake drop what only they reached).
FEATURE_DEFINITIONS = (
    (
        lambda cfg: cfg.quant.compressor == "pergroup",
        ("pgolf.quant.artifact:encode_pergroup", "pgolf.quant.artifact:_decode_pergroup"),
    ),
    (lambda cfg: cfg.quant.lqer_top_k > 0, ("pgolf.quant.lqer:lqer_correction", "pgolf.quant.lqer:LqerFactors")),
)


# Tables keyed by dotted config field that a bundle cuts to the fields it does not fix: the values of the
# fixed ones were checked when it was built, and record.main refuses an env var that changes one.
FIELD_TABLES = {"pgolf.config.schema": ("RANGES", "CHOICES")}


def _cut_field_tables(trees: dict[str, tuple[bool, ast.Module]], fixed: set[str]) -> None:
    for module, tables in FIELD_TABLES.items():
        for stmt in trees[module][1].body if module in trees else []:
            target = stmt.targets[0] if isinstance(stmt, ast.Assign) else getattr(stmt, "target", None)
            value = getattr(stmt, "value", None)
            if getattr(target, "id", None) in tables and isinstance(value, ast.Dict):
                pairs = [(k, v) for k, v in zip(value.keys, value.values) if getattr(k, "value", None) not in fixed]
                value.keys, value.values = [k for k, _ in pairs], [v for _, v in pairs]


def unused_definitions(cfg: RunConfig) -> dict[str, set[str]]:
    """{module: names of FEATURE_DEFINITIONS} for the features `cfg` does not use."""
    out: dict[str, set[str]] = {}
    for uses, names in FEATURE_DEFINITIONS:
        if not uses(cfg):
            for entry in names:
                module, _, name = entry.partition(":")
                out.setdefault(module, set()).add(name)
    return out


def _unbind_definitions(tree: ast.Module, names: set[str]) -> ast.Module:
    for i, stmt in enumerate(tree.body):
        if isinstance(stmt, (ast.FunctionDef, ast.ClassDef)) and stmt.name in names:
            unbound = ast.Assign(targets=[ast.Name(id=stmt.name, ctx=ast.Store())], value=ast.Constant(None))
            tree.body[i] = ast.copy_location(unbound, stmt)
    return tree


def unused_feature_modules(cfg: RunConfig) -> set[str]:
    """Modules of eval modes `cfg.eval.plan` does not run: the bundle leaves them out."""
    return {module for module, mode in FEATURE_MODULES.items() if mode not in cfg.eval.plan}


class _UnbindImports(ast.NodeTransformer):
    """`from <left-out module> import a, b` becomes `a = b = None`: the names stay defined for code on the
    branches of the left-out modes, which record.main refuses to reach (check_plan_is_bundled). So does the
    import of an unbound definition (FEATURE_DEFINITIONS): its module ships only if something else needs it."""

    def __init__(self, name: str, is_package: bool, left_out: set[str], unbound: dict[str, set[str]]) -> None:
        self.base = name if is_package else name.rpartition(".")[0]
        self.left_out, self.unbound = left_out, unbound

    def visit_ImportFrom(self, node: ast.ImportFrom) -> Any:
        module = from_module(node, self.base)
        gone = [a for a in node.names if module in self.left_out or a.name in self.unbound.get(module, ())]
        if not gone:
            return node
        targets = [ast.Name(id=a.asname or a.name, ctx=ast.Store()) for a in gone]
        out: list[ast.stmt] = [ast.copy_location(ast.Assign(targets=targets, value=ast.Constant(None)), node)]
        if len(gone) < len(node.names):
            out.insert(0, ast.copy_location(ast.ImportFrom(node.module, [a for a in node.names if a not in gone], node.level), node))
        return out


def bundle_modules(cfg: RunConfig, packed: bool, entry: str = ENTRY_MODULE) -> dict[str, tuple[bool, str]]:
    """{module: (is_package, source)} of what a bundle for `cfg` carries: the entry point's reachable code
    (minify.shake) without the modules of modes the plan does not run, with `cfg` folded into it
    (pgolf.fold); `packed` strips and compacts it."""
    return _bundle_parts(cfg, packed, entry)[0]


def _bundle_parts(cfg: RunConfig, packed: bool, entry: str) -> tuple[dict[str, tuple[bool, str]], list[str]]:
    """(bundle_modules, the config fields whose values the bundled code fixes)."""
    left_out, unbound = unused_feature_modules(cfg), unused_definitions(cfg)
    parsed = {}
    for name, (is_package, source) in collect_modules(entry).items():
        if any(name == m or name.startswith(m + ".") for m in left_out):
            continue
        tree = _UnbindImports(name, is_package, left_out, unbound).visit(ast.parse(source))
        parsed[name] = (is_package, _unbind_definitions(tree, unbound.get(name, set())))
    shipped = {name: tree for name, (_, tree) in shake(parsed, entry, set(ENTRY_ROOTS)).items()}
    fixed = fold_config(parsed, shipped, validate(copy.deepcopy(cfg)), set(ENTRY_ROOTS))
    _cut_field_tables(parsed, fixed)
    trees = {}
    for name, (is_package, tree) in parsed.items():
        trees[name] = (is_package, strip_tree(tree) if packed else ast.fix_missing_locations(tree))
    shaken = shake(trees, entry, set(ENTRY_ROOTS))
    prune_methods({name: tree for name, (_, tree) in shaken.items()})
    out = {}
    for name, (is_package, tree) in shaken.items():
        text = ast.unparse(tree)
        text = compact(text) if packed and text else text
        check_py310(text, f"{name} (as bundled)")
        out[name] = (is_package, text)
    return out, sorted(fixed)


def config_delta_toml(cfg: RunConfig) -> str:
    """The TOML of `cfg` with only the fields that differ from RunConfig's defaults (from_dict fills the
    rest back in): what the bundle embeds."""
    default = to_toml(RunConfig(preset=cfg.preset)).splitlines()
    lines, section = [], None
    for line, base in zip(to_toml(cfg).splitlines(), default):
        if line.startswith("preset ="):
            lines.append(line)
        elif line.startswith("["):
            section = line
        elif line != base:
            if section is not None:
                lines.append(section)
                section = None
            lines.append(line)
    return "\n".join(lines) + "\n"


_LOADER = """import importlib.abc,importlib.util,sys
class _B(importlib.abc.MetaPathFinder,importlib.abc.Loader):
 def find_spec(self,name,path=None,target=None):
  if name in _MODULES:return importlib.util.spec_from_loader(name,self,is_package=_MODULES[name][0])
  if name.startswith('pgolf.'):raise ModuleNotFoundError(name+' is not in this train_gpt.py')
 def create_module(self,spec):return None
 def exec_module(self,module):exec(compile(_MODULES[module.__name__][1],'<bundle>/'+module.__name__,'exec'),module.__dict__)
sys.meta_path.insert(0,_B())
"""


def _string_literal(source: str) -> str:
    """`source` as a Python literal: raw and triple-quoted where that spells it verbatim (a newline stays
    one character, which packs smaller than repr's two), else repr."""
    raw = bool(source) and "'''" not in source and "\r" not in source and not source.endswith(("'", "\\"))
    return f"r'''{source}'''" if raw else repr(source)


def render_bundle(config_toml: str, title: str, minify: bool = False, entry: str = ENTRY_MODULE) -> str:
    """The text of a self-contained train_gpt.py running `entry.main(CONFIG_TOML)`."""
    cfg = from_dict(tomllib.loads(config_toml), "bundle config")
    modules, fixed = _bundle_parts(cfg, minify, entry)
    lines = [] if minify else [f'"""{title} (generated by pgolf bundle; run with torchrun --standalone --nproc_per_node=8)."""']
    lines.append("_MODULES={")
    for name, (is_package, source) in modules.items():
        lines.append(f"{name!r}:({is_package!r},{_string_literal(source)}),")
    lines.append("}")
    lines.append(_LOADER)
    lines.append(f"CONFIG_TOML={config_delta_toml(cfg)!r}")
    lines.append(f"FIXED={tuple(fixed)!r}")
    lines.append(f"if __name__=='__main__':from {entry} import main;sys.exit(main(CONFIG_TOML,FIXED))")
    text = "\n".join(lines) + "\n"
    check_py310(text, "train_gpt.py")
    return text


def _payload(source: bytes, codec: str) -> bytes:
    if codec == "brotli":
        return brotli.compress(source, quality=11, lgwin=24)
    return lzma.compress(source, format=lzma.FORMAT_ALONE, filters=_LZMA_FILTERS)


def pack(source: str, codec: str | None = None) -> str:
    """Two-line self-extracting shim: exec of the compressed, base85-encoded source (SPEC §4.7), compressed
    with `codec` (lzma | brotli), or with whichever gives the smaller file when None."""
    shims = []
    for name in [codec] if codec else list(_SHIMS):
        head, tail = _SHIMS[name]
        payload = base64.b85encode(_payload(source.encode("utf-8"), name)).decode("ascii")
        shims.append(head + repr(payload) + tail)
    shim = min(shims, key=len)
    check_py310(shim, "train_gpt.py (shim)")
    check_py310(unpack(shim), "train_gpt.py (packed payload)")
    return shim


def unpack(shim: str) -> str:
    """The payload of a packed shim, decoded without executing it."""
    tree = ast.parse(shim)
    codec = "brotli" if "brotli" in shim.partition("\n")[0] else "lzma"
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "b85decode":
            raw = base64.b85decode(node.args[0].value)  # type: ignore[attr-defined]
            data = brotli.decompress(raw) if codec == "brotli" else lzma.decompress(raw)
            return data.decode("utf-8")
    raise BundleError("not a packed pgolf bundle (no base85 payload found)")


def bundle_title(preset: str) -> str:
    return f"pgolf record: preset {preset}"


def build_bundle_source(config_toml: str, title: str, packed: bool = False) -> str:
    source = render_bundle(config_toml, title, minify=packed)
    return pack(source) if packed else source


def bundle_code_bytes(cfg: RunConfig) -> int:
    """Exact bytes of the single-file `train_gpt.py` that `pgolf bundle` emits for this RunConfig (packed or
    not per quant.packed_code): the code a submission really carries, counted the way SPEC §4.7 counts it."""
    from pgolf.config import to_toml

    source = build_bundle_source(to_toml(cfg), bundle_title(cfg.preset), packed=cfg.quant.packed_code)
    return len(source.encode("utf-8"))
