"""summary.json from hand-made run directories (the JSON contract of docs/design.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pgolf import rundir
from pgolf.config import ConfigError, preset, to_toml
from pgolf.config.schema import EVAL_MODES
from pgolf.submit.summary import (
    SUMMARY_KEYS,
    WATERFALL,
    build_summary,
    code_counts,
    format_summary,
    run_budgets,
    write_summary,
)

# SPEC §11's #1394-script reference run on the cpu-golf track, reshaped into pgolf's run-directory files.
EVAL_BPB = {"prequant": 1.9540, "quant": 1.9597, "sliding": 1.9601, "ttt": 1.9405, "ngram": 1.9398}
NATS_PER_BPB = 1.5  # arbitrary but fixed: loss = bpb * ratio for every mode


def make_run_dir(
    path: Path,
    *,
    modes: tuple[str, ...] = ("prequant", "quant", "sliding"),
    seed: int = 1337,
    total_bytes: int = 1_950_000,
    train_seconds: float = 570.0,
    eval_seconds: float = 315.0,
) -> Path:
    """A complete run directory (cpu-golf-2mb config: the v1 track, code counted) whose eval.json holds
    `modes` in the order given."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = preset("cpu-golf-2mb")
    cfg.train.seed = seed
    (path / "config.toml").write_text(to_toml(cfg))
    train = {
        "steps": 307,
        "train_seconds": train_seconds,
        "tokens_per_second": 8192.5,
        "final_train_loss": 3.01,
        "val_loss": 2.95,
        "val_bpb": 1.97,
        "looping_enabled_at_step": 188,
        "stopped_reason": "wallclock",
        "history": {
            "train": [{"step": s, "time_s": 1.9 * s, "loss": 7.0 - 0.012 * s} for s in range(0, 308, 25)],
            "val": [
                {"step": s, "time_s": 1.9 * s, "loss": 6.5 - 0.01 * s, "bpb": 4.0 - 0.006 * s}
                for s in (100, 200, 300)
            ],
        },
    }
    code = 48_000
    quant = {
        "artifact_bytes": total_bytes - code,
        "code_bytes": code,
        "total_bytes": total_bytes,
        "cap_bytes": 2_000_000,
        "compressor": "brotli",
        "classes": {
            "matrix": {
                "params": 4_718_592,
                "bits": 6,
                "bytes": total_bytes - code - 400_000,
                "bits_per_weight": 2.6,
            },
            "embed": {"params": 262_144, "bits": 8, "bytes": 380_000, "bits_per_weight": 11.6},
            "control": {"params": 9_000, "bits": 16, "bytes": 15_000, "bits_per_weight": 13.3},
        },
        "hessian_seconds": 12.5,
        "gptq_seconds": 17.5,
    }
    results = [
        {
            "mode": m,
            "loss": EVAL_BPB[m] * NATS_PER_BPB,
            "bpb": EVAL_BPB[m],
            "tokens": 2_074_624,
            "bytes": 8_000_000,
            "seconds": 10.0,
        }
        for m in modes
    ]
    evaluation = {
        "results": results,
        "eval_seconds": eval_seconds,
        "budget_seconds": 600.0,
        "stopped_early": False,
    }
    for name, obj in (("train.json", train), ("quant.json", quant), ("eval.json", evaluation)):
        (path / name).write_text(json.dumps(obj))
    return record_stages(path)


def record_stages(path: Path) -> Path:
    """Fingerprints as the stages record them (train from config.toml; no weight files in these dirs)."""
    rundir.record_stage(path, "train", (path / "config.toml").read_text(), [])
    rundir.record_stage(path, "quant", (path / "config.toml").read_text(), [])
    rundir.record_stage(path, "eval", None, [])
    return path


def _edit_json(path: Path, edit: Any) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_waterfall_follows_the_eval_plan_order() -> None:
    assert tuple(mode for mode, _, _ in WATERFALL) == EVAL_MODES


def test_summary_values_from_the_run_files(tmp_path: Path) -> None:
    s = build_summary(make_run_dir(tmp_path, seed=42))
    assert tuple(s) == SUMMARY_KEYS
    assert s["val_bpb"] == EVAL_BPB["sliding"]
    assert s["val_loss"] == pytest.approx(EVAL_BPB["sliding"] * NATS_PER_BPB)
    assert (s["pre_quant_bpb"], s["quant_bpb"], s["sliding_bpb"]) == (1.9540, 1.9597, 1.9601)
    assert s["ttt_bpb"] is None and s["ngram_bpb"] is None
    assert (s["artifact_bytes"], s["code_bytes"], s["total_bytes"], s["cap_bytes"]) == (
        1_902_000,
        48_000,
        1_950_000,
        2_000_000,
    )
    # Training budget time = loop + Hessians + GPTQ.
    assert s["train_seconds"] == pytest.approx(570.0 + 12.5 + 17.5)
    assert s["eval_seconds"] == 315.0
    assert (s["steps"], s["tokens_per_second"]) == (307, 8192.5)
    assert (s["preset"], s["seed"]) == ("cpu-golf-2mb", 42)


