"""Literal evaluation on a bundle's AST (the config already folded into it, pgolf.fold): tests made of
literals are evaluated and only the branch that runs is kept, and a function's local bound exactly once, to
a literal, is replaced by it (`simplify`); plus the scope helpers the dead-code passes share.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Iterable
from typing import Any

_COMPARE = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.Is: operator.is_,
    ast.IsNot: operator.is_not,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}
_ARITH = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Mod: operator.mod,
    ast.FloorDiv: operator.floordiv,
    ast.Div: operator.truediv,
}
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)
COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


def _const(node: ast.AST) -> tuple[bool, Any]:
    """(is a literal, its value): a Constant, or a tuple of Constants."""
    if isinstance(node, ast.Constant):
        return True, node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
        value = node.operand.value  # a negative number, as make_const writes it
        return (True, -value) if isinstance(value, (int, float)) and not isinstance(value, bool) else (False, None)
    if isinstance(node, ast.Tuple) and all(isinstance(e, ast.Constant) for e in node.elts):
        return True, tuple(e.value for e in node.elts)  # type: ignore[attr-defined]
    return False, None


def make_const(value: Any) -> ast.expr:
    if isinstance(value, (list, tuple)):
        return ast.Tuple(elts=[ast.Constant(v) for v in value], ctx=ast.Load())
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
        return ast.UnaryOp(op=ast.USub(), operand=ast.Constant(-value))  # as the parser writes it
    return ast.Constant(value)


def scope_bindings(body: Iterable[ast.AST]) -> tuple[dict[str, int], set[str]]:
    """(binding sites per name in one scope, names declared global/nonlocal), nested scopes not entered
    except for walrus targets, which bind in the enclosing function."""
    count: dict[str, int] = {}
    declared: set[str] = set()
    todo = list(body)

    def bind(name: str) -> None:
        count[name] = count.get(name, 0) + 1

    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bind(node.name)
            todo.extend(node.decorator_list)
            continue
        if isinstance(node, ast.Lambda):
            continue
        if isinstance(node, COMPREHENSIONS):
            todo.extend(n for n in ast.walk(node) if isinstance(n, ast.NamedExpr))
            continue
        if isinstance(node, (ast.Global, ast.Nonlocal)):
            declared.update(node.names)
        elif isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            bind(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for a in node.names:
                bind((a.asname or a.name).split(".")[0])
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bind(node.name)
        elif isinstance(node, ast.MatchAs | ast.MatchStar) and node.name:  # type: ignore[operator]
            bind(node.name)
        todo.extend(ast.iter_child_nodes(node))
    return count, declared


def parameters(args: ast.arguments) -> list[ast.arg]:
    return [a for a in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg] if a]


def walk_scope(node: ast.AST) -> Iterable[ast.AST]:
    """ast.walk, not entering nested functions, lambdas, classes or comprehensions."""
    todo = [node]
    while todo:
        sub = todo.pop()
        yield sub
        for child in ast.iter_child_nodes(sub):
            if not isinstance(child, (*_SCOPES, *COMPREHENSIONS)):
                todo.append(child)


def _truthy(node: ast.AST) -> tuple[bool, bool]:
    """(is a literal, its truth value)."""
    known, value = _const(node)
    return (True, bool(value)) if known else (False, False)


def _cuts_function(body: list[ast.stmt]) -> bool:
    """A yield (makes the function a generator) or a global/nonlocal declaration (changes its scope)."""
    for stmt in body:
        for sub in walk_scope(stmt):
            if isinstance(sub, (ast.Yield, ast.YieldFrom, ast.Await, ast.Global, ast.Nonlocal)):
                return True
    return False


def _boolean(node: ast.AST) -> bool:
    """Whether `node` always evaluates to a bool (a comparison, a `not`, a bool literal)."""
    if isinstance(node, ast.BoolOp):
        return all(_boolean(v) for v in node.values)
    return isinstance(node, ast.Compare) or isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not) or (
        isinstance(node, ast.Constant) and isinstance(node.value, bool)
    )


def _truth_only(node: ast.expr) -> ast.expr:
    """`node`, read only for its truth (an `if`/`while` test): the literal operands of its `and`/`or` that
    cannot decide it go (`x and True` tests as `x`)."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        node.operand = _truth_only(node.operand)
    if not isinstance(node, ast.BoolOp):
        return node
    neutral = isinstance(node.op, ast.And)  # the truth value an operand needs to let the next one decide
    values = [v for v in map(_truth_only, node.values) if _truthy(v) != (True, neutral)] or [ast.Constant(neutral)]
    return values[0] if len(values) == 1 else ast.copy_location(ast.BoolOp(op=node.op, values=values), node)


