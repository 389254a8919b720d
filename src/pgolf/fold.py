"""Constant-folding of the run's config into the bundle: a bundle serves one config, so the reads of its
switches are literals, the branches they close are dead, and `pgolf.minify.shake` then drops the code that
only those branches reached (a codec, LQER, the LoRA hooks, the checks of values fixed in the bundle).

What is folded, and why it is sound:
- A config read is an attribute chain on a name whose config class is proven in its function: a parameter
  annotated with a config class and never rebound, a local bound exactly once to a config read
  (`qcfg = cfg.quant`, `m, e = cfg.model, cfg.eval`), or `self.<attr>` in the methods of a class whose every
  assignment to `.<attr>`, anywhere, is `self.<attr> = <config read>` of one and the same section.
- A field is folded when its value is a literal (bool, str, None, finite number; a list only as the right
  side of `in`) and no shipped code outside the env path gives it another value (`replace(cfg, f=...)`,
  `x.f = ...`): then every config instance the bundle's code sees carries the bundled value. Switches
  (bool, str, None) fold everywhere; numbers fold where a test reads them. The data paths and the seed,
  which a record run sets from the environment, never fold.
- The environment is the one way the values still change: the bundle passes the folded fields to
  `record.main`, which refuses (one line, before any work) an env var that changes one of them.
- Locals bound once to a folded literal, and `self.<attr>` bound (in every assignment) to one, are
  substituted as well; then constant tests are evaluated and dead branches cut. A branch holding a `yield`
  or a `global`/`nonlocal` declaration is never cut (it changes what the function is).
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass, field, fields
from typing import Any

from pgolf.config import RunConfig
from pgolf.config.schema import SECTIONS
from pgolf.deadcode import fold_constant_parameters
from pgolf.literals import literal_key, make_const, parameters, scope_bindings, simplify, walk_scope
from pgolf.minify import module_aliases

# Annotation name -> the config path of its instances ("" = the RunConfig itself).
CONFIG_CLASSES = {
    "RunConfig": "",
    "DataConfig": "data",
    "ModelConfig": "model",
    "OptimConfig": "optim",
    "TrainConfig": "train",
    "QuantConfig": "quant",
    "EvalConfig": "eval",
}
LITERAL = "literal"  # (LITERAL, value, its type): a `self.<attr>` every assignment of which binds that literal
# Functions returning the run's RunConfig: in a bundled run every run-directory config.toml was written
# from the run's config (a run directory trained under another config is refused by its fingerprints).
CONFIG_LOADERS = frozenset({"load_run_config"})
# Set from the environment by every record run (DATA_DIR, SEED): never fixed in the bundle.
NEVER_FOLD = frozenset({"data.dir", "data.tokenizer", "train.seed"})
# Modules that write config fields only while applying the environment (which record.main guards).
ENV_WRITERS = frozenset({"pgolf.config.env", "pgolf.config.overrides"})


def _literal(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, (bool, int, str))


def _assigned_pairs(node: ast.AST) -> list[tuple[ast.expr, ast.expr]]:
    """(target, value) of a simple assignment (`a = v`, `a, b = v, w`), else []."""
    if not isinstance(node, ast.Assign) or len(node.targets) != 1:
        return []
    target, value = node.targets[0], node.value
    if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple) and len(target.elts) == len(value.elts):
        return list(zip(target.elts, value.elts))
    return [] if isinstance(target, (ast.Tuple, ast.List)) else [(target, value)]


def _single_assignments(body: list[ast.stmt]) -> list[tuple[str, ast.expr]]:
    """(name, value) of the simple assignments to names in one scope, in source order."""
    out = []
    for node in body:
        for sub in walk_scope(node):
            out.extend((t.id, v) for t, v in _assigned_pairs(sub) if isinstance(t, ast.Name))
    return out


@dataclass
class Folding:
    """The run's config values and what the passes learned: which fields were folded."""

    cfg: RunConfig
    values: dict[str, Any] = field(default_factory=dict)
    unstable: set[str] = field(default_factory=set)  # field names some shipped code re-assigns
    folded: set[str] = field(default_factory=set)
    numeric_tests: set[str] = field(default_factory=set)  # number fields a test reads: folded
    self_attrs: dict[str, dict[str, Any]] = field(default_factory=dict)  # class -> attr -> path/Constant

    def __post_init__(self) -> None:
        self.values["preset"] = self.cfg.preset
        for section in SECTIONS:
            obj = getattr(self.cfg, section)
            for f in fields(obj):
                self.values[f"{section}.{f.name}"] = getattr(obj, f.name)

    def child(self, path: str, attr: str) -> str | None:
        if path == "":
            return attr if attr in SECTIONS or attr == "preset" else None
        if path in SECTIONS and f"{path}.{attr}" in self.values:
            return f"{path}.{attr}"
        return None

    def foldable(self, path: str, in_test: bool, in_membership: bool) -> bool:
        if path not in self.values or path in NEVER_FOLD or path.rpartition(".")[2] in self.unstable:
            return False
        value = self.values[path]
        if isinstance(value, list):
            return in_membership and all(_literal(v) for v in value)
        if not _literal(value):
            return False
        if value is None or isinstance(value, (bool, str)):
            return True
        return in_test or path in self.numeric_tests


