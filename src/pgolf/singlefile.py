"""Single-file source bundles: one self-contained `train_gpt.py` carrying exactly the pgolf modules a record
needs. `pgolf bundle` writes it; the quantizer counts its exact size as the code bytes of a submission.

Why an embedded-module importer rather than concatenating sources: concatenation breaks on name clashes
between modules and on `from pgolf.x import y` lines; embedding each module's source and serving it through a
`sys.meta_path` finder keeps every module's namespace intact, so the bundled file runs the very code the tests
ran. The module set is the closure of static imports (AST, function-level imports included) from the record
entry point, so CLI, bundler, report and data-building code stay out.
`--packed` minifies (AST round trip without docstrings), LZMA2-compresses and base85-encodes the file into a
two-line self-extracting shim, as the record scripts ship (SPEC §4.7). Every source, the payload included,
must parse under the Python 3.10 grammar (SPEC §9.1).
"""

from __future__ import annotations

import ast
import base64
import importlib.util
import lzma
from pathlib import Path

ENTRY_MODULE = "pgolf.submit.record"
PACKAGE = "pgolf"
# Reached only through lazy imports a bundled run never executes (a bundle knows its own size).
NOT_BUNDLED = frozenset({"pgolf.singlefile"})
_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


class BundleError(ValueError):
    """The bundle cannot be built or would break a rule (grammar, cap)."""


def _module_file(name: str) -> tuple[Path, bool]:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise BundleError(f"cannot find module {name}")
    return Path(spec.origin), spec.submodule_search_locations is not None


def _imported_modules(name: str, tree: ast.AST, is_package: bool) -> set[str]:
    """pgolf modules a module imports anywhere in its body (absolute or relative)."""
    found: set[str] = set()
    base = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                parts = base.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                mod = f"{anchor}.{mod}" if mod else anchor
            found.add(mod)
            # `from pgolf.data import bytes` imports a submodule, not an attribute
            found.update(f"{mod}.{a.name}" for a in node.names)
    return {m for m in found if m == PACKAGE or m.startswith(PACKAGE + ".")}


def collect_modules(entry: str = ENTRY_MODULE) -> dict[str, tuple[bool, str]]:
    """{module name: (is_package, source)} for the import closure of `entry`, parents included."""
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
        todo.extend(_imported_modules(name, ast.parse(source), is_package))
    return dict(sorted(out.items()))


def check_py310(source: str, name: str) -> None:
    """Refuse code the challenge's Python 3.10 image cannot parse (e.g. PEP 701 f-strings)."""
    try:
        ast.parse(source, filename=name, feature_version=(3, 10))
    except SyntaxError as err:
        raise BundleError(f"{name}:{err.lineno}: not valid Python 3.10 syntax ({err.msg})") from None


def _strip_docstrings(source: str) -> str:
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                if isinstance(body[0].value.value, str):
                    node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree)


_LOADER = '''import importlib.abc
import importlib.util
import sys


class _PgolfBundle(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves the embedded pgolf modules; nothing is written to disk."""

    def find_spec(self, name, path=None, target=None):
        if name in _MODULES:
            return importlib.util.spec_from_loader(name, self, is_package=_MODULES[name][0])
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        code = compile(_MODULES[module.__name__][1], "<bundle>/" + module.__name__, "exec")
        exec(code, module.__dict__)


sys.meta_path.insert(0, _PgolfBundle())
'''


def render_bundle(config_toml: str, title: str, minify: bool = False, entry: str = ENTRY_MODULE) -> str:
    """The text of a self-contained train_gpt.py running `entry.main(CONFIG_TOML)`."""
    modules = collect_modules(entry)
    lines = [f'"""{title} (generated by pgolf bundle; run with torchrun --standalone --nproc_per_node=8)."""']
    lines.append("_MODULES = {")
    for name, (is_package, source) in modules.items():
        text = _strip_docstrings(source) if minify else source
        lines.append(f"    {name!r}: ({is_package!r}, {text!r}),")
    lines.append("}")
    lines.append(_LOADER)
    lines.append(f"CONFIG_TOML = {config_toml!r}")
    lines.append("")
    lines.append('if __name__ == "__main__":')
    lines.append(f"    from {entry} import main")
    lines.append("")
    lines.append("    sys.exit(main(CONFIG_TOML))")
    text = "\n".join(lines) + "\n"
    check_py310(text, "train_gpt.py")
    return text


def pack(source: str) -> str:
    """Two-line self-extracting shim: exec of the LZMA2 (raw) + base85 payload (SPEC §4.7)."""
    payload = base64.b85encode(
        lzma.compress(source.encode("utf-8"), format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    )
    shim = (
        "import lzma as L,base64 as B\n"
        "exec(L.decompress(B.b85decode(" + repr(payload.decode("ascii")) + "),format=L.FORMAT_RAW,"
        "filters=[{'id':L.FILTER_LZMA2}]))\n"
    )
    check_py310(shim, "train_gpt.py (shim)")
    check_py310(unpack(shim), "train_gpt.py (packed payload)")
    return shim


def unpack(shim: str) -> str:
    """The payload of a packed shim, decoded without executing it."""
    tree = ast.parse(shim)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "b85decode":
            payload = node.args[0].value  # type: ignore[attr-defined]
            raw = base64.b85decode(payload)
            return lzma.decompress(raw, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}]).decode(
                "utf-8"
            )
    raise BundleError("not a packed pgolf bundle (no base85 payload found)")


def bundle_title(preset: str) -> str:
    return f"pgolf record: preset {preset}"


def build_bundle_source(config_toml: str, title: str, packed: bool = False) -> str:
    source = render_bundle(config_toml, title, minify=packed)
    return pack(source) if packed else source
