"""The bundle serves one config: its switches are folded into the code (pgolf.fold), dead branches, constant
parameters and unnamed methods go (pgolf.deadcode), and the bundle refuses env vars that would change a
folded field. The standalone run of a folded bundle is in test_submit_pipeline.py."""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

from test_submit_pipeline import run_without_pgolf

from pgolf.config import preset, to_toml
from pgolf.deadcode import fold_constant_parameters, prune_methods
from pgolf.fold import fold_config
from pgolf.literals import simplify
from pgolf.minify import module_aliases
from pgolf.singlefile import (
    ENTRY_MODULE,
    FEATURE_DEFINITIONS,
    _bundle_parts,
    build_bundle_source,
    bundle_modules,
    bundle_title,
    collect_modules,
    unpack,
)

HEADER = "from pgolf.config import RunConfig, ModelConfig\n"


def _fold(source: str, cfg=None, extra: str = "") -> tuple[str, set[str]]:
    """Fold `cfg` (pr1394 by default) into module pgolf.m (and pgolf.x = `extra`); (pgolf.m's code, fixed)."""
    parsed = {"pgolf.m": (False, ast.parse(HEADER + source)), "pgolf.x": (False, ast.parse(extra))}
    shipped = {name: tree for name, (_, tree) in parsed.items()}
    fixed = fold_config(parsed, shipped, cfg or preset("pr1394"), {"main"})
    return ast.unparse(parsed["pgolf.m"][1]), fixed


def test_a_switch_read_through_an_annotated_parameter_folds():
    src = (
        "def main(cfg: RunConfig):\n"
        "    m = cfg.model\n"
        "    if m.smear_gate and cfg.quant.compressor == 'pergroup':\n"
        "        return smear()\n"
        "    return plain(m.num_layers, cfg.data.dir, cfg.optim.matrix_lr)\n"
    )
    code, fixed = _fold(src)
    assert "smear()" not in code and "if " not in code
    # the data path never folds (DATA_DIR sets it), a learning rate read outside a test stays live
    assert "plain(m.num_layers, cfg.data.dir, cfg.optim.matrix_lr)" in code
    assert {"model.smear_gate", "quant.compressor"} <= fixed and "data.dir" not in fixed
    on = preset("pr1855")
    code_on, _ = _fold(src, on)
    assert "return smear()" in code_on and "if " not in code_on  # the test is True: its body is inlined


def test_numbers_fold_where_a_test_reads_them_and_self_attributes_follow():
    src = (
        "class Net:\n"
        "    def __init__(self, cfg: ModelConfig):\n"
        "        self.cfg = cfg\n"
        "    def forward(self, x):\n"
        "        if self.cfg.num_loops > 0:\n"
        "            x = loop(x)\n"
        "        return x * self.cfg.num_loops\n"
    )
    code, fixed = _fold(src)
    assert "loop(x)" in code and "if " not in code and "return x * 2" in code  # pr1394: num_loops = 2
    assert "model.num_loops" in fixed


def test_a_field_that_shipped_code_reassigns_is_not_folded():
    src = "def main(cfg: RunConfig):\n    if cfg.model.smear_gate:\n        return smear()\n"
    code, fixed = _fold(src, extra="def f(cfg):\n    cfg.model.smear_gate = True\n")
    assert "if cfg.model.smear_gate:" in code and "model.smear_gate" not in fixed
    code, fixed = _fold(src, extra="from dataclasses import replace\ndef f(m):\n    return replace(m, smear_gate=True)\n")
    assert "if cfg.model.smear_gate:" in code and "model.smear_gate" not in fixed
    # a rebound name proves nothing
    code, _ = _fold("def main(cfg: RunConfig, other):\n    if other:\n        cfg = other\n    if cfg.model.smear_gate:\n        return 1\n")
    assert "if cfg.model.smear_gate:" in code


def test_branches_holding_a_yield_are_never_cut():
    tree = ast.parse("def g():\n    if False:\n        yield 1\n    return 2\ndef h():\n    if False:\n        x = 1\n    return 3\n")
    code = ast.unparse(simplify(tree))
    assert "yield 1" in code and "x = 1" not in code


def test_locals_bound_once_to_a_literal_are_substituted_and_their_tests_evaluated():
    src = (
        "def validate(cfg):\n"
        "    head_dim = 64\n"
        "    if 16 > head_dim:\n"
        "        raise ValueError(head_dim)\n"
        "    n = 3\n"
        "    k = -2\n"
        "    return cfg.x * (n * 2 - 1) if k < -1 and head_dim / 2 == 32 else None\n"
        "def kept(a):\n"
        "    x = 1\n"
        "    def inner():\n"
        "        nonlocal x\n"
        "        x += 1\n"
        "    for i in range(3):\n"
        "        y = 2\n"
        "    if a:\n"
        "        z = 5\n"
        "    print(w)\n"
        "    w = 3\n"
        "    q = 1\n"
        "    return x, y, z, w, locals()\n"
    )
    code = ast.unparse(simplify(ast.parse(src)))
    assert code.startswith("def validate(cfg):\n    return cfg.x * 5\n")
    # a literal operand that cannot decide a test goes; `x and True` stays where its value is used
    tests = "def g(x, a, b):\n    if x and True:\n        return a == b and True, x and True, not (x or False)\n"
    assert ast.unparse(simplify(ast.parse(tests))).endswith("if x:\n        return (a == b, x and True, not x)")
    # nonlocal, bound in a loop or a branch, read before its assignment, read through locals(): kept
    for line in ("x = 1", "y = 2", "z = 5", "w = 3", "q = 1"):
        assert line in code, line