def _method_self_targets(trees: dict[str, ast.Module]) -> set[int]:
    """ids of the `self.x` targets assigned in the methods of non-config classes: writes to an instance of
    that class, never to a config section."""
    out = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef) or node.name in CONFIG_CLASSES:
                continue
            for method in filter(_is_method, node.body):
                params = parameters(method.args)  # type: ignore[attr-defined]
                for sub in walk_scope(method):
                    if isinstance(sub, ast.Attribute) and not isinstance(sub.ctx, ast.Load) and params:
                        if isinstance(sub.value, ast.Name) and sub.value.id == params[0].arg:
                            out.add(id(sub))
    return out


def _unstable_fields(trees: dict[str, ast.Module], values: dict[str, Any]) -> set[str]:
    """Config field names that shipped code outside the env path may give a new value. Writing the literal
    that every field of that name holds in the run's config (`replace(q, lqer_top_k=0)` when it is 0)
    changes nothing."""
    bundled: dict[str, set[Any]] = {}
    for path, value in values.items():
        bundled.setdefault(path.rpartition(".")[2], set()).add(literal_key(make_const(value))[1])

    def changes(name: str, value: ast.expr | None) -> bool:
        known, key = literal_key(value)
        return name in bundled and not (known and bundled[name] == {key})

    out = set()
    self_targets = _method_self_targets(trees)
    for module, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "replace":
                out.update(k.arg for k in node.keywords if k.arg and changes(k.arg, k.value))
            if module in ENV_WRITERS:
                continue
            targets, value = [], None
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
                targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
                value = node.value if isinstance(node, ast.Assign) and len(targets) == 1 else None
            for t in targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Attribute) and id(n) not in self_targets and changes(n.attr, value if n is t else None):
                        out.add(n.attr)
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("setattr", "delattr"):
                out.update(bundled)  # a computed field name: nothing can be proven stable
    return out


class _Scope:
    """The names of one function scope whose config path (or folded literal) is proven."""

    def __init__(self, fold: Folding, outer: dict[str, Any], node: ast.AST, cls: str | None) -> None:
        body = node.body if isinstance(node.body, list) else [node.body]  # type: ignore[attr-defined]
        params = parameters(node.args) if hasattr(node, "args") else []  # type: ignore[attr-defined]
        count, declared = scope_bindings(body)
        for p in params:
            count[p.arg] = count.get(p.arg, 0) + 1
        self.fold, self.cls = fold, cls
        self.self_name = params[0].arg if cls is not None and params else None
        self.env = {k: v for k, v in outer.items() if k not in count and k not in declared}
        for p in params:
            name = ast.unparse(p.annotation) if p.annotation is not None else ""
            if name in CONFIG_CLASSES and count[p.arg] == 1:
                self.env[p.arg] = CONFIG_CLASSES[name]
        for _ in range(3):  # chains of aliases: qcfg = cfg.quant; q = qcfg
            for name, value in _single_assignments(body):
                if count.get(name) == 1 and name not in declared:
                    resolved = self.resolve(value)
                    if resolved is not None:
                        self.env[name] = resolved

    def resolve(self, node: ast.AST) -> Any:
        """The config path `node` reads, an ast.Constant it is proven to hold, or None."""
        if isinstance(node, ast.Name):
            return self.env.get(node.id)
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in CONFIG_LOADERS:
            return ""
        if not isinstance(node, ast.Attribute):
            return None
        if isinstance(node.value, ast.Name) and node.value.id == self.self_name and self.cls is not None:
            found = self.fold.self_attrs.get(self.cls, {}).get(node.attr)
            if found is not None:
                return found
        base = self.resolve(node.value)
        return self.fold.child(base, node.attr) if isinstance(base, str) else None


