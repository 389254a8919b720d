"""AST passes that shrink the single-file bundle to the code a recipe runs (SPEC §4.7: code bytes count).

`strip_tree` drops what never runs (docstrings, function annotations, `__main__` and TYPE_CHECKING blocks);
`shake` keeps, across the bundled modules, only the top-level definitions reachable from the entry point's
roots, so whole modules (CLI, report, data building, test oracles) fall out with the code that no run path
names; `compact` rewrites the source with the least whitespace the grammar needs. Every pass is checked:
`compact` compares the AST of its output with its input's, and the bundle re-parses under Python 3.10.

Reachability is by name and errs towards keeping: a definition is kept when its name is read in kept code
of its module outside a scope that binds it locally, imported from its module by kept code (an import line
nothing reads goes, and with it the module when nothing else needs it), or read as an attribute of any pgolf
module object; a decorator
that might register the function (anything not in PURE_DECORATORS) keeps it whenever its module is kept.
"""

from __future__ import annotations

import ast
import io
import tokenize
from collections.abc import Iterable
from dataclasses import dataclass, field

PACKAGE = "pgolf"
# Decorators that wrap or describe what they decorate and register it nowhere.
PURE_DECORATORS = frozenset(
    {
        "dataclass",
        "dataclasses.dataclass",
        "functools.cache",
        "functools.lru_cache",
        "contextlib.contextmanager",
        "torch.no_grad",
        "torch.inference_mode",
        "numba.njit",
        "intrinsic",
        "property",
        "staticmethod",
        "classmethod",
    }
)


class MinifyError(ValueError):
    """A pass would change what the code means (a bug in the pass, never in the bundled code)."""


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Call):
        return _dotted(node.func)
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def imported_modules(name: str, node: ast.AST, is_package: bool) -> set[str]:
    """pgolf modules (and `from M import x` candidates M.x) that `node` imports anywhere inside it."""
    found: set[str] = set()
    base = name if is_package else name.rpartition(".")[0]
    for sub in ast.walk(node):
        if isinstance(sub, ast.Import):
            found.update(a.name for a in sub.names)
        elif isinstance(sub, ast.ImportFrom):
            mod = from_module(sub, base)
            found.add(mod)
            # `from pgolf.data import bytes` imports a submodule, not an attribute
            found.update(f"{mod}.{a.name}" for a in sub.names)
        elif entry_point_name(sub):  # "pgolf.x:function": the eval-mode registry imports it by name
            found.add(sub.value.partition(":")[0])
    return {m for m in found if m == PACKAGE or m.startswith(PACKAGE + ".")}


def entry_point_name(node: ast.AST) -> str:
    """The function of a "pgolf.x:function" string constant (pgolf.eval.modes), else ""."""
    value = node.value if isinstance(node, ast.Constant) else None
    return value.partition(":")[2] if isinstance(value, str) and value.startswith(PACKAGE + ".") else ""


def from_module(node: ast.ImportFrom, base: str) -> str:
    mod = node.module or ""
    if node.level:
        parts = base.split(".")
        anchor = ".".join(parts[: len(parts) - node.level + 1])
        mod = f"{anchor}.{mod}" if mod else anchor
    return mod


# ---------------------------------------------------------------- strip: what never runs


def _is_docstring(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)


def _main_or_type_checking(stmt: ast.stmt) -> bool:
    if not isinstance(stmt, ast.If):
        return False
    test = ast.unparse(stmt.test)
    return test in ("TYPE_CHECKING", "typing.TYPE_CHECKING") or test.replace("'", '"') == '__name__ == "__main__"'


class _Strip(ast.NodeTransformer):
    """Docstrings, function annotations and annotations of non-class variables (kept on class bodies:
    dataclass fields need them, and the config reads their types)."""

    def __init__(self) -> None:
        self.in_class: list[bool] = [False]

    def _body(self, body: list[ast.stmt]) -> list[ast.stmt]:
        if body and _is_docstring(body[0]):
            body = body[1:]
        return body or [ast.Pass()]

    def visit_Module(self, node: ast.Module) -> ast.Module:
        node.body = [s for s in node.body if not _main_or_type_checking(s)]
        self.generic_visit(node)
        node.body = self._body(node.body) if node.body and _is_docstring(node.body[0]) else node.body
        return node

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> ast.AST:
        a = node.args
        for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]:
            if arg is not None:
                arg.annotation = None
        node.returns = None
        self.in_class.append(False)
        self.generic_visit(node)
        self.in_class.pop()
        node.body = self._body(node.body)
        return node

    visit_FunctionDef = _function
    visit_AsyncFunctionDef = _function

    def visit_ClassDef(self, node: ast.ClassDef) -> ast.AST:
        self.in_class.append(True)
        self.generic_visit(node)
        self.in_class.pop()
        node.body = self._body(node.body)
        return node

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AST | None:
        if self.in_class[-1]:
            return node
        if node.value is None:
            return None
        return ast.copy_location(ast.Assign(targets=[node.target], value=node.value), node)