def _trees(**sources: str) -> dict[str, ast.Module]:
    return {f"pgolf.{name}": ast.parse(src) for name, src in sources.items()}


def test_parameters_every_call_passes_alike_fold():
    trees = _trees(
        a=(
            "def run(x, lora=None, verbose=True):\n"
            "    if lora is not None:\n"
            "        return adapt(x, lora)\n"
            "    return x if verbose else 0\n"
            "def main():\n"
            "    return run(1) + run(2, None, True)\n"
        )
    )
    live = {id(s) for t in trees.values() for s in t.body}
    done: set = set()
    modules = module_aliases({k: (False, v) for k, v in trees.items()})
    assert fold_constant_parameters(trees, live, {"main"}, modules, done) == 2
    code = ast.unparse(simplify(trees["pgolf.a"]))
    assert "adapt" not in code and "return x" in code
    # one call passing a variable keeps the parameter live
    trees = _trees(a="def run(x, lora=None):\n    if lora is not None:\n        return adapt(x, lora)\n    return x\ndef main(l):\n    return run(1) + run(2, lora=l)\n")
    live = {id(s) for t in trees.values() for s in t.body}
    assert fold_constant_parameters(trees, live, {"main"}, modules, set()) == 0
    assert "adapt" in ast.unparse(trees["pgolf.a"])


def test_methods_nothing_names_are_dropped():
    trees = _trees(
        a=(
            "import torch\n"
            "class Trainer:\n"
            "    def __init__(self):\n        self.step()\n"
            "    def step(self):\n        return self.helper()\n"
            "    def helper(self):\n        return 1\n"
            "    def restore(self):\n        return self.unused_too()\n"
            "    def unused_too(self):\n        return 2\n"
            "class Net(torch.nn.Module):\n"
            "    def forward(self, x):\n        return x\n"
            "    def extra(self):\n        return 3\n"
            "def probe(m):\n    return hasattr(m, 'probed')\n"
            "class P:\n    def probed(self):\n        return 4\n"
        )
    )
    prune_methods(trees)
    code = ast.unparse(trees["pgolf.a"])
    assert "def step" in code and "def helper" in code and "def forward" in code and "def probed" in code
    assert "def restore" not in code and "def unused_too" not in code and "def extra" not in code


def test_recipe_bundles_carry_only_the_features_their_config_uses():
    mods_1394, fixed_1394 = _bundle_parts(preset("pr1394"), True, ENTRY_MODULE)
    mods_1855 = bundle_modules(preset("pr1855"), packed=True)
    per_group = {"pgolf.quant.codecs", "pgolf.quant.reorder"}  # quant.compressor = "pergroup"
    assert not per_group & set(mods_1394) and per_group <= set(mods_1855)
    # quant.lqer_top_k = 0: nothing live needs the LQER module (fit.py's replace(q, lqer_top_k=0) writes the
    # value it already has); pgolf.quant's re-export of it goes with it
    assert "pgolf.quant.lqer" not in mods_1394 and "pgolf.quant.lqer" in mods_1855
    assert "lqer" not in mods_1394["pgolf.quant"][1] and "quant.lqer_top_k" in fixed_1394
    for name, (_, source) in {**mods_1394, **mods_1855}.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. `8192 is not None` from a folded parameter
            compile(source, name, "exec")
    text_1394 = "".join(src for _, src in mods_1394.values())
    text_1855 = "".join(src for _, src in mods_1855.values())
    for name in ("def _decode_pergroup", "def lqer_correction", "def fit_to_cap", "def smear", "def restore"):
        assert name not in text_1394, name
    for name in ("def _decode_pergroup", "def lqer_correction", "def smear"):
        assert name in text_1855, name


def test_a_bundle_refuses_an_env_var_that_changes_a_folded_field(tmp_path: Path):
    """pr1394's bundle has no smear gate in its code: SMEAR_GATE_ENABLED=1 stops it before any work."""
    script = tmp_path / "train_gpt.py"
    script.write_text(build_bundle_source(to_toml(preset("pr1394")), bundle_title("pr1394"), packed=True))
    assert "FIXED=(" in unpack(script.read_text())
    proc = run_without_pgolf(script, tmp_path, SMEAR_GATE_ENABLED="1", RUN_DIR=str(tmp_path / "run"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(
        "train_gpt.py: model.smear_gate=True: this train_gpt.py was built for model.smear_gate=False"
    )
    assert not (tmp_path / "run").exists()


def test_every_feature_definition_names_a_definition():
    """A renamed function would silently stay in every bundle: each entry must name a top-level def."""
    modules = collect_modules()
    for _, names in FEATURE_DEFINITIONS:
        for entry in names:
            module, _, name = entry.partition(":")
            tree = ast.parse(modules[module][1])
            assert any(getattr(s, "name", None) == name for s in tree.body), entry