def _function_scopes(tree: ast.AST, fold: Folding, outer: dict[str, Any] | None = None, cls: str | None = None):
    """(scope node, _Scope) for every function and lambda, outermost first."""
    outer = outer or {}
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.ClassDef):
            yield from _function_scopes(child, fold, outer, child.name)
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            scope = _Scope(fold, outer, child, cls if not isinstance(child, ast.Lambda) else None)
            yield child, scope
            yield from _function_scopes(child, fold, scope.env, None)
        else:
            yield from _function_scopes(child, fold, outer, cls)


def _is_method(node: ast.AST) -> bool:
    return isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not any(
        ast.unparse(d) in ("staticmethod", "classmethod") for d in node.decorator_list
    )


def _self_attributes(trees: dict[str, ast.Module], fold: Folding) -> dict[str, dict[str, Any]]:
    """class -> {attr: config path} for the attributes every one of whose assignments, in the whole
    bundle, is `self.attr = <read>` in a method (no class body declares it), the reads of one class all
    of the same path (classes in an inheritance relation with another bundled class are left out)."""
    sites: dict[str, list[tuple[str, Any]]] = {}  # attr -> (class, resolved path) per assignment
    self_sites: set[int] = set()
    unsafe: set[str] = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef):
                continue
            for stmt in node.body:
                if not _is_method(stmt):  # class-level bindings: dataclass fields, class attributes
                    unsafe.update(f"{node.name}.{name}" for name in scope_bindings([stmt])[0])
                    continue
                scope = _Scope(fold, {}, stmt, node.name)
                for sub in walk_scope(stmt):
                    for t, value in _assigned_pairs(sub):
                        if isinstance(t, ast.Attribute) and getattr(t.value, "id", None) == scope.self_name:
                            found = scope.resolve(value)
                            if isinstance(value, ast.Constant) and _literal(value.value):
                                found = (LITERAL, value.value, type(value.value))  # `self.gate = None`, folded
                            sites.setdefault(t.attr, []).append((node.name, found))
                            self_sites.add(id(t))
    for module, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and not isinstance(node.ctx, ast.Load) and id(node) not in self_sites:
                unsafe.add(node.attr)  # any other write: `x.attr = ...`, `self.attr += 1`, `for self.attr in`
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("setattr", "delattr"):
                name = node.args[1] if len(node.args) > 1 else None
                if isinstance(name, ast.Constant) and isinstance(name.value, str):
                    unsafe.add(name.value)
                elif module not in ENV_WRITERS:  # the env path sets fields of config sections only
                    return {}
    related = set()  # classes that inherit from, or are inherited by, a bundled class: left alone
    classes = {n.name: n for tree in trees.values() for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
    for name, node in classes.items():
        bases = {ast.unparse(b).rpartition(".")[2] for b in node.bases} & set(classes)
        if bases:
            related |= bases | {name}
    out: dict[str, dict[str, Any]] = {}
    for attr, found in sites.items():
        if attr in unsafe:
            continue
        for cls in {c for c, _ in found} - related - {c for c, _ in found if f"{c}.{attr}" in unsafe}:
            paths = {path for c, path in found if c == cls}
            if len(paths) == 1 and None not in paths:
                out.setdefault(cls, {})[attr] = paths.pop()
    return out


class _Substitute(ast.NodeTransformer):
    """Within one scope (nested scopes are visited on their own): proven reads of folded fields become
    literals; with `collect`, only note the number fields that tests read."""

    def __init__(self, scope: _Scope, fold: Folding, collect: bool) -> None:
        self.scope, self.fold, self.collect = scope, fold, collect
        self.in_test = 0
        self.membership: ast.AST | None = None
        self.identity: set[int] = set()  # operands of `is` beside something not None/True/False

    def _skip(self, node: ast.AST) -> ast.AST:
        return node

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = visit_ClassDef = _skip

    def _comprehension(self, node: ast.AST) -> ast.AST:
        targets = {n.id for g in node.generators for n in ast.walk(g.target) if isinstance(n, ast.Name)}  # type: ignore[attr-defined]
        return node if targets & set(self.scope.env) else self.generic_visit(node)

    visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = _comprehension

    def _tested(self, node: ast.AST) -> ast.AST:
        self.in_test += 1
        node.test = self.visit(node.test)  # type: ignore[attr-defined]
        self.in_test -= 1
        for name, value in ast.iter_fields(node):
            if name == "test":
                continue
            if isinstance(value, list):
                setattr(node, name, [self.visit(v) for v in value])
            elif isinstance(value, ast.AST):
                setattr(node, name, self.visit(value))
        return node

    visit_If = visit_While = visit_IfExp = visit_Assert = _tested

    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        self.in_test += 1
        if any(isinstance(o, (ast.Is, ast.IsNot)) for o in node.ops):  # `5 is x`: a SyntaxWarning
            operands = [node.left, *node.comparators]
            for o in operands:
                others = [p for p in operands if p is not o]
                if not all(isinstance(p, ast.Constant) and (p.value is None or isinstance(p.value, bool)) for p in others):
                    self.identity.add(id(o))
        node.left = self.visit(node.left)
        for i, (op, comp) in enumerate(zip(node.ops, node.comparators)):
            self.membership = comp if isinstance(op, (ast.In, ast.NotIn)) else None
            node.comparators[i] = self.visit(comp)
        self.membership = None
        self.in_test -= 1
        return node

    def _decision(self, node: ast.AST) -> ast.AST:
        self.in_test += 1
        node = self.generic_visit(node)
        self.in_test -= 1
        return node

    visit_BoolOp = _decision

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.AST:
        return self._decision(node) if isinstance(node.op, ast.Not) else self.generic_visit(node)

    def _read(self, node: ast.Attribute | ast.Name) -> ast.AST:
        path = self.scope.resolve(node) if isinstance(node.ctx, ast.Load) else None
        membership, self.membership = self.membership is node, None
        if isinstance(path, tuple) and not self.collect:  # (LITERAL, value, type): an attribute's only value
            if id(node) in self.identity and not (path[1] is None or isinstance(path[1], bool)):
                return node
            return ast.copy_location(make_const(path[1]), node)
        if not isinstance(path, str) or path not in self.fold.values:
            return self.generic_visit(node)
        value = self.fold.values[path]
        if self.collect:
            if self.in_test and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.fold.numeric_tests.add(path)
            return node
        if not self.fold.foldable(path, self.in_test > 0, membership):
            return node
        if id(node) in self.identity and not (value is None or isinstance(value, bool)):
            return node
        self.fold.folded.add(path)
        return ast.copy_location(make_const(value), node)

    visit_Attribute = visit_Name = _read


def fold_config(
    parsed: dict[str, tuple[bool, ast.Module]], shipped: dict[str, ast.Module], cfg: RunConfig, roots: set[str]
) -> set[str]:
    """Fold `cfg` into the bundled modules' trees ({module: (is_package, tree)}, changed in place, before
    strip_tree: annotations prove types); returns the dotted fields whose values the bundle now fixes.
    `shipped`: the code the bundle keeps before folding (minify.shake), a superset of what runs: only its
    writes can change a field, only its calls pass parameters. `roots`: functions called from outside."""
    trees = {name: tree for name, (_, tree) in parsed.items()}
    fold = Folding(cfg)
    fold.unstable = _unstable_fields(shipped, fold.values)
    for _ in range(2):  # the second round: attributes that the first one left bound to one literal
        fold.self_attrs = _self_attributes(shipped, fold)
        for collect in (True, False):
            for tree in trees.values():
                for node, scope in list(_function_scopes(tree, fold)):
                    sub = _Substitute(scope, fold, collect)
                    if isinstance(node, ast.Lambda):
                        node.body = sub.visit(node.body)
                    else:
                        node.body = [sub.visit(s) for s in node.body]  # type: ignore[attr-defined]
        for tree in trees.values():
            simplify(tree)
    live = {id(stmt) for tree in shipped.values() for stmt in tree.body}
    done: set[tuple[int, int]] = set()
    modules = module_aliases(parsed)
    while fold_constant_parameters(trees, live, roots, modules, done):
        for tree in trees.values():
            simplify(tree)
    return fold.folded
