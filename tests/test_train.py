"""The training loop end to end on tiny configs: outputs, log format, resume, warm-up, NaN, wallclock, CLI."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest
import torch
from conftest import tiny_cfg

from pgolf.config import ConfigError, load_run_config, to_dict
from pgolf.model import GPT
from pgolf.train import StepEvent, TrainingDiverged, load_checkpoint, parse_log_line, train

TRAIN_JSON_KEYS = {
    "steps",
    "train_seconds",
    "tokens_per_second",
    "final_train_loss",
    "val_loss",
    "val_bpb",
    "looping_enabled_at_step",
    "stopped_reason",
    "history",
}


pytestmark = pytest.mark.usefixtures("one_thread")


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)


def test_outputs_log_lines_and_train_json(tiny_data, tmp_path):
    cfg = tiny_cfg(tiny_data, "train.val_every=3")
    run = tmp_path / "run"
    result = train(cfg, run)
    assert {p.name for p in run.iterdir()} >= {
        "config.toml",
        "train.log",
        "checkpoint.pt",
        "model.pt",
        "train.json",
    }
    saved = json.loads((run / "train.json").read_text())
    assert set(saved) == TRAIN_JSON_KEYS and saved == json.loads(json.dumps(result))
    assert saved["steps"] == 6 and saved["stopped_reason"] == "iterations"
    assert saved["looping_enabled_at_step"] == 3  # enable_looping_at 0.5 of 6 steps
    assert [h["step"] for h in saved["history"]["train"]] == [2, 4, 6]
    assert [h["step"] for h in saved["history"]["val"]] == [3, 6]  # periodic + final
    assert saved["val_bpb"] is None and math.isfinite(saved["val_loss"])  # no tokenizer: loss only
    assert saved["tokens_per_second"] == pytest.approx(6 * 1024 / saved["train_seconds"])
    assert to_dict(load_run_config(run)) == to_dict(cfg)

    events = [parse_log_line(line) for line in (run / "train.log").read_text().splitlines()]
    trains = [e for e in events if e["event"] == "train"]
    assert [(e["step"], e["iterations"]) for e in trains] == [(2, 6), (4, 6), (6, 6)]
    assert all(e["train_time_ms"] > 0 and e["tok_per_s"] > 0 for e in trains)
    assert trains[-1]["train_loss"] == pytest.approx(saved["final_train_loss"], abs=1e-4)
    vals = [e for e in events if e["event"] == "val"]
    assert [e["step"] for e in vals] == [3, 6] and vals[0]["val_bpb"] == "na"
    loop = [e for e in events if e["event"] == "loop_enabled"]
    assert loop == [{"event": "loop_enabled", "step": 3, "frac": 0.5}]

    # model.pt holds the EMA weights: equal to the checkpoint's fp32 EMA cast to each tensor's dtype.
    ck = load_checkpoint(run / "checkpoint.pt")
    weights = final_weights(run)
    for name, avg in ck["ema"]["shadow"].items():
        assert torch.equal(weights[name], avg.to(weights[name].dtype)), name
    GPT(cfg.model).load_state_dict(weights)  # a plain GPT state_dict


def test_resume_after_sigterm_is_bitwise_identical(tiny_data, tmp_path):
    """Interrupted at step 2 (SIGTERM through the real handler), then resumed, the final weights equal an
    uninterrupted 6-step run bit for bit: with max_wallclock_seconds=0 every schedule value is a function
    of the step, and the checkpoint restores every piece of state exactly (fp32 weights and optimizer
    moments, Muon buffers, EMA, loader RNG position, RNG states); CPU kernels are deterministic."""
    cfg = tiny_cfg(tiny_data)
    full = train(cfg, tmp_path / "full")

    def interrupt(ev: StepEvent) -> None:
        if ev.step == 2:
            signal.raise_signal(signal.SIGTERM)

    part = train(cfg, tmp_path / "split", on_step=interrupt)
    assert part["stopped_reason"] == "sigterm" and part["steps"] == 2
    assert not (tmp_path / "split" / "model.pt").exists()
    assert load_checkpoint(tmp_path / "split" / "checkpoint.pt")["step"] == 2
    resumed = train(cfg, tmp_path / "split", resume=True)
    assert (
        resumed["steps"] == 6 and resumed["looping_enabled_at_step"] == full["looping_enabled_at_step"] == 3
    )
    assert [h["loss"] for h in resumed["history"]["train"]] == [h["loss"] for h in full["history"]["train"]]
    a, b = final_weights(tmp_path / "full"), final_weights(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = (tmp_path / "split" / "train.log").read_text()
    assert "stopped reason:sigterm step:2" in log and "resumed step:2" in log

    other = tiny_cfg(tiny_data, "optim.matrix_lr=0.5")
    with pytest.raises(ConfigError, match="optim.matrix_lr"):
        train(other, tmp_path / "split", resume=True)


def test_compile_warmup_restores_state(tiny_data, tmp_path):
    """Warm-up steps (plain and looped) are undone: same final weights as no warm-up."""
    cold = train(tiny_cfg(tiny_data, "train.iterations=3"), tmp_path / "cold")
    warm = train(tiny_cfg(tiny_data, "train.iterations=3", "train.warmup_steps=2"), tmp_path / "warm")
    for kind in ("train", "val"):
        assert [h["loss"] for h in cold["history"][kind]] == [h["loss"] for h in warm["history"][kind]]
    a, b = final_weights(tmp_path / "cold"), final_weights(tmp_path / "warm")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_and_keeps_last_checkpoint(tiny_data, tmp_path):
    cfg = tiny_cfg(tiny_data, "train.checkpoint_every=2")
    run = tmp_path / "run"

    def poison(ev: StepEvent) -> None:
        if ev.step == 3:
            with torch.no_grad():
                ev.model.tok_emb.weight.fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match="non-finite train loss at step 4.*left untouched"):
        train(cfg, run, on_step=poison)
    ck = load_checkpoint(run / "checkpoint.pt")
    assert ck["step"] == 2 and all(torch.isfinite(t).all() for t in ck["model"].values())
    saved = json.loads((run / "train.json").read_text())
    assert saved["stopped_reason"] == "nan" and saved["steps"] == 3 and set(saved) == TRAIN_JSON_KEYS
    assert not (run / "model.pt").exists()


def test_wallclock_cap_stops_training(tiny_data, tmp_path):
    cfg = tiny_cfg(tiny_data, "train.iterations=100000", "train.max_wallclock_seconds=1.5", "train.log_every=1")
    result = train(cfg, tmp_path / "run", quant_reserve_seconds=0.5)  # budget 1.0 s
    assert result["stopped_reason"] == "wallclock" and 0 < result["steps"] < 100000
    # The rule, whatever the machine's speed: a step starts only when the clock plus the previous step's
    # duration stays within the 1.0 s budget, and training stops at the first step that would not.
    t = [0.0, 0.0] + [h["time_s"] for h in result["history"]["train"]]
    assert len(t) == result["steps"] + 2
    assert all(t[k] + (t[k] - t[k - 1]) <= 1.0 for k in range(1, len(t) - 1))
    assert t[-1] + (t[-1] - t[-2]) > 1.0


def test_cli_train(tiny_data, tmp_path, capsys):
    from pgolf.cli import main

    run = tmp_path / "run"
    sets = [
        "model.vocab_size=1024",
        "data.train_batch_tokens=1024",
        "train.autocast=off",
        "train.iterations=2",
    ]
    argv = ["train", "--preset", "smoke", "--data", str(tiny_data), "--out", str(run)]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    assert json.loads((run / "train.json").read_text())["steps"] == 2
    assert main(["train", "--preset", "smoke", "--data", str(tmp_path / "nope"), "--out", str(run)]) == 2
    assert "nope" in capsys.readouterr().err


def test_val_bpb_with_tokenizer(sp1024_shards, tmp_path):
    """Real corpus shards + tokenizer: validation reports bpb through pgolf.data.bytes."""
    cfg = tiny_cfg(sp1024_shards, "train.iterations=2", "data.max_val_tokens=4097")
    result = train(cfg, tmp_path / "run")
    assert math.isfinite(result["val_bpb"]) and result["val_bpb"] > 0
    # For this tokenizer a token covers several bytes, so bits/byte < nats/token / ln 2.
    assert result["val_bpb"] < result["val_loss"] / math.log(2)
    last = parse_log_line((tmp_path / "run" / "train.log").read_text().splitlines()[-1])
    assert last["event"] == "val" and last["val_bpb"] == pytest.approx(result["val_bpb"], abs=1e-4)