class _Simplify(ast.NodeTransformer):
    """Evaluate tests made of literals and keep only the branch that runs."""

    def visit_BoolOp(self, node: ast.BoolOp) -> ast.AST:
        self.generic_visit(node)
        keep: list[ast.expr] = []
        for i, value in enumerate(node.values):
            known, truth = _truthy(value)
            last = i == len(node.values) - 1
            if known and truth == isinstance(node.op, ast.And) and not last:
                continue  # `True and y` is y, `False or y` is y
            keep.append(value)
            if known:
                break  # `False and y` is False, `True or y` is True: y never runs
        if len(keep) > 1 and _truthy(keep[-1]) == (True, isinstance(node.op, ast.And)) and _boolean(keep[-2]):
            keep.pop()  # `a == b and True` is `a == b`
        return keep[0] if len(keep) == 1 else ast.copy_location(ast.BoolOp(op=node.op, values=keep), node)

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.AST:
        self.generic_visit(node)
        node.operand = _truth_only(node.operand) if isinstance(node.op, ast.Not) else node.operand
        known, truth = _truthy(node.operand)
        if known and isinstance(node.op, ast.Not):
            return ast.copy_location(ast.Constant(not truth), node)
        return node

    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        self.generic_visit(node)
        (ka, a), (kb, b) = _const(node.left), _const(node.right)
        op = _ARITH.get(type(node.op))
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
        if ka and kb and op is not None and numbers and not (isinstance(node.op, (ast.Mod, ast.FloorDiv, ast.Div)) and b == 0):
            value = op(a, b)
            return ast.copy_location(make_const(value), node) if math.isfinite(value) else node
        return node

    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        self.generic_visit(node)
        operands = [_const(n) for n in [node.left, *node.comparators]]
        values = [v for _, v in operands]
        singletons = any(v is None or isinstance(v, bool) for v in values)  # `x is None`: defined for any x
        if not all(k for k, _ in operands) or (any(isinstance(o, (ast.Is, ast.IsNot)) for o in node.ops) and not singletons):
            return node
        result = all(_COMPARE[type(op)](values[i], values[i + 1]) for i, op in enumerate(node.ops))
        return ast.copy_location(ast.Constant(result), node)

    def visit_IfExp(self, node: ast.IfExp) -> ast.AST:
        self.generic_visit(node)
        node.test = _truth_only(node.test)
        known, truth = _truthy(node.test)
        return (node.body if truth else node.orelse) if known else node

    def visit_If(self, node: ast.If) -> Any:
        self.generic_visit(node)
        node.test = _truth_only(node.test)
        known, truth = _truthy(node.test)
        if not known or _cuts_function(node.orelse if truth else node.body):
            return node
        return node.body if truth else node.orelse

    def visit_While(self, node: ast.While) -> Any:
        self.generic_visit(node)
        node.test = _truth_only(node.test)
        known, truth = _truthy(node.test)
        return node.orelse if known and not truth and not _cuts_function(node.body) else node


class _FillEmpty(ast.NodeTransformer):
    """A body that cut branches emptied gets `pass` (an empty orelse / finalbody is valid as it is)."""

    def generic_visit(self, node: ast.AST) -> ast.AST:
        super().generic_visit(node)
        if getattr(node, "body", None) == [] and not isinstance(node, ast.Module):
            node.body = [ast.Pass()]  # type: ignore[attr-defined]
        return node


def simplify(tree: ast.Module) -> ast.Module:
    """`tree` with literal tests evaluated, dead branches cut and locals bound once to a literal replaced
    by it (in place), repeated while the last step finds something."""
    while True:
        tree = _FillEmpty().visit(_Simplify().visit(tree))
        if not _propagate_locals(tree):
            return ast.fix_missing_locations(tree)


