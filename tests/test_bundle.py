"""The bundle ships only what a recipe runs: the minify passes (strip, shake, compact), the per-plan module
set, the packed shim and the embedded config. The standalone run of a bundle is in test_submit_pipeline.py."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_submit_pipeline import run_without_pgolf

from pgolf.config import PRESETS, preset, to_toml
from pgolf.config.overrides import from_dict, tomllib
from pgolf.minify import MinifyError, compact, shake, strip_tree
from pgolf.singlefile import (
    _string_literal,
    build_bundle_source,
    bundle_modules,
    bundle_title,
    check_py310,
    collect_modules,
    config_delta_toml,
    pack,
    unpack,
)

TOOLING = {"pgolf.cli", "pgolf.singlefile", "pgolf.minify", "pgolf.submit.bundle", "pgolf.submit.report"}


def _trees(sources: dict[str, str]) -> dict[str, tuple[bool, ast.Module]]:
    return {name: (name.count(".") == 0, strip_tree(ast.parse(src))) for name, src in sources.items()}


def _names(tree: ast.Module) -> set[str]:
    out = set()
    for stmt in tree.body:
        if isinstance(stmt, (ast.FunctionDef, ast.ClassDef)):
            out.add(stmt.name)
        elif isinstance(stmt, (ast.Import, ast.ImportFrom)):
            out.update(a.asname or a.name for a in stmt.names)
        elif isinstance(stmt, ast.Assign):
            out.update(t.id for t in stmt.targets if isinstance(t, ast.Name))
    return out


def test_shake_keeps_what_the_roots_reach():
    kept = shake(
        _trees(
            {
                "pgolf": "",
                "pgolf.a": (
                    "from pgolf.b import used, unused_import\n"
                    "import os\n"
                    "def main(helper):\n"
                    "    '''doc'''\n"
                    "    return used(helper) + [x for x in range(3)]\n"
                    "def helper(): return 1\n"
                    "def x(): return 2\n"
                    "if __name__ == '__main__':\n"
                    "    helper()\n"
                ),
                "pgolf.b": (
                    "try:\n    import tomllib\nexcept ImportError:\n    import tomli as tomllib\n"
                    "REG = {}\n"
                    "def register(f):\n    REG[f.__name__] = f\n    return f\n"
                    "@register\ndef registered(): return 3\n"
                    "def used(h): return [lazy()]\n"
                    "def lazy():\n    from pgolf.c import deep\n    return deep\n"
                    "def unused_import(): return 4\n"
                    "print('import-time effect')\n"
                ),
                "pgolf.c": "deep = 5\nnever = 6\n",
                "pgolf.d": "def main(): return 0\n",
            }
        ),
        "pgolf.a",
        {"main"},
    )
    assert sorted(kept) == ["pgolf", "pgolf.a", "pgolf.b", "pgolf.c"]  # pgolf.d: imported by no kept code
    # `helper` and `x` are only read as a parameter / a comprehension target: local names, not the globals
    assert _names(kept["pgolf.a"][1]) == {"used", "main"}
    # the registering decorator and the print run at import: kept; tomllib is read by nothing: dropped
    assert _names(kept["pgolf.b"][1]) == {"REG", "register", "registered", "used", "lazy"}
    assert _names(kept["pgolf.c"][1]) == {"deep"}
    assert "doc" not in ast.unparse(kept["pgolf.a"][1]) and "__main__" not in ast.unparse(kept["pgolf.a"][1])


def test_shake_drops_an_import_its_module_never_reads_and_then_the_module():
    sources = {
        "pgolf": "",
        "pgolf.a": "from pgolf.b import f, g\nfrom pgolf import c\ndef main():\n    return f()\n",
        "pgolf.b": "from pgolf.c import h, k\ndef f():\n    return k\ndef g():\n    return h()\n",
        "pgolf.c": "def h(): return 1\nk = 2\ndef main(): return 3\n",
    }
    kept = shake(_trees(sources), "pgolf.a", {"main"})
    assert _names(kept["pgolf.a"][1]) == {"f", "main"} and _names(kept["pgolf.b"][1]) == {"k", "f"}
    assert _names(kept["pgolf.c"][1]) == {"k"}  # `main` is a root of pgolf.a only; h: read by g alone
    sources["pgolf.b"] = "from pgolf.c import h\ndef f():\n    return 0\ndef g():\n    return h()\n"
    assert sorted(shake(_trees(sources), "pgolf.a", {"main"})) == ["pgolf", "pgolf.a", "pgolf.b"]


def test_strip_keeps_class_annotations_and_drops_function_ones():
    src = "from dataclasses import dataclass\n@dataclass\nclass C:\n    a: int = 1\ndef f(x: int) -> int:\n    y: int = x\n    z: str\n    return y\n"
    out = ast.unparse(strip_tree(ast.parse(src)))
    assert "a: int = 1" in out and "def f(x):" in out and "y = x" in out and "z" not in out


TRICKY = '''
import math
def f(a, *args, b=-1, **kw):
    if a:
        return 1 if a else 2
    elif b is not None:
        x = [i for i in range(3) if i not in (1,)]
        return -x[-1] + 1e5 + 0x1F - 2 ** -b
    else:
        return 'a' 'b' + f"{a!r:>4}{{x}}" + b'\\x00'.decode() + r"\\d"
class C:
    def m(self): return lambda q: q.real
r = [f(0), f(0, b=3), f(1), math.pi.real, C().m()(1 .real), not-1, {**{1: 2}}, [*range(2)]]
'''


def test_compact_preserves_meaning_and_saves_bytes():
    src = ast.unparse(ast.parse(TRICKY))
    small = compact(src)
    assert len(small) < 0.8 * len(src)
    assert "if a:return 1 if a else 2" in small and "1 .real" in small
    ns_a: dict = {}
    ns_b: dict = {}
    exec(src, ns_a)
    exec(small, ns_b)
    assert repr(ns_a["r"][:4]) == repr(ns_b["r"][:4]) and ns_a["r"][5:] == ns_b["r"][5:]
    check_py310(small, "compacted")


def test_compact_refuses_a_changed_ast(monkeypatch):
    import pgolf.minify as minify

    monkeypatch.setattr(minify, "_needs_space", lambda prev, cur: False)  # `return x` would become `returnx`
    with pytest.raises(MinifyError, match="changed the code's AST"):
        compact("def f(x):\n    return x\n")


def test_recipe_bundles_carry_only_their_modes():
    closure = set(collect_modules())
    assert {"pgolf.eval.ngram_tilt", "pgolf.eval.ttt", "pgolf.config.presets"} <= closure
    mods_1394 = bundle_modules(preset("pr1394"), packed=True)
    mods_1557 = bundle_modules(preset("pr1557"), packed=True)
    mods_1541 = bundle_modules(preset("pr1541"), packed=True)
    assert not {"pgolf.eval.ngram_tilt", "pgolf.eval.ttt", "pgolf.config.presets"} & set(mods_1394)
    assert "pgolf.eval.ttt" in mods_1541 and "pgolf.eval.ngram_tilt" not in mods_1541
    assert {"pgolf.eval.ngram_tilt", "pgolf.eval.ttt"} <= set(mods_1557)
    for mods in (mods_1394, mods_1541, mods_1557):
        assert not TOOLING & set(mods) and not any(m.endswith(".cli") for m in mods)
    # no n-gram kernel anywhere in pr1394's shipped payload; pr1557's has it
    text_1394 = unpack(build_bundle_source(to_toml(preset("pr1394")), bundle_title("pr1394"), packed=True))
    text_1557 = unpack(build_bundle_source(to_toml(preset("pr1557")), bundle_title("pr1557"), packed=True))
    assert "njit" not in text_1394 and "PRIMES" not in text_1394 and "def eval_ttt" not in text_1394
    assert "njit" in text_1557 and "PRIMES" in text_1557 and "def eval_ttt" in text_1557
    assert '"""' not in text_1394 and "# " not in text_1394  # no docstrings, no comments
    # the modules travel as raw triple-quoted strings, verbatim
    assert ast.literal_eval(ast.parse(text_1394).body[0].value) == mods_1394 and ":(False,r'''" in text_1394
    assert len(text_1394) < len(text_1557)


