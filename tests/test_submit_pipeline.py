"""`pgolf run` end to end, and the single-file bundle running with no pgolf installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pgolf import rundir
from pgolf.cli import main
from pgolf.config import preset, to_toml
from pgolf.singlefile import (
    BundleError,
    build_bundle_source,
    bundle_title,
    check_py310,
    collect_modules,
    unpack,
)
from pgolf.submit.pipeline import seed_configs
from pgolf.submit.summary import SUMMARY_KEYS

FAST = ["train.iterations=4", "train.val_every=0", "data.max_val_tokens=2048", "eval.batch_seqs=16"]

HIDE_PGOLF = """import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__]
sys.path[:] = [p for p in sys.path if not p.rstrip("/").endswith("/src")]
"""


def run_without_pgolf(script: Path, tmp_path: Path, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    """Run `script` in a Python that cannot import pgolf (a sitecustomize under tmp_path hides the checkout),
    with `env` added to the environment; cwd is tmp_path."""
    hide = tmp_path / "hide"
    hide.mkdir(exist_ok=True)
    (hide / "sitecustomize.py").write_text(HIDE_PGOLF)
    full = dict(os.environ, PYTHONPATH=str(hide), **env)
    probe = subprocess.run([sys.executable, "-c", "import pgolf"], env=full, capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'pgolf'" in probe.stderr
    return subprocess.run(
        [sys.executable, str(script)], env=full, cwd=tmp_path, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def smoke_run(sp8192_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("run") / "smoke"
    args = ["run", "--preset", "smoke", "--data", str(sp8192_shards), "--out", str(run)]
    for s in FAST:
        args += ["--set", s]
    assert main(args) == 0
    return run


def test_run_writes_the_summary_contract(smoke_run: Path):
    summary = json.loads((smoke_run / "summary.json").read_text())
    assert list(summary) == list(SUMMARY_KEYS)
    assert summary["preset"] == "smoke" and summary["steps"] == 4
    assert summary["val_bpb"] == summary["ttt_bpb"]  # the smoke plan ends with TTT
    assert summary["ngram_bpb"] is None
    assert summary["total_bytes"] == summary["artifact_bytes"] + summary["code_bytes"]
    for name in ("config.toml", "train.log", "model.pt", "model.ptz", "quant.json", "eval.json"):
        assert (smoke_run / name).is_file(), name


def test_bundle_record_folder_and_cap_refusal(smoke_run: Path, tmp_path: Path, capsys):
    out = tmp_path / "record"
    assert main(["bundle", str(smoke_run), "--out", str(out), "--packed"]) == 0
    sub = json.loads((out / "submission.json").read_text())
    code = (out / "train_gpt.py").stat().st_size
    assert sub["bytes_code"] == code and sub["bytes_total"] == code + sub["bytes_model"]
    assert {"README.md", "requirements.txt", "train.log", "eval.json"} <= {p.name for p in out.iterdir()}
    check_py310(unpack((out / "train_gpt.py").read_text()), "payload")
    # the code bytes every file states are the shipped file's size; an unpacked bundle is a different file
    for packed, folder in ((True, out), (False, tmp_path / "plain")):
        if not packed:
            assert main(["bundle", str(smoke_run), "--out", str(folder), "--no-packed"]) == 0
        size = os.path.getsize(folder / "train_gpt.py")
        for name in ("quant.json", "summary.json"):
            counted = json.loads((folder / name).read_text())
            assert counted["code_bytes"] == size and counted["total_bytes"] == size + counted["artifact_bytes"]
        assert json.loads((folder / "submission.json").read_text())["bytes_code"] == size
    assert os.path.getsize(tmp_path / "plain" / "train_gpt.py") > 2 * code
    tight = smoke_run.parent / "tight"
    tight.mkdir()
    for f in smoke_run.iterdir():
        if f.is_file():
            (tight / f.name).write_bytes(f.read_bytes())
    toml = (tight / "config.toml").read_text().replace("cap_bytes = 16000000", "cap_bytes = 1000")
    (tight / "config.toml").write_text(toml)
    assert main(["bundle", str(tight), "--out", str(tmp_path / "refused")]) == 2
    assert "config.toml: changed since the model was trained" in capsys.readouterr().err
    for stage, inputs in (("train", []), ("quant", ["model.pt"])):  # as if trained and quantized at that cap
        rundir.record_stage(tight, stage, toml, inputs)
    assert main(["bundle", str(tight), "--out", str(tmp_path / "refused")]) == 2
    assert "exceeds the cap of 1,000" in capsys.readouterr().err
    assert not (tmp_path / "refused" / "train_gpt.py").exists()


def test_bundled_file_runs_without_pgolf(sp8192_shards: Path, tmp_path: Path, smoke_run: Path):
    """The bundle (its config folded into the code, pgolf.fold) trains, quantizes and scores exactly as
    `pgolf run` with the same config does."""
    cfg = preset("smoke")
    for s in FAST:
        key, value = s.split("=")
        section, field = key.split(".")
        setattr(getattr(cfg, section), field, type(getattr(getattr(cfg, section), field))(value))
    script = tmp_path / "train_gpt.py"
    script.write_text(build_bundle_source(to_toml(cfg), bundle_title("smoke"), packed=True))
    data_root = tmp_path / "data"
    (data_root / "datasets").mkdir(parents=True)
    (data_root / "tokenizers").mkdir()
    (data_root / "datasets" / "fineweb10B_sp8192").symlink_to(sp8192_shards)
    (data_root / "tokenizers" / "fineweb_8192_bpe.model").write_bytes((sp8192_shards / "tokenizer.model").read_bytes())
    proc = run_without_pgolf(
        script,
        tmp_path,
        timeout=600,
        DATA_DIR=str(data_root),
        RUN_DIR=str(tmp_path / "rr"),
        OMP_NUM_THREADS=str(torch.get_num_threads()),  # as smoke_run's: the same reduction order
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-2:]
    assert last[0].startswith("final val_loss:") and "val_bpb:" in last[0]
    size = script.stat().st_size
    summary = json.loads((tmp_path / "rr" / "summary.json").read_text())
    assert summary["code_bytes"] == size
    reference = json.loads((smoke_run / "summary.json").read_text())
    assert summary["steps"] == reference["steps"]
    for key in ("val_loss", "val_bpb", "pre_quant_bpb", "quant_bpb", "ttt_bpb"):
        assert summary[key] == pytest.approx(reference[key], rel=1e-6), key
    assert last[1].startswith(f"Total submission size: {summary['artifact_bytes'] + size} bytes")


def test_bundle_closure_excludes_tooling():
    modules = collect_modules()
    assert "pgolf.submit.record" in modules and "pgolf.train.loop" in modules
    assert not {"pgolf.cli", "pgolf.singlefile", "pgolf.submit.bundle", "pgolf.submit.report"} & set(modules)
    with pytest.raises(BundleError, match="does not exist"):
        collect_modules("pgolf.no_such_module")


def test_py310_check_rejects_pep701():
    with pytest.raises(BundleError, match="not valid Python 3.10"):
        check_py310('x = f"{"a"}"\n', "bad")


def test_seed_configs_only_change_the_seed():
    base = preset("smoke")
    a, b = seed_configs(base, [1, 2])
    assert (a.train.seed, b.train.seed, base.train.seed) == (1, 2, 1337)
    a.train.seed = base.train.seed
    assert to_toml(a) == to_toml(base)


def test_report_from_a_smoke_run(smoke_run: Path, tmp_path: Path):
    from pgolf.submit.report import PLOT_PIXELS, render_report

    md = render_report(smoke_run, tmp_path / "report")
    pngs = sorted((tmp_path / "report").glob("*.png"))
    assert len(pngs) == 4
    text = md.read_text()
    for png in pngs:
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert (width, height) == PLOT_PIXELS
        assert png.name in text
