"""`pgolf report` on a hand-made run directory: PNG plots of the expected size and a report.md using them."""

from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path

import pytest
from test_submit_summary import make_run_dir, record_stages

from pgolf.cli import main
from pgolf.submit.report import PLOT_FILES, PLOT_PIXELS, REPORT_FILE, byte_segments, render_report
from pgolf.submit.summary import build_summary

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk that must follow the PNG signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    run = make_run_dir(tmp_path_factory.mktemp("run"), modes=("prequant", "quant", "sliding", "ttt"))
    return run, render_report(run)


def test_plots_exist_and_are_pngs_of_the_expected_size(rendered: tuple[Path, Path]) -> None:
    run, report = rendered
    assert report == run / "report" / REPORT_FILE
    for name in PLOT_FILES.values():
        path = report.parent / name
        assert path.stat().st_size > 5_000, f"{name} is (nearly) empty"
        assert png_size(path) == PLOT_PIXELS


def test_report_md_references_each_plot_and_the_summary(rendered: tuple[Path, Path]) -> None:
    run, report = rendered
    text = report.read_text()
    for name in PLOT_FILES.values():
        assert f"]({name})" in text  # a relative image link next to the PNG
    summary = build_summary(run)
    assert f"val_bpb {summary['val_bpb']:.5f}" in text and "(from TTT)" in text
    assert "| TTT | 2.91075 | 1.94050 | 2,074,624 | 8,000,000 | 10.0 |" in text
    assert "| matrix | 4,718,592 | 6 | 1,502,000 | 2.600 |" in text
    assert "Stopped by: wallclock; looping enabled at step 188" in text
    # The report also leaves summary.json, so `pgolf stats` works on stage-by-stage runs.
    assert json.loads((run / "summary.json").read_text()) == summary


def test_byte_segments_add_up_to_the_counted_total(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path)
    quant = json.loads((run / "quant.json").read_text())
    quant["classes"]["matrix"]["bytes"] -= 1_234  # more bytes the classes do not explain: container overhead
    segments = byte_segments(quant, "quant.json")
    assert [label.split()[0] for label, _ in segments] == ["matrix", "embed", "control", "container", "code"]
    explained = sum(c["bytes"] for c in quant["classes"].values())
    assert (
        dict((label.split()[0], n) for label, n in segments)["container"]
        == quant["artifact_bytes"] - explained
    )
    assert sum(n for _, n in segments) == quant["total_bytes"]
    assert "(2.60 bits/w)" in segments[0][0]
    with pytest.raises(ValueError, match="quant.json: field 'classes'"):
        byte_segments({**quant, "classes": {}}, "quant.json")


def test_report_handles_nan_loss_and_empty_val_history(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path / "run", modes=("prequant",), total_bytes=3_571_134)
    train = json.loads((run / "train.json").read_text())
    train["history"]["train"][-1]["loss"] = math.nan  # a run stopped on NaN
    train["history"]["val"] = []
    train["looping_enabled_at_step"] = None
    (run / "train.json").write_text(json.dumps(train))
    record_stages(run)
    report = render_report(run, tmp_path / "out")
    assert report.parent == tmp_path / "out"
    assert all(png_size(report.parent / name) == PLOT_PIXELS for name in PLOT_FILES.values())
    assert "OVER CAP by 1,571,134 bytes" in report.read_text()


def test_bad_history_is_named(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path)
    train = json.loads((run / "train.json").read_text())
    train["history"]["val"][0].pop("time_s")
    (run / "train.json").write_text(json.dumps(train))
    record_stages(run)
    with pytest.raises(ValueError, match=r"train.json: history.val\[0\]: missing field 'time_s'"):
        render_report(run)


def test_missing_matplotlib_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ModuleNotFoundError, match="pgolf report needs matplotlib"):
        render_report(make_run_dir(tmp_path))


def test_cli_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run_dir(tmp_path / "run")
    assert main(["report", str(run), "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "bpb waterfall" in out and f"report: {tmp_path / 'rep' / REPORT_FILE}" in out
    (run / "eval.json").unlink()
    assert main(["report", str(run)]) == 2
    assert "eval.json not found" in capsys.readouterr().err