@pytest.mark.parametrize("source", ["", "a\n", "x='''", "a\\", "b'", "c\\n'q'\n", "line\r\n", "é\\d+"])
def test_module_sources_are_spelled_verbatim(source: str):
    assert ast.literal_eval(_string_literal(source)) == source


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_embedded_config_delta_round_trips(name: str):
    cfg = preset(name)
    delta = config_delta_toml(cfg)
    assert to_toml(from_dict(tomllib.loads(delta))) == to_toml(cfg)
    assert len(delta) < len(to_toml(cfg)) / 2


def test_pack_picks_the_smaller_codec_and_runs():
    source = "X = [i * i for i in range(50)]\n" + "Y = 'the quick brown fox ' * 40\n"
    shims = {codec: pack(source, codec) for codec in ("lzma", "brotli")}
    assert pack(source) == min(shims.values(), key=len)
    for codec, shim in shims.items():
        assert shim.count("\n") == 2 and shim.startswith(f"import {codec} as L,base64 as B\n")
        assert unpack(shim) == source
        ns: dict = {}
        exec(shim, ns)
        assert ns["X"][7] == 49 and len(ns["Y"]) == 800


def test_bundle_refuses_a_plan_it_left_out(tmp_path: Path):
    """pr1394's bundle has no TTT: TTT_ENABLED=1 stops it before any work, naming the mode."""
    script = tmp_path / "train_gpt.py"
    script.write_text(build_bundle_source(to_toml(preset("pr1394")), bundle_title("pr1394"), packed=True))
    proc = run_without_pgolf(script, tmp_path, TTT_ENABLED="1", RUN_DIR=str(tmp_path / "run"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("train_gpt.py: eval.plan runs 'ttt' but this train_gpt.py was bundled without it")
    assert not (tmp_path / "run").exists()


def test_bundle_bytes_do_not_depend_on_the_hash_seed():
    """quantize counts the bundle in one process, `pgolf bundle` writes it in another: same bytes."""
    code = (
        "import hashlib\nfrom pgolf.config import preset, to_toml\n"
        "from pgolf.singlefile import build_bundle_source, bundle_title\n"
        "print(hashlib.sha256(build_bundle_source(to_toml(preset('pr1557')), bundle_title('x'), True).encode()).hexdigest())"
    )
    digests = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        digests.add(proc.stdout.strip())
    assert len(digests) == 1
