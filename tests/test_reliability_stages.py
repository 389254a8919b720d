"""docs/reliability.md, run-directory and input rows: a run directory never mixes two models, eval results
accumulate per mode, `pgolf bundle` verifies what it ships, bad input fails before training in one line.
Each test failed on the main branch before this change."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_SETS, tiny_cfg

from pgolf import rundir
from pgolf.cli import main
from pgolf.config import to_toml
from pgolf.data.shards import shard_name, write_shard
from pgolf.eval.run_eval import evaluate_run

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [*TINY_SETS, "train.iterations=4", "eval.plan=prequant,quant"]


def run_argv(data: Path, out: Path, *extra: str) -> list[str]:
    argv = ["run", "--preset", "smoke", "--data", str(data), "--out", str(out), *extra]
    for s in TINY:
        argv += ["--set", s]
    return argv


@pytest.fixture(scope="module")
def finished_run(sp1024_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(run_argv(sp1024_shards, run)) == 0
    return run


@pytest.fixture
def run(finished_run: Path, tmp_path: Path) -> Path:
    """A private copy of the finished run (tests change it)."""
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


def one_error_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_stage_outputs_record_what_they_were_made_from(run: Path):
    ledger = json.loads((run / "fingerprints.json").read_text())
    sha = {name: rundir.file_sha256(run / name) for name in ("config.toml", "model.pt", "model.ptz")}
    assert (
        ledger["train"]["config"] == sha["config.toml"]
        and ledger["train"]["outputs"]["model.pt"] == sha["model.pt"]
    )
    assert ledger["quant"]["inputs"] == {"model.pt": sha["model.pt"]}
    assert ledger["quant"]["outputs"]["model.ptz"] == sha["model.ptz"]
    assert ledger["eval"]["extra"]["modes"] == {"prequant": sha["model.pt"], "quant": sha["model.ptz"]}
    assert set(ledger["summary"]["inputs"]) == {"train.json", "quant.json", "eval.json"}
    rundir.check_fresh(run, same_config=True)


def test_requantize_invalidates_and_bundle_refuses_mixed_parts(run: Path, tmp_path: Path, capsys):
    assert main(["bundle", str(run), "--out", str(tmp_path / "ok")]) == 0
    capsys.readouterr()
    assert main(["quantize", str(run), "--set", "quant.matrix_bits=8"]) == 0
    assert not (run / "eval.json").exists() and not (run / "summary.json").exists()  # the old score is gone
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    capsys.readouterr()
    assert main(["bundle", str(run), "--out", str(tmp_path / "rec")]) == 2  # config.toml would not rebuild it
    err = one_error_line(capsys)
    assert "model.ptz: made with a config other than" in err and "config.toml" in err
    assert main(["quantize", str(run)]) == 0
    capsys.readouterr()
    assert main(["bundle", str(run), "--out", str(tmp_path / "rec")]) == 2
    assert "eval.json not found" in one_error_line(capsys)
    assert not (tmp_path / "rec").exists()
    assert main(["eval", str(run)]) == 0
    assert main(["bundle", str(run), "--out", str(tmp_path / "rec")]) == 0


def test_report_and_stats_refuse_a_changed_part(run: Path, capsys):
    evaluation = json.loads((run / "eval.json").read_text())
    evaluation["results"][-1]["bpb"] -= 0.1  # another model's (or a hand-edited) score
    (run / "eval.json").write_text(json.dumps(evaluation))
    assert main(["stats", str(run)]) == 2
    assert "summary.json: stale: made from another eval.json" in one_error_line(capsys)
    assert main(["report", str(run)]) == 2
    assert "eval.json: changed since the eval stage wrote it" in one_error_line(capsys)


def test_bundle_reads_and_checks_the_artifact(run: Path, tmp_path: Path, capsys):
    blob = (run / "model.ptz").read_bytes()
    (run / "model.ptz").write_bytes(blob[:-1])
    assert main(["bundle", str(run), "--out", str(tmp_path / "rec")]) == 2
    assert "model.ptz: changed since the quant stage wrote it" in one_error_line(capsys)
    (run / "model.ptz").write_bytes(blob)
    quant = json.loads((run / "quant.json").read_text())
    quant["artifact_bytes"] += 1
    (run / "quant.json").write_text(json.dumps(quant))
    rundir.record_stage(run, "quant", (run / "config.toml").read_text(), ["model.pt"])  # even if re-recorded
    assert main(["bundle", str(run), "--out", str(tmp_path / "rec")]) == 2
    assert f"model.ptz: {len(blob):,} bytes, but quant.json records {len(blob) + 1}" in one_error_line(capsys)


def test_eval_results_accumulate_per_mode(run: Path):
    before = {r["mode"]: r for r in json.loads((run / "eval.json").read_text())["results"]}
    out = evaluate_run(run, modes=["quant"])
    assert [r["mode"] for r in out["results"]] == ["quant"]
    after = {r["mode"]: r for r in json.loads((run / "eval.json").read_text())["results"]}
    assert after["prequant"] == before["prequant"] and set(after) == {"prequant", "quant"}
    assert not (run / "summary.json").exists()  # the summary of the earlier eval.json is stale
    rundir.check_fresh(run, ("train", "quant", "eval"))


# ----------------------------------------------------------------------------------- bad input
def copy_data(src: Path, dst: Path, *, val: bool = True, tokenizer: bool = True) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if (val or "_val_" not in f.name) and (tokenizer or f.name != "tokenizer.model"):
            shutil.copy(f, dst / f.name)
    return dst


def assert_refused(capsys, argv: list[str], out: Path, *words: str) -> None:
    assert main(argv) == 2
    err = one_error_line(capsys)
    assert all(w in err for w in words), err
    assert not out.exists()  # nothing written


def test_bad_inputs_fail_before_training(sp1024_shards: Path, tiny_data: Path, tmp_path: Path, capsys):
    out = tmp_path / "run"
    bad = copy_data(tiny_data, tmp_path / "bad_ids")
    write_shard(bad / shard_name("train", 1), np.array([1, 5, 1024, 7]))
    argv = ["train", "--preset", "smoke", "--data", str(bad), "--out", str(out)]
    for s in TINY:
        argv += ["--set", s]
    assert_refused(capsys, argv, out, "fineweb_train_000001.bin", "token id 1024 >= model.vocab_size=1024")

    other = copy_data(sp1024_shards, tmp_path / "other_tok")
    (other / "manifest.json").write_text(json.dumps({"tokenizer": {"sha256": "0" * 64}}))
    assert_refused(capsys, run_argv(other, out), out, "tokenizer.model", "manifest.json", "built with")

    no_val = copy_data(sp1024_shards, tmp_path / "no_val", val=False)
    assert_refused(capsys, run_argv(no_val, out), out, "no fineweb_val_*.bin")
    no_tok = copy_data(sp1024_shards, tmp_path / "no_tok", tokenizer=False)
    assert_refused(capsys, run_argv(no_tok, out), out, "tokenizer not found")

    assert_refused(capsys, run_argv(sp1024_shards, out, "--seeds", ","), out, "--seeds ','")
    for key, value in (("data.train_seq_len", "0"), ("optim.matrix_lr", "-1")):
        assert_refused(capsys, run_argv(sp1024_shards, out, "--set", f"{key}={value}"), out, key, value)
    with pytest.raises(SystemExit) as exit_:
        main(["eval", str(out), "--budget", "-5"])
    assert exit_.value.code == 2 and "expected a finite number >= 0" in capsys.readouterr().err


def test_corrupt_model_pt_and_debug_traceback(sp1024_shards: Path, tmp_path: Path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(to_toml(tiny_cfg(sp1024_shards)))
    (run / "model.pt").write_bytes(b"PK\x03\x04 not a zip")
    assert main(["quantize", str(run)]) == 2
    assert "model.pt: not a readable weights file" in one_error_line(capsys)
    assert main(["eval", str(run), "--prequant"]) == 2
    assert "model.pt: not a readable weights file" in one_error_line(capsys)
    assert main(["--debug", "quantize", str(run)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("pgolf: error:")


def test_unexpected_errors_are_one_line_too(tmp_path: Path, monkeypatch, capsys):
    def bug(*args, **kwargs):
        raise KeyError("oops")

    monkeypatch.setattr("pgolf.submit.report.render_report", bug)
    assert main(["report", str(tmp_path)]) == 1
    assert "internal error: KeyError" in one_error_line(capsys)