@pytest.mark.parametrize(
    "modes, final",
    [
        (("prequant", "quant"), "quant"),  # stopped early by the eval budget
        (("prequant", "quant", "sliding", "ttt"), "ttt"),
        (("quant", "ttt", "ngram"), "ngram"),
        (("sliding", "prequant"), "sliding"),  # listed out of order: plan order decides
    ],
)
def test_score_is_the_last_mode_in_plan_order(tmp_path: Path, modes: tuple[str, ...], final: str) -> None:
    s = build_summary(make_run_dir(tmp_path, modes=modes))
    assert s["val_bpb"] == EVAL_BPB[final]
    assert s["val_loss"] == pytest.approx(EVAL_BPB[final] * NATS_PER_BPB)
    for mode, key, _ in WATERFALL:
        assert s[key] == (EVAL_BPB[mode] if mode in modes else None)


def test_write_summary_round_trip_and_atomic(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path / "run", modes=("prequant", "quant", "sliding", "ttt"))
    written = write_summary(run)
    assert json.loads((run / "summary.json").read_text()) == written == build_summary(run)
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("name", ["train.json", "quant.json", "eval.json"])
def test_missing_stage_file_is_named(tmp_path: Path, name: str) -> None:
    run = make_run_dir(tmp_path)
    (run / name).unlink()
    with pytest.raises(FileNotFoundError, match=name):
        build_summary(run)


def test_missing_config_is_named(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path)
    (run / "config.toml").unlink()
    with pytest.raises(ConfigError, match="config.toml"):
        build_summary(run)


@pytest.mark.parametrize(
    "name, edit, message",
    [
        (
            "eval.json",
            lambda d: d["results"][0].update(mode="slide"),
            r"eval.json: results\[0\]: mode 'slide'",
        ),
        ("eval.json", lambda d: d["results"].append(dict(d["results"][0])), "appears more than once"),
        ("eval.json", lambda d: d.update(results=[]), "non-empty list"),
        ("eval.json", lambda d: d["results"][1].pop("bpb"), r"results\[1\]: missing field 'bpb'"),
        (
            "quant.json",
            lambda d: d.update(artifact_bytes="big"),
            "quant.json: field 'artifact_bytes' must be an integer",
        ),
        ("quant.json", lambda d: d.update(total_bytes=1.5), "'total_bytes' must be an integer"),
        ("train.json", lambda d: d.pop("steps"), "train.json: missing field 'steps'"),
        ("train.json", lambda d: d.update(train_seconds=True), "'train_seconds' must be a number"),
    ],
)
def test_bad_fields_are_named(tmp_path: Path, name: str, edit: Any, message: str) -> None:
    run = make_run_dir(tmp_path)
    _edit_json(run / name, edit)
    with pytest.raises(ValueError, match=message):
        build_summary(run)


def test_invalid_json_is_named(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path)
    (run / "quant.json").write_text("{not json")
    with pytest.raises(ValueError, match="quant.json: not valid JSON"):
        build_summary(run)
    (run / "quant.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="quant.json: expected a JSON object"):
        build_summary(run)


def test_format_summary_under_cap_and_budget(tmp_path: Path) -> None:
    text = format_summary(build_summary(make_run_dir(tmp_path)))
    assert len(text.splitlines()) <= 25  # one screen
    assert "val_bpb 1.96010" in text and "(from sliding)" in text
    assert "+0.00570" in text and "+0.00040" in text  # quant gap, sliding gap
    assert "TTT" in text and "(not run)" in text
    assert "1,950,000 / cap 2,000,000" in text and "50,000 bytes to spare" in text
    assert "OVER" not in text
    assert "600.0 s / 600 s" in text  # 570 + 30 quantization seconds: exactly the budget is fine


def test_format_summary_flags_over_cap_and_over_budget(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path, total_bytes=3_571_134, train_seconds=589.8, eval_seconds=760.0)
    text = format_summary(build_summary(run), *run_budgets(run))
    assert "OVER CAP by 1,571,134 bytes" in text
    assert "619.8 s / 600 s" in text and "OVER BUDGET by 19.8 s" in text
    assert "OVER BUDGET by 160.0 s" in text
    assert "(no budget)" in format_summary(build_summary(run), None, None)


def test_run_budgets_from_config(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path)
    assert run_budgets(run) == (600.0, 600.0)
    cfg = preset("smoke")  # max_wallclock_seconds = 0: unlimited
    (run / "config.toml").write_text(to_toml(cfg))
    assert run_budgets(run) == (None, 600.0)


def test_format_summary_counts_the_artifact_alone_where_code_is_not_counted(tmp_path: Path) -> None:
    """cpu-golf v2 (quant.cap_counts_code = false): 99,611 B of artifact + 62,701 B of code fit a 100,000 B
    cap; the same numbers on a track that counts code are over it."""
    run = make_run_dir(tmp_path)
    summary = dict(build_summary(run), artifact_bytes=99_611, code_bytes=62_701, total_bytes=162_312, cap_bytes=100_000)
    text = format_summary(summary, code_counted=False)
    assert "99,611 / cap 100,000" in text and "389 bytes to spare" in text and "not counted" in text
    assert "OVER" not in text
    assert "OVER CAP by 62,312 bytes" in format_summary(summary)
    assert code_counts(run) is True  # make_run_dir writes the cpu-golf-2mb (v1) config
    (run / "config.toml").write_text(to_toml(preset("cpu-golf")))
    assert code_counts(run) is False
    cfg = preset("smoke")
    cfg.quant.cap_counts_code = False
    (run / "config.toml").write_text(to_toml(cfg))
    assert code_counts(run) is False
