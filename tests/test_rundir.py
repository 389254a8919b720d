"""pgolf.rundir on hand-made run directories: invalidation order, fingerprints, per-mode eval results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pgolf import rundir


def fake_run(path: Path) -> Path:
    """Every stage output as small files, each stage recorded as the stages record themselves."""
    path.mkdir()
    (path / "config.toml").write_text('preset = "x"\n')
    for name, text in (("model.pt", "w1"), ("train.json", "{}"), ("model.ptz", "a1"), ("quant.json", "{}")):
        (path / name).write_text(text)
    rundir.record_stage(path, "train", (path / "config.toml").read_text(), [])
    rundir.record_stage(path, "quant", (path / "config.toml").read_text(), ["model.pt"])
    result = {"mode": "prequant", "loss": 1.0, "bpb": 1.0}
    rundir.write_eval_results(path, {"results": [result], "eval_seconds": 2.0, "stopped_early": False})
    return path


def test_invalidate_from_removes_the_stage_and_every_later_one(tmp_path: Path):
    run = fake_run(tmp_path / "run")
    assert sorted(rundir.invalidate_from(run, "quant")) == ["eval.json", "model.ptz", "quant.json"]
    assert (run / "model.pt").is_file() and set(json.loads((run / "fingerprints.json").read_text())) == {"train"}
    with pytest.raises(rundir.StaleRunError, match="quant.json not found: run the quant stage"):
        rundir.check_fresh(run)


def test_check_fresh_names_the_stale_part(tmp_path: Path):
    run = fake_run(tmp_path / "run")
    rundir.check_fresh(run, ("train", "quant", "eval"), same_config=True)
    (run / "model.pt").write_text("w2")  # retrained by hand: the artifact was made from the old weights
    with pytest.raises(rundir.StaleRunError, match=r"model.pt: changed since the train stage wrote it"):
        rundir.check_fresh(run)
    rundir.record_stage(run, "train", (run / "config.toml").read_text(), [])
    with pytest.raises(rundir.StaleRunError, match=r"model.ptz: stale: made from another model.pt"):
        rundir.check_fresh(run)
    (run / "config.toml").write_text('preset = "y"\n')
    with pytest.raises(rundir.StaleRunError, match="config.toml: changed since the model was trained"):
        rundir.check_fresh(run, ("train",))


def test_eval_results_kept_only_for_the_same_model_file(tmp_path: Path):
    run = fake_run(tmp_path / "run")
    quant = {"mode": "quant", "loss": 2.0, "bpb": 2.0}
    rundir.write_eval_results(run, {"results": [quant], "eval_seconds": 3.0, "stopped_early": False})
    saved = json.loads((run / "eval.json").read_text())
    assert [r["mode"] for r in saved["results"]] == ["prequant", "quant"] and saved["eval_seconds"] == 5.0
    (run / "model.pt").write_text("w2")  # the prequant result scored other weights
    rundir.write_eval_results(run, {"results": [quant], "eval_seconds": 3.0, "stopped_early": False})
    assert [r["mode"] for r in json.loads((run / "eval.json").read_text())["results"]] == ["quant"]
