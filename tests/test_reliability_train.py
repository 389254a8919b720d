"""docs/reliability.md, training rows: nothing executes on load, no training is lost, one writer per run
directory, truthful messages. Each test failed on the main branch before this change."""

from __future__ import annotations

import builtins
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_SETS, tiny_cfg

from pgolf import rundir
from pgolf.cli import main
from pgolf.config import preset
from pgolf.config.presets import PRESETS
from pgolf.train import StepEvent, TrainingDiverged, load_checkpoint, train
from pgolf.train.loop import SIGNAL_EXIT, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
SRC = str(Path(__file__).resolve().parents[1] / "src")


def cli_sets(*sets: str) -> list[str]:
    """tiny_cfg's overrides as `--set` arguments of the smoke preset."""
    return [arg for s in (*TINY_SETS, *sets) for arg in ("--set", s)]


class RunsCode:
    """Unpickling this calls builtins.open(marker, "w"): a stand-in for any code a crafted file could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def test_checkpoint_is_plain_data_and_code_in_one_is_refused(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_cfg(tiny_data), run)
    state = torch.load(run / "checkpoint.pt", weights_only=True)  # optimizer, loader, RNG: all plain data
    assert state["step"] == 6 and isinstance(state["per_rank"][0]["rng"]["numpy"]["state"]["key"], list)

    marker = tmp_path / "pwned"
    torch.save({"version": 2, "step": RunsCode(marker)}, run / "checkpoint.pt")
    with pytest.raises(ValueError, match="checkpoint.pt: refused: .* could run code"):
        load_checkpoint(run / "checkpoint.pt")
    argv = ["train", "--out", str(run), "--resume", "--data", str(tiny_data)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "refused" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    torch.save({"tok_emb.weight": RunsCode(marker)}, run / "model.pt")
    with pytest.raises(ValueError, match="model.pt: refused"):
        rundir.load_weights(run / "model.pt")
    assert not marker.exists()


def test_existing_checkpoint_needs_resume_or_fresh(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--preset", "smoke", "--data", str(tiny_data), "--out", str(run), *cli_sets()]
    assert main(argv) == 0
    before = (run / "model.pt").read_bytes()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "checkpoint.pt exists" in err and "--resume" in err and "--fresh" in err
    assert (run / "model.pt").read_bytes() == before  # nothing touched
    (run / "quant.json").write_text("{}")  # a later stage's output: removed by a fresh start
    assert main([*argv, "--fresh"]) == 0
    assert not (run / "quant.json").exists() and (run / "model.pt").read_bytes() == before


def test_sigint_checkpoints_and_exits_130(tiny_data, tmp_path):
    def interrupt(ev: StepEvent) -> None:
        if ev.step == 2:
            signal.raise_signal(signal.SIGINT)

    result = train(tiny_cfg(tiny_data), tmp_path / "run", on_step=interrupt)
    assert result["stopped_reason"] == "sigint" and SIGNAL_EXIT["sigint"] == 130
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 2
    assert not (tmp_path / "run" / "model.pt").exists()
    assert "interrupted by SIGINT: checkpoint" in (tmp_path / "run" / "train.log").read_text()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


def test_run_after_a_signal_says_so_and_stops(sp1024_shards, tmp_path, monkeypatch, capsys):
    step = Trainer.step

    def step_then_sigterm(self, loss, frac):
        step(self, loss, frac)
        if self.step_count == 2:
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(Trainer, "step", step_then_sigterm)
    run = tmp_path / "run"
    argv = ["run", "--preset", "smoke", "--data", str(sp1024_shards), "--out", str(run), *cli_sets()]
    assert main(argv) == 143
    err = capsys.readouterr().err
    assert "interrupted by SIGTERM at step 2" in err and "--resume" in err and "no trained weights" not in err
    assert not (run / "quant.json").exists() and (run / "checkpoint.pt").is_file()


def test_nan_in_run_is_one_truthful_line(sp1024_shards, tmp_path, monkeypatch, capsys):
    step = Trainer.step

    def step_then_poison(self, loss, frac):
        step(self, loss, frac)
        if self.step_count == 3:
            with torch.no_grad():
                self.raw.tok_emb.weight.fill_(float("nan"))

    monkeypatch.setattr(Trainer, "step", step_then_poison)
    run = tmp_path / "run"
    argv = ["run", "--preset", "smoke", "--data", str(sp1024_shards), "--out", str(run)]
    assert main([*argv, *cli_sets("train.checkpoint_every=2")]) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "non-finite train loss at step 4" in err and "no model.pt written" in err
    assert "checkpoint.pt (step 2) is left untouched" in err and not (run / "model.pt").exists()


def test_model_pt_is_written_before_the_final_checkpoint(tiny_data, tmp_path, monkeypatch):
    def disk_full(path, state):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("pgolf.train.loop.save_checkpoint", disk_full)
    with pytest.raises(OSError):
        train(tiny_cfg(tiny_data), tmp_path / "run")
    assert set(rundir.load_weights(tmp_path / "run" / "model.pt")) >= {"tok_emb.weight"}


def test_time_based_checkpoints_on_by_default(tiny_data, tmp_path):
    assert all(preset(name).train.checkpoint_seconds > 0 for name in PRESETS)
    train(tiny_cfg(tiny_data, "train.checkpoint_seconds=1e-9"), tmp_path / "run")
    log = (tmp_path / "run" / "train.log").read_text()
    assert [f"checkpoint step:{s} " in log for s in range(1, 6)] == [True] * 5


def test_second_writer_is_refused_and_a_stale_lock_taken_over(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    argv = ["train", "--preset", "smoke", "--data", str(tiny_data), "--out", str(run), *cli_sets()]
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ".lock").write_text(f'{{"pid": {holder.pid}, "host": "{os.uname().nodename}"}}')
        assert main(argv) == 2
        assert f"in use by pid {holder.pid}" in capsys.readouterr().err
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    assert main(argv) == 0  # the holder is gone: its lock is stale
    assert not (run / ".lock").exists() and (run / "model.pt").is_file()
    with rundir.RunLock(run):  # re-entrant in one process (`pgolf run` holds it while train takes it)
        with rundir.RunLock(tmp_path / "x" / ".." / "run"):
            assert (run / ".lock").is_file()
        assert (run / ".lock").is_file()
    assert not (run / ".lock").exists()


def test_nan_after_a_fresh_start_says_no_checkpoint(tiny_data, tmp_path):
    def poison(ev: StepEvent) -> None:
        if ev.step == 1:
            with torch.no_grad():
                ev.model.tok_emb.weight.fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match="no model.pt written; no checkpoint was written"):
        train(tiny_cfg(tiny_data), tmp_path / "run", on_step=poison)


def test_sigkill_then_resume_equals_an_uninterrupted_run(tiny_data, tmp_path):
    """Acceptance (issue 13.4): kill -9 mid-run, resume, same weights bit for bit; at most one checkpoint
    interval (4 steps) is redone. Step-based budget, so the schedule is a function of the step."""
    sets = ["train.iterations=24", "train.checkpoint_every=4", "train.log_every=1"]
    run = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1")
    argv = ["train", "--preset", "smoke", "--data", str(tiny_data), "--out", str(run), *cli_sets(*sets)]
    child = subprocess.Popen([sys.executable, "-m", "pgolf.cli", *argv], env=env, stdout=subprocess.DEVNULL)
    log = run / "train.log"
    deadline = time.monotonic() + 120
    while "checkpoint step:" not in (log.read_text() if log.is_file() else ""):
        assert child.poll() is None and time.monotonic() < deadline, "training ended before a checkpoint"
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    lines = log.read_text().splitlines()
    reached = max(int(ln.split()[0].split(":")[1].split("/")[0]) for ln in lines if ln.startswith("step:"))
    assert reached < 24 and not (run / "model.pt").exists()

    cfg = tiny_cfg(tiny_data, *sets)
    resumed = train(cfg, run, resume=True)
    restart = int(next(ln for ln in log.read_text().splitlines() if ln.startswith("resumed")).split()[1][5:])
    assert 4 <= restart <= reached and reached - restart <= 4
    full = train(cfg, tmp_path / "full")
    assert resumed["steps"] == full["steps"] == 24
    a, b = rundir.load_weights(run / "model.pt"), rundir.load_weights(tmp_path / "full" / "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
