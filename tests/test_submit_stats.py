"""Seed statistics and the record t-test against scipy and closed-form formulas on known samples."""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from pgolf import rundir
from pgolf.cli import main
from pgolf.fileio import atomic_write_json
from pgolf.submit.stats import (
    RecordTest,
    RunScore,
    compare_to_bpb,
    compare_to_runs,
    format_stats,
    load_score,
    mean_std,
)

RATIO = 1 / 0.3871  # SP8192 FineWeb: 1 nat/token = 0.3871 bpb (SPEC §0)
PR1541_TTT = [1.07718, 1.07810, 1.07826]  # SPEC §6.1, seeds 42/314/999
PR1394_SLIDING = [1.08554, 1.08664, 1.08463, 1.08554, 1.08578]  # seeds 1/42/1234/1337/2025


def scores(bpbs: list[float], ratio: float = RATIO) -> list[RunScore]:
    return [RunScore(f"run{i}", b, b * ratio) for i, b in enumerate(bpbs)]


def write_runs(root: Path, name: str, bpbs: list[float]) -> list[str]:
    dirs = []
    for i, bpb in enumerate(bpbs):
        run = root / f"{name}{i}"
        atomic_write_json(run / "summary.json", {"val_bpb": bpb, "val_loss": bpb * RATIO, "seed": i})
        rundir.record_stage(run, "summary", None, [])
        dirs.append(str(run))
    return dirs


def test_mean_std_is_sample_std() -> None:
    mean, std = mean_std(PR1541_TTT)
    assert mean == pytest.approx(np.mean(PR1541_TTT), abs=1e-15)
    assert std == pytest.approx(np.std(PR1541_TTT, ddof=1), rel=1e-12)
    assert mean == pytest.approx(1.07785, abs=5e-6) and std == pytest.approx(0.00058, abs=1e-5)
    assert math.isnan(mean_std([1.0])[1])


def test_against_bpb_matches_closed_form_and_scipy() -> None:
    runs = scores(PR1541_TTT)
    sota = 1.0856  # #1394's sliding mean
    res = compare_to_bpb(runs, sota)
    gains = np.array([RATIO * (sota - b) for b in PR1541_TTT])  # nats/token each run gains
    n = len(gains)
    t = (gains.mean() - 0.005) / (gains.std(ddof=1) / math.sqrt(n))
    assert res.improvement == pytest.approx(gains.mean(), rel=1e-12)
    assert res.t == pytest.approx(t, rel=1e-9)
    assert res.p == pytest.approx(sps.t.sf(t, n - 1), rel=1e-9)
    assert res.df == n - 1
    ref = sps.ttest_1samp(gains, 0.005, alternative="greater")
    assert (res.t, res.p) == pytest.approx((ref.statistic, ref.pvalue), rel=1e-12)
    assert res.passed and res.p < 0.01 and res.improvement > 0.019
    assert res.verdict().startswith(f"PASS: improvement {res.improvement:.4f} nats ≥ 0.005, p = ")


def test_against_bpb_uses_each_runs_own_ratio() -> None:
    # Scaling one run's nats/bpb ratio scales its gain in nats: the threshold is met in each run's units.
    runs = [RunScore("a", 1.0, 2.0), RunScore("b", 1.0, 3.0), RunScore("c", 1.0, 4.0)]
    res = compare_to_bpb(runs, 1.01)
    assert res.improvement == pytest.approx((0.02 + 0.03 + 0.04) / 3)


def test_welch_matches_closed_form_and_scipy() -> None:
    new, old = scores(PR1541_TTT), scores(PR1394_SLIDING)
    res = compare_to_runs(new, old)
    a = np.array([r.val_loss for r in old])
    b = np.array([r.val_loss for r in new])
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    t = (a.mean() - b.mean() - 0.005) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    assert res.improvement == pytest.approx(a.mean() - b.mean(), rel=1e-12)
    assert res.t == pytest.approx(t, rel=1e-9)
    assert res.df == pytest.approx(df, rel=1e-9)
    assert res.p == pytest.approx(sps.t.sf(t, df), rel=1e-9)
    assert res.passed


def test_fail_verdicts() -> None:
    small = compare_to_bpb(scores(PR1541_TTT), 1.0790)  # ~0.0025 nats: below the bar
    assert not small.passed and small.improvement < 0.005
    assert small.verdict().startswith(f"FAIL: improvement {small.improvement:.4f} nats < 0.005 (p = ")
    noisy = compare_to_bpb(scores([1.0700, 1.0760, 1.0730]), 1.0770)  # mean gain 0.0103, sd 0.0077
    assert noisy.improvement >= 0.005 and noisy.p >= 0.01 and not noisy.passed
    assert (
        noisy.verdict()
        == f"FAIL: improvement {noisy.improvement:.4f} nats ≥ 0.005 but p = {noisy.p:.4g} ≥ 0.01"
    )


