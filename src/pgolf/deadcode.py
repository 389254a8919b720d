"""Dead-code passes on a bundle's AST after the config is folded into it (pgolf.fold), beside the literal
evaluation of pgolf.literals: parameters that every call site in the bundle passes the same literal become
that literal (`fold_constant_parameters`), and methods that nothing names any more are dropped
(`prune_methods`). Each pass keeps what it cannot prove dead.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass, field

from pgolf.literals import COMPREHENSIONS, literal_key, parameters, replace_loads, scope_bindings
from pgolf.minify import entry_point_name

_ATTRIBUTE_BUILTINS = frozenset({"getattr", "hasattr", "setattr", "delattr"})
# Methods a framework may call on our subclasses (torch calls forward, step, state_dict, ...): never folded
# or dropped. Bases outside this table and the bundle keep every method of their subclasses.
KNOWN_BASES = ("torch.nn.Module", "torch.optim.Optimizer", "torch.autograd.Function", "builtins.Exception")


def _protocol_names() -> frozenset[str]:
    import importlib

    names: set[str] = set(dir(object))
    for dotted in KNOWN_BASES:
        module, _, name = dotted.rpartition(".")
        names.update(dir(getattr(importlib.import_module(module), name)))
    return frozenset(names)


def _classes(trees: dict[str, ast.Module]) -> dict[str, list[ast.ClassDef]]:
    out: dict[str, list[ast.ClassDef]] = {}
    for tree in trees.values():
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                out.setdefault(node.name, []).append(node)
    return out


def _open_classes(classes: dict[str, list[ast.ClassDef]]) -> set[str]:
    """Classes whose methods code outside their own calls may reach: subclassed or subclassing in the
    bundle, decorated, or with a base neither bundled nor in KNOWN_BASES."""
    known = {b.rpartition(".")[2] for b in KNOWN_BASES}
    out = set()
    for name, nodes in classes.items():
        for node in nodes:
            bases = {ast.unparse(b).rpartition(".")[2] for b in node.bases}
            if len(nodes) > 1 or node.decorator_list or node.keywords or bases - known:
                out.add(name)
            out.update(bases & set(classes))
    return out


@dataclass
class _Uses:
    """How live code names things: calls and other reads, of a bare name (or `module.name`, the same
    function) apart from those of an attribute of any other object (a method)."""

    function_calls: dict[str, list[ast.Call]] = field(default_factory=dict)
    method_calls: dict[str, list[ast.Call]] = field(default_factory=dict)
    function_reads: set[str] = field(default_factory=set)
    method_reads: set[str] = field(default_factory=set)


def _uses(nodes: Iterable[ast.AST], modules: frozenset[str]) -> _Uses:
    """The _Uses of `nodes`; `modules`: names bound to pgolf modules. Annotations are not reads (never
    evaluated); a "pgolf.module:function" string is a read of the function (pgolf.eval.modes)."""
    uses = _Uses()
    skip: set[int] = set()
    for top in nodes:
        for node in ast.walk(top):
            if isinstance(node, ast.arg) and node.annotation is not None:
                skip.add(id(node.annotation))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns is not None:
                skip.add(id(node.returns))
            elif isinstance(node, ast.AnnAssign):
                skip.add(id(node.annotation))
    todo: list[tuple[ast.AST, frozenset[str]]] = [(n, frozenset()) for n in nodes]
    while todo:
        node, local = todo.pop()
        if id(node) in skip:
            continue
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            body = node.body if isinstance(node.body, list) else [node.body]
            bound, declared = scope_bindings(body)
            inner = (local | {a.arg for a in parameters(node.args)} | set(bound)) - declared
            todo.extend((n, local) for n in [*getattr(node, "decorator_list", []), *node.args.defaults])
            todo.extend((n, local) for n in node.args.kw_defaults if n is not None)
            todo.extend((n, frozenset(inner)) for n in body)
            continue
        if isinstance(node, COMPREHENSIONS):
            targets = {n.id for g in node.generators for n in ast.walk(g.target) if isinstance(n, ast.Name)}
            todo.extend((n, local | targets) for n in ast.iter_child_nodes(node))
            continue
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) or (isinstance(func, ast.Attribute) and getattr(func.value, "id", "") in modules):
                name = func.id if isinstance(func, ast.Name) else func.attr
                uses.function_calls.setdefault(name, []).append(node)
                todo.extend((n, local) for n in [*node.args, *node.keywords])
                continue
            if isinstance(func, ast.Attribute):
                uses.method_calls.setdefault(func.attr, []).append(node)
                todo.extend((n, local) for n in [func.value, *node.args, *node.keywords])
                continue
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in local:
            uses.function_reads.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            module_attr = getattr(node.value, "id", "") in modules
            (uses.function_reads if module_attr else uses.method_reads).add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            uses.function_reads |= {entry_point_name(node)}
        todo.extend((n, local) for n in ast.iter_child_nodes(node))
    return uses


def _spelled_attributes(nodes: Iterable[ast.AST]) -> set[str]:
    """Attribute names code spells as strings: getattr(x, "name"), hasattr, setattr, delattr. A computed
    name is not followed: the bundled code reads fields so (config sections, dataclasses), never methods."""
    out = set()
    for top in nodes:
        for node in ast.walk(top):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") in _ATTRIBUTE_BUILTINS:
                name = node.args[1] if len(node.args) > 1 else None
                if isinstance(name, ast.Constant) and isinstance(name.value, str):
                    out.add(name.value)
    return out


def _argument(call: ast.Call, fn: ast.FunctionDef, index: int, offset: int) -> ast.expr | None:
    """The expression `call` passes for parameter `index` of `fn` (offset: 1 when `call` binds self), or its
    default; None when the call uses * or ** or the parameter gets nothing."""
    if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
        return None
    a = fn.args
    positional = [*a.posonlyargs, *a.args]
    param = (positional + a.kwonlyargs)[index]
    for k in call.keywords:
        if k.arg == param.arg:
            return k.value
    if index < len(positional):
        pos = index - offset
        if 0 <= pos < len(call.args):
            return call.args[pos]
        defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
        return defaults[index]
    return a.kw_defaults[index - len(positional)]


def fold_constant_parameters(
    trees: dict[str, ast.Module], live: set[int], roots: set[str], modules: frozenset[str], done: set[tuple[int, int]]
) -> int:
    """Parameters that every call in the live code (top-level statements whose id is in `live`) passes
    the same literal, or leaves at the same literal default, are replaced by it in the function's body.
    Functions and methods are told apart by name: a name defined twice, read other than by a call, or a
    root (called from outside the bundle) is left alone. `modules`: names bound to pgolf modules. `done`:
    (id of def, parameter index) already folded, updated. Returns how many parameters were folded now."""
    protocol = _protocol_names()
    open_classes = _open_classes(_classes(trees))
    code = [stmt for tree in trees.values() for stmt in tree.body if id(stmt) in live]
    uses = _uses(code, modules)
    uses.method_reads |= _spelled_attributes(code)
    defs: dict[tuple[str, bool], list[ast.FunctionDef]] = {}  # (name, is a method) -> its definitions
    taken: set[str] = set()  # method names a framework or an open class may call: nothing of them folds
    for stmt in code:
        if isinstance(stmt, ast.FunctionDef):
            defs.setdefault((stmt.name, False), []).append(stmt)
        elif isinstance(stmt, ast.ClassDef):
            for m in stmt.body:
                if not isinstance(m, ast.FunctionDef):
                    continue
                if m.name == "__init__" and stmt.name not in open_classes:
                    defs.setdefault((stmt.name, False), []).append(m)  # called as ClassName(...)
                elif stmt.name in open_classes or m.name in protocol or m.name.startswith("__"):
                    taken.add(m.name)
                else:
                    defs.setdefault((m.name, True), []).append(m)
    folded = 0
    for (name, method), found in defs.items():
        calls = (uses.method_calls if method else uses.function_calls).get(name, [])
        reads = uses.method_reads if method else uses.function_reads
        if len(found) != 1 or name in reads or name in roots or not calls or (method and name in taken):
            continue
        fn = found[0]
        offset = 1 if method or fn.name == "__init__" else 0
        if fn.decorator_list or fn.args.vararg or fn.args.kwarg:
            continue
        count = len(fn.args.posonlyargs) + len(fn.args.args) + len(fn.args.kwonlyargs)
        for index in range(offset, count):
            keys = {literal_key(_argument(call, fn, index, offset)) for call in calls}
            if len(keys) == 1 and (id(fn), index) not in done:
                ((known, key),) = keys
                if known and replace_loads(fn, parameters(fn.args)[index].arg, key[1]):
                    done.add((id(fn), index))
                    folded += 1
    return folded


def _names_in(nodes: Iterable[ast.AST]) -> set[str]:
    out: set[str] = set()
    for top in nodes:
        for node in ast.walk(top):
            if isinstance(node, ast.Name):
                out.add(node.id)
            elif isinstance(node, ast.Attribute):
                out.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                out.update((node.value, node.value.rpartition(":")[2]))
    return out


def prune_methods(trees: dict[str, ast.Module]) -> None:
    """Drop (in place) the methods of closed classes that no kept code names: by attribute, name or string
    (getattr, hasattr); dunders, the methods frameworks call (KNOWN_BASES) and open classes stay."""
    protocol = _protocol_names()
    open_classes = _open_classes(_classes(trees))
    candidates: dict[int, ast.FunctionDef | ast.AsyncFunctionDef] = {}
    roots: list[ast.AST] = []
    for tree in trees.values():
        for stmt in tree.body:
            if not isinstance(stmt, ast.ClassDef) or stmt.name in open_classes:
                roots.append(stmt)
                continue
            roots.extend([*stmt.bases, *stmt.keywords, *stmt.decorator_list])
            for m in stmt.body:
                method = isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))
                if method and m.name not in protocol and not m.name.startswith("__"):
                    candidates[id(m)] = m  # type: ignore[assignment]
                else:
                    roots.append(m)
    alive = _names_in(roots)
    kept: set[int] = set()
    changed = True
    while changed:
        changed = False
        for key, m in candidates.items():
            if key not in kept and m.name in alive:
                kept.add(key)
                alive |= _names_in([m])
                changed = True
    for tree in trees.values():
        for stmt in tree.body:
            if isinstance(stmt, ast.ClassDef):
                stmt.body = [m for m in stmt.body if id(m) not in candidates or id(m) in kept] or [ast.Pass()]