def strip_tree(tree: ast.Module) -> ast.Module:
    """Remove docstrings, function annotations, `if __name__ == "__main__"` and TYPE_CHECKING blocks."""
    tree = _Strip().visit(tree)
    return ast.fix_missing_locations(tree)


# ---------------------------------------------------------------- references, scope-aware


def _bound_in(body: Iterable[ast.AST]) -> tuple[set[str], set[str]]:
    """(names a function body binds locally, names it declares global/nonlocal), not entering nested scopes."""
    bound: set[str] = set()
    declared: set[str] = set()
    todo = list(body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
            todo.extend(node.decorator_list)
            continue
        if isinstance(node, (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            continue
        if isinstance(node, (ast.Global, ast.Nonlocal)):
            declared.update(node.names)
        elif isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            bound.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
        todo.extend(ast.iter_child_nodes(node))
    return bound - declared, declared


class _Refs(ast.NodeVisitor):
    """What a statement of module `module` reads: its module's globals (Name loads outside the local scopes
    binding them), `(M, name)` of `from M import name`, and, as names of any module, every attribute of a
    chain rooted at a pgolf module alias and the functions of "pgolf.x:function" strings."""

    def __init__(self, module_aliases: frozenset[str], module: str = "", base: str = "") -> None:
        self.names: set[str] = set()
        self.anywhere: set[str] = set()
        self.imported: set[tuple[str, str]] = set()
        self.module_aliases, self.module, self.base = module_aliases, module, base
        self.scopes: list[set[str]] = []

    def qualified(self) -> set[tuple[str, str]]:
        return {(self.module, n) for n in self.names} | self.imported

    def _local(self, name: str) -> bool:
        return any(name in s for s in self.scopes)

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load) and not self._local(node.id):
            self.names.add(node.id)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        chain, root = [node.attr], node.value
        while isinstance(root, ast.Attribute):
            chain.append(root.attr)
            root = root.value
        if isinstance(root, ast.Name) and root.id in self.module_aliases:
            self.anywhere.update(chain)
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self.imported.update((from_module(node, self.base), a.name) for a in node.names)

    def visit_Constant(self, node: ast.Constant) -> None:
        if entry_point_name(node):
            self.anywhere.add(entry_point_name(node))

    def _scope(self, node: ast.AST, args: ast.arguments, body: list[ast.AST]) -> None:
        for sub in [*getattr(node, "decorator_list", []), *args.defaults, *args.kw_defaults]:
            if sub is not None:
                self.visit(sub)
        for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
            if arg is not None and arg.annotation is not None:
                self.visit(arg.annotation)
        if getattr(node, "returns", None) is not None:
            self.visit(node.returns)  # type: ignore[attr-defined]
        params = {a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg] if a}
        bound, _ = _bound_in(body)
        self.scopes.append(params | bound)
        for stmt in body:
            self.visit(stmt)
        self.scopes.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._scope(node, node.args, node.body)

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self._scope(node, node.args, [node.body])

    def _comprehension(self, node: ast.AST, parts: list[ast.AST]) -> None:
        gens: list[ast.comprehension] = node.generators  # type: ignore[attr-defined]
        self.visit(gens[0].iter)  # evaluated in the enclosing scope
        targets = {n.id for g in gens for n in ast.walk(g.target) if isinstance(n, ast.Name)}
        self.scopes.append(targets)
        for g in gens:
            for sub in [g.iter, *g.ifs] if g is not gens[0] else g.ifs:
                self.visit(sub)
        for sub in parts:
            self.visit(sub)
        self.scopes.pop()

    def visit_ListComp(self, node: ast.ListComp) -> None:
        self._comprehension(node, [node.elt])

    visit_SetComp = visit_ListComp  # type: ignore[assignment]
    visit_GeneratorExp = visit_ListComp  # type: ignore[assignment]

    def visit_DictComp(self, node: ast.DictComp) -> None:
        self._comprehension(node, [node.key, node.value])


# ---------------------------------------------------------------- shake: keep what the roots reach


@dataclass
class _Unit:
    """One top-level statement, or one name of a top-level import statement."""

    stmt: int
    alias: int | None
    defines: set[str]
    effect: bool
    refs: set[tuple[str, str]] = field(default_factory=set)  # (module, name) it reads
    anywhere: set[str] = field(default_factory=set)  # names it may read of any module
    imports: set[str] = field(default_factory=set)


def _definition_names(stmt: ast.stmt) -> set[str] | None:
    """Names a side-effect-free top-level statement binds; None when running it may do more than bind."""
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        if any(_dotted(d) not in PURE_DECORATORS for d in stmt.decorator_list):
            return None
        return {stmt.name}
    if isinstance(stmt, (ast.Import, ast.ImportFrom)):
        if isinstance(stmt, ast.ImportFrom) and stmt.module == "__future__":
            return None
        return {(a.asname or a.name).split(".")[0] for a in stmt.names}
    if isinstance(stmt, (ast.Assign, ast.AnnAssign)):
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
        names = [n for t in targets for n in ast.walk(t) if not isinstance(n, (ast.Tuple, ast.List, ast.Store))]
        if names and all(isinstance(n, ast.Name) for n in names):
            return {n.id for n in names}  # type: ignore[attr-defined]
        return None
    if isinstance(stmt, ast.Pass):
        return set()
    if isinstance(stmt, (ast.Try, ast.If)):  # e.g. try: import tomllib / except: import tomli as tomllib
        inner = [*stmt.body, *stmt.orelse, *getattr(stmt, "finalbody", [])]
        inner += [s for h in getattr(stmt, "handlers", []) for s in h.body]
        found: set[str] = set()
        for s in inner:
            names = _definition_names(s)
            if names is None:
                return None
            found |= names
        return found
    return None


def _units(name: str, tree: ast.Module, is_package: bool, aliases: frozenset[str]) -> list[_Unit]:
    out = []
    base = name if is_package else name.rpartition(".")[0]
    for i, stmt in enumerate(tree.body):
        if isinstance(stmt, (ast.Import, ast.ImportFrom)) and _definition_names(stmt) is not None:
            for j, alias in enumerate(stmt.names):
                single = ast.copy_location(type(stmt)(**{**stmt.__dict__, "names": [alias]}), stmt)
                unit = _Unit(i, j, {(alias.asname or alias.name).split(".")[0]}, False)
                if isinstance(stmt, ast.ImportFrom):
                    unit.refs = {(from_module(stmt, base), alias.name)}
                unit.imports = imported_modules(name, single, is_package)
                out.append(unit)
            continue
        defines = _definition_names(stmt)
        unit = _Unit(i, None, defines or set(), defines is None)
        visitor = _Refs(aliases, name, base)
        visitor.visit(stmt)
        unit.refs, unit.anywhere = visitor.qualified(), visitor.anywhere
        unit.imports = imported_modules(name, stmt, is_package)
        out.append(unit)
    return out


def module_aliases(trees: dict[str, tuple[bool, ast.Module]]) -> frozenset[str]:
    """Names bound anywhere to a pgolf module object (`import pgolf.x`, `from pgolf.data import bytes`)."""
    out: set[str] = set()
    for name, (is_package, tree) in trees.items():
        base = name if is_package else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                out.update((a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith(PACKAGE))
            elif isinstance(node, ast.ImportFrom):
                mod = from_module(node, base)
                out.update(a.asname or a.name for a in node.names if f"{mod}.{a.name}" in trees)
    return frozenset(out)


def shake(trees: dict[str, tuple[bool, ast.Module]], entry: str, roots: set[str]) -> dict[str, tuple[bool, ast.Module]]:
    """The modules reachable from `entry` with only the top-level statements that the roots' names reach.
    A statement is live when a kept statement of its module reads a name it binds, another module imports
    that name from it, or an attribute of a pgolf module alias spells it (of any module: not resolved)."""
    aliases = module_aliases(trees)
    units = {name: _units(name, tree, pkg, aliases) for name, (pkg, tree) in trees.items()}
    live, anywhere, reached, kept = {(entry, r) for r in roots}, set(), set(), set()

    def reach(module: str) -> None:
        parts = module.split(".")
        reached.update(m for m in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if m in trees)

    reach(entry)
    changed = True
    while changed:
        changed = False
        for module in sorted(reached):
            for k, unit in enumerate(units[module]):
                if (module, k) in kept:
                    continue
                if not (unit.effect or unit.defines & anywhere or any((module, d) in live for d in unit.defines)):
                    continue
                kept.add((module, k))
                live |= unit.refs
                anywhere |= unit.anywhere
                for target in unit.imports:
                    reach(target)
                changed = True
    out = {}
    for module in sorted(reached):
        is_package, tree = trees[module]
        names_of: dict[int, list[int] | None] = {}  # kept statement -> its kept import names (None: whole)
        for k, unit in enumerate(units[module]):
            if (module, k) in kept:
                if unit.alias is None:
                    names_of[unit.stmt] = None
                else:
                    names_of.setdefault(unit.stmt, []).append(unit.alias)  # type: ignore[union-attr]
        body: list[ast.stmt] = []
        for i in sorted(names_of):
            stmt, names = tree.body[i], names_of[i]
            if names is not None:
                stmt = ast.copy_location(type(stmt)(**{**stmt.__dict__, "names": [stmt.names[j] for j in names]}), stmt)  # type: ignore[attr-defined]
            body.append(stmt)
        out[module] = (is_package, ast.Module(body=body, type_ignores=[]))
    return out


# ---------------------------------------------------------------- compact: the least whitespace


def _needs_space(prev: tokenize.TokenInfo, cur: tokenize.TokenInfo) -> bool:
    a, b = prev.string[-1], cur.string[0]
    word = a.isalnum() or a == "_"
    if word and (b.isalnum() or b == "_"):
        return True
    return prev.type == tokenize.NUMBER and (b.isalpha() or b in "._")


def _logical_lines(source: str) -> list[tuple[int, str, bool]]:
    """(indent depth, text with minimal spaces, whether it opens a block) per logical line."""
    lines_of = source.splitlines(keepends=True)
    offsets = [0]
    for line in lines_of:
        offsets.append(offsets[-1] + len(line))

    def at(pos: tuple[int, int]) -> int:
        return offsets[pos[0] - 1] + pos[1]

    out: list[tuple[int, str, bool]] = []
    depth, parts, prev, fstring_start, fstring_depth = 0, [], None, None, 0
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        kind = tok.type
        if fstring_depth:  # Python 3.12+ f-strings: copied verbatim, start to matching end
            fstring_depth += (tok.type == getattr(tokenize, "FSTRING_START", -1)) - (
                tok.type == getattr(tokenize, "FSTRING_END", -1)
            )
            if not fstring_depth:
                text = source[at(fstring_start) : at(tok.end)]
                tok = tok._replace(string=text, type=tokenize.STRING)
                parts.append(text)
                prev = tok
            continue
        if kind == getattr(tokenize, "FSTRING_START", -1):
            if prev is not None and _needs_space(prev, tok):
                parts.append(" ")
            fstring_start, fstring_depth = tok.start, 1
            continue
        if kind == tokenize.INDENT:
            depth += 1
        elif kind == tokenize.DEDENT:
            depth -= 1
        elif kind == tokenize.NEWLINE:
            out.append((depth, "".join(parts), prev is not None and prev.string == ":"))
            parts, prev = [], None
        elif kind not in (tokenize.NL, tokenize.COMMENT, tokenize.ENCODING, tokenize.ENDMARKER):
            if prev is not None and _needs_space(prev, tok):
                parts.append(" ")
            parts.append(tok.string)
            prev = tok
    return out


def compact(source: str) -> str:
    """`source` with one space per indent level, no optional spaces, and one-statement blocks joined to
    their header (`if x:return y`); refuses (MinifyError) if the result's AST differs from the input's."""
    lines = _logical_lines(source)
    out: list[str] = []
    i = 0
    while i < len(lines):
        depth, text, opens = lines[i]
        single = (
            opens
            and i + 1 < len(lines)
            and lines[i + 1][0] == depth + 1
            and not lines[i + 1][2]
            and (i + 2 == len(lines) or lines[i + 2][0] <= depth)
        )
        if single:
            out.append(" " * depth + text + lines[i + 1][1])
            i += 2
        else:
            out.append(" " * depth + text)
            i += 1
    result = "\n".join(out) + "\n"
    try:
        same = ast.dump(ast.parse(result)) == ast.dump(ast.parse(source))
    except SyntaxError:
        same = False
    if not same:
        raise MinifyError("compact changed the code's AST")
    return result