def test_verdict_text() -> None:
    res = RecordTest("m", improvement=0.0123, threshold=0.005, alpha=0.01, t=6.1, p=0.0031, df=2)
    assert res.verdict() == "PASS: improvement 0.0123 nats ≥ 0.005, p = 0.0031 < 0.01"


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="at least 2 runs"):
        compare_to_bpb(scores([1.07]), 1.08)
    with pytest.raises(ValueError, match="at least 2 baseline runs"):
        compare_to_runs(scores([1.07, 1.071]), scores([1.08]))
    with pytest.raises(ValueError, match="zero variance"):
        compare_to_bpb(scores([1.07, 1.07]), 1.08)
    with pytest.raises(ValueError, match="positive"):
        compare_to_bpb(scores([1.07, 1.071]), -1.0)


def test_load_score_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="summary.json"):
        load_score(tmp_path)
    atomic_write_json(tmp_path / "summary.json", {"val_bpb": 1.08})
    with pytest.raises(ValueError, match="summary.json: missing field 'val_loss'"):
        load_score(tmp_path)


def test_missing_scipy_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "scipy.stats", None)
    with pytest.raises(ModuleNotFoundError, match="needs scipy.*pip install scipy"):
        compare_to_bpb(scores(PR1541_TTT), 1.0856)
    assert main(["stats", *write_runs(tmp_path, "new", PR1541_TTT), "--against", "1.0856"]) == 2
    assert "pip install scipy" in capsys.readouterr().err


def test_format_stats_lists_groups_and_verdict() -> None:
    new, old = scores(PR1541_TTT), scores(PR1394_SLIDING, ratio=RATIO * 1.2)
    text = format_stats(new, old, compare_to_runs(new, old))
    assert "runs (3)" in text and "baseline (5)" in text
    assert "1.07785" in text  # mean bpb of the new runs
    assert "note: nats/bpb ratios differ" in text
    assert text.splitlines()[-1].startswith("PASS: ")


def test_cli_against_number_and_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    new = write_runs(tmp_path, "new", PR1541_TTT)
    old = write_runs(tmp_path, "old", PR1394_SLIDING)
    assert main(["stats", *new, "--against", "1.0856"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("PASS: ")
    assert main(["stats", *new, "--against", "1.0790"]) == 1
    assert capsys.readouterr().out.splitlines()[-1].startswith("FAIL: ")
    assert main(["stats", *new, "--against", *old]) == 0
    out = capsys.readouterr().out
    assert "Welch" in out and "baseline (5)" in out
    assert main(["stats", *new]) == 0  # no test: just the table
    assert "PASS" not in capsys.readouterr().out
    assert main(["stats", *new, "--against", "nonsense"]) == 2
    assert "neither a run directory nor a val_bpb number" in capsys.readouterr().err
    assert main(["stats", str(tmp_path / "absent")]) == 2
    assert "summary.json not found" in capsys.readouterr().err


def test_groups_of_different_tokenizers_are_compared_in_bpb() -> None:
    # CaseOps against plain (the CPU pair of issue 16.5): more tokens per byte, so far fewer nats per token
    # at nearly the same bpb. Nats per token would call that a 0.38-nat gain; the test must see the bpb.
    caseops = [
        RunScore("c1", 2.15321, 3.23971),
        RunScore("c2", 2.15451, 3.24167),
        RunScore("c3", 2.16729, 3.26090),
    ]
    plain = [
        RunScore("p1", 2.18190, 3.65575),
        RunScore("p2", 2.15475, 3.61026),
        RunScore("p3", 2.16190, 3.62224),
    ]
    res = compare_to_runs(caseops, plain, threshold=0.0, alpha=0.05)
    ratio = statistics.fmean(r.nats_per_bpb for r in plain)
    bpb_gain = statistics.fmean(r.val_bpb for r in plain) - statistics.fmean(r.val_bpb for r in caseops)
    assert res.improvement == pytest.approx(ratio * bpb_gain, rel=1e-12)  # 0.0131 nats, not 0.382
    assert not res.passed  # seeds disagree: 3 runs do not show it
    assert "compares val_bpb converted at the baseline's" in format_stats(caseops, plain, res)
    # one tokenizer: the same test on val_loss as before
    same = compare_to_runs(scores(PR1541_TTT), scores(PR1394_SLIDING))
    old = [r.val_loss for r in scores(PR1394_SLIDING)]
    new = [r.val_loss for r in scores(PR1541_TTT)]
    assert same.improvement == pytest.approx(statistics.fmean(old) - statistics.fmean(new), rel=1e-12)