# Builtins that read a function's locals by name: a function calling one keeps all its assignments.
_DYNAMIC_SCOPE = frozenset({"locals", "vars", "eval", "exec"})
SHORT_STRING = 6  # a longer string literal is substituted only where its name is read once (bytes)


def _propagate_locals(tree: ast.Module) -> int:
    """In every function, a local bound exactly once, by a statement of the function's own body
    `name = <literal>` that no statement before it reads, becomes that literal in the statements after
    it, and the assignment goes (replace_loads refuses when a nested scope binds the name). Returns how
    many assignments went."""
    done = 0
    for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
        if any(isinstance(n, ast.Name) and n.id in _DYNAMIC_SCOPE for n in ast.walk(fn)):
            continue
        count, declared = scope_bindings(fn.body)
        params = {a.arg for a in parameters(fn.args)}
        for stmt in list(fn.body):
            target = stmt.targets[0] if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 else None
            known, key = literal_key(stmt.value) if isinstance(target, ast.Name) else (False, None)
            if not known or count.get(target.id) != 1 or target.id in params | declared or stmt not in fn.body:
                continue
            name, i = target.id, fn.body.index(stmt)
            reads = [n for n in ast.walk(fn) if isinstance(n, ast.Name) and n.id == name and n is not target]
            if any(n is r for s in fn.body[:i] for n in ast.walk(s) for r in reads):
                continue  # read before it is bound: a NameError the literal would hide
            if isinstance(key[1], str) and len(key[1]) > SHORT_STRING and len(reads) > 1:
                continue
            fn.body.pop(i)
            if replace_loads(fn, name, key[1]):
                done += 1
            else:
                fn.body.insert(i, stmt)
    return done


def literal_key(node: ast.expr | None) -> tuple[bool, Any]:
    known, value = _const(node) if node is not None else (False, None)
    immutable = value is None or isinstance(value, (bool, int, float, str))
    return (True, (type(value), value)) if known and immutable else (False, None)


def _identity_tested(fn: ast.AST, name: str) -> bool:
    """Whether `name` is an operand of `is` / `is not` beside anything but None, True or False."""
    for node in ast.walk(fn):
        if isinstance(node, ast.Compare) and any(isinstance(o, (ast.Is, ast.IsNot)) for o in node.ops):
            operands = [node.left, *node.comparators]
            if any(isinstance(o, ast.Name) and o.id == name for o in operands):
                others = [o for o in operands if not (isinstance(o, ast.Name) and o.id == name)]
                if not all(isinstance(o, ast.Constant) and (o.value is None or isinstance(o.value, bool)) for o in others):
                    return True
    return False


def replace_loads(fn: ast.AST, name: str, value: Any) -> bool:
    """Replace the reads of parameter `name` in `fn`'s body (nested scopes included) by `value`; refuses
    (False, nothing changed) when anything in the body binds or declares `name` again."""
    own = {id(a) for a in parameters(fn.args)}  # type: ignore[attr-defined]
    for node in ast.walk(fn):
        if node is fn or id(node) in own:
            continue
        if isinstance(node, ast.Name) and node.id == name and not isinstance(node.ctx, ast.Load):
            return False
        if isinstance(node, (ast.Global, ast.Nonlocal)) and name in node.names:
            return False
        if isinstance(node, ast.arg) and node.arg == name:
            return False
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return False
        if isinstance(node, (ast.Import, ast.ImportFrom)) and any((a.asname or a.name) == name for a in node.names):
            return False
        if isinstance(node, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)) and node.name == name:
            return False

    if not (value is None or isinstance(value, bool)) and _identity_tested(fn, name):
        return False  # `5 is x` is a SyntaxWarning, and says nothing about equality

    class _Put(ast.NodeTransformer):
        def visit_Name(self, node: ast.Name) -> ast.AST:
            return ast.copy_location(make_const(value), node) if node.id == name else node

    fn.body = [_Put().visit(s) for s in fn.body]  # type: ignore[attr-defined]
    return True
