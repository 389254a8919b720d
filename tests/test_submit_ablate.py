"""`pgolf ablate`: the toggle table, the paired-difference table, resumption, and a smoke ablation end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pgolf.cli import main
from pgolf.config import ConfigError, RunConfig, preset, set_value
from pgolf.fileio import atomic_write_json
from pgolf.submit import ablate
from pgolf.submit.ablate import (
    BUILTIN,
    AlreadyOff,
    Toggle,
    ablation_table,
    parse_seeds,
    parse_toggles,
    run_ablation,
    toggled_config,
    write_table,
)

EMA = ablate.TOGGLES["ema"]
QK = ablate.TOGGLES["qk_gain"]


def fake_summary(bpb: float, artifact: int, train_s: float, eval_s: float, cap: int = 10_000) -> dict:
    return {
        "val_bpb": bpb,
        "val_loss": bpb * 2.5,
        "pre_quant_bpb": bpb - 0.01,
        "quant_bpb": bpb,
        "sliding_bpb": None,
        "ttt_bpb": None,
        "ngram_bpb": None,
        "artifact_bytes": artifact,
        "code_bytes": 100,
        "total_bytes": artifact + 100,
        "cap_bytes": cap,
        "train_seconds": train_s,
        "eval_seconds": eval_s,
    }


def put(out: Path, name: str, seed: int, summary: dict) -> None:
    atomic_write_json(ablate.run_dir(out, name, seed) / "summary.json", summary)


def test_table_is_the_mean_and_std_of_paired_differences(tmp_path: Path):
    base = {1: (1.50, 5000, 10.0, 2.0), 2: (1.60, 5100, 11.0, 2.5), 3: (1.40, 4900, 9.0, 1.5)}
    # Off is worse by 0.03, 0.01, 0.05: the paired std (0.02) is far below the spread of the runs (~0.1).
    off = {1: (1.53, 5200, 12.0, 2.0), 2: (1.61, 5250, 12.0, 3.0), 3: (1.45, 5000, 10.5, 1.0)}
    for s in base:
        put(tmp_path, "baseline", s, fake_summary(*base[s]))
        put(tmp_path, "ema", s, fake_summary(*off[s]))
    put(tmp_path, "qk_gain", 1, fake_summary(1.49, 5000, 10.0, 2.0))  # seeds 2, 3 not finished yet
    table = write_table(tmp_path, "smoke", [EMA, QK], [1, 2, 3])
    ema, qk = table["rows"]
    diffs = [0.03, 0.01, 0.05]
    assert ema["n"] == 3
    assert ema["delta_bpb"] == pytest.approx(np.mean(diffs), abs=1e-12)
    assert ema["std_bpb"] == pytest.approx(np.std(diffs, ddof=1), abs=1e-12)
    assert ema["std_bpb"] == pytest.approx(0.02, abs=1e-12)
    assert ema["per_seed_delta_bpb"] == pytest.approx({"1": 0.03, "2": 0.01, "3": 0.05}, abs=1e-12)
    assert ema["delta_artifact_bytes"] == pytest.approx((200 + 150 + 100) / 3)
    assert ema["delta_train_seconds"] == pytest.approx((2.0 + 1.0 + 1.5) / 3)
    assert ema["delta_eval_seconds"] == pytest.approx((0.0 + 0.5 - 0.5) / 3)
    assert qk["n"] == 1 and qk["delta_bpb"] == pytest.approx(-0.01) and qk["std_bpb"] is None
    assert table["baseline"]["val_bpb"] == pytest.approx(1.5) and table["baseline"]["n"] == 3
    assert json.loads((tmp_path / "ablation.json").read_text()) == table
    md = (tmp_path / "ablation.md").read_text()
    assert "| ema | +0.03000 | 0.02000 | +150 | +1.5 | +0.0 | 3 | `optim.ema_decay=0`" in md
    console = ablate.format_table(table).splitlines()
    assert console[2].split() == ["ema", "+0.03000", "0.02000", "+150", "+1.5", "+0.0", "3"]
    assert console[3].split() == ["qk_gain", "-0.01000", "-", "+0", "+0.0", "+0.0", "1"]


def test_over_cap_runs_count_bytes_but_not_bpb(tmp_path: Path):
    for s in (1, 2):
        put(tmp_path, "baseline", s, fake_summary(1.5, 5000, 10.0, 2.0))
    over = fake_summary(1.2, 20_000, 10.0, 1.0)
    over.update(quant_bpb=None, val_bpb=1.2)  # over the cap: only the unquantized weights were scored
    put(tmp_path, "int7_embed", 1, over)
    put(tmp_path, "int7_embed", 2, fake_summary(1.52, 6000, 10.0, 2.0))
    for s in (1, 2):  # a toggle of the eval plan: scored at another stage, but quantized, so it counts
        bpb = 1.5 + s / 100
        put(tmp_path, "plan", s, dict(fake_summary(bpb, 5000, 10.0, 3.0), sliding_bpb=bpb))
    toggles = [ablate.TOGGLES["int7_embed"], Toggle("plan", ("eval.plan=prequant,quant,sliding",), "")]
    row, plan = ablation_table(tmp_path, "pr1855", toggles, [1, 2])["rows"]
    assert row["over_cap"] == 1 and row["n"] == 1
    assert row["delta_bpb"] == pytest.approx(0.02)
    assert row["delta_artifact_bytes"] == pytest.approx((15_000 + 1000) / 2)
    assert plan["over_cap"] == 0 and plan["n"] == 2 and plan["delta_bpb"] == pytest.approx(0.015)


def test_a_run_over_the_cap_does_not_stop_the_ablation(tmp_path: Path, capsys):
    from pgolf.quant.pipeline import OverCapError

    calls = []

    def run(cfg: RunConfig, run_dir: Path, how: object) -> None:
        calls.append((run_dir.relative_to(tmp_path).as_posix(), cfg.train.seed, cfg.quant.embed_bits, how))
        if cfg.quant.embed_bits == 8:  # int7_embed off: the int8 embedding no longer fits
            atomic_write_json(
                run_dir / "summary.json", dict(fake_summary(1.3, 20_000, 1.0, 1.0), quant_bpb=None)
            )
            raise OverCapError("over the cap", {})
        atomic_write_json(run_dir / "summary.json", fake_summary(1.5, 5000, 1.0, 1.0))

    def runner(cfg: RunConfig, run_dir: Path, resume: bool) -> None:
        run(cfg, run_dir, resume)

    def requantizer(cfg: RunConfig, run_dir: Path, trained: Path) -> None:
        run(cfg, run_dir, trained.relative_to(tmp_path).as_posix())

    table = run_ablation(
        preset("pr1855"), [ablate.TOGGLES["int7_embed"], QK], [5, 6], tmp_path, runner, requantizer
    )
    assert calls == [  # int7_embed sets quant.* only: its runs requantize the baseline of their seed
        ("baseline/seed_5", 5, 7, False),
        ("int7_embed/seed_5", 5, 8, "baseline/seed_5"),
        ("qk_gain/seed_5", 5, 7, False),
        ("baseline/seed_6", 6, 7, False),
        ("int7_embed/seed_6", 6, 8, "baseline/seed_6"),
        ("qk_gain/seed_6", 6, 7, False),
    ]
    int7, qk = table["rows"]
    assert (int7["n"], int7["over_cap"], int7["delta_bpb"]) == (0, 2, None)
    assert int7["delta_artifact_bytes"] == 15_000
    assert (qk["n"], qk["delta_bpb"], qk["std_bpb"]) == (2, 0.0, 0.0)
    out = capsys.readouterr().out
    assert "0 of 6 runs already done" in out and "- (2 over cap)" in out
    assert json.loads((tmp_path / "ablation.json").read_text()) == table


def test_parse_toggles_names_and_ad_hoc():
    got = parse_toggles(["ema,qk_gain", "xsa,plan2=eval.plan=prequant,quant;model.num_loops=0"])
    assert [t.name for t in got] == ["ema", "qk_gain", "xsa", "plan2"]
    assert got[3].sets == ("eval.plan=prequant,quant", "model.num_loops=0")
    cfg = toggled_config(preset("smoke"), got[3])
    assert cfg.eval.plan == ["prequant", "quant"] and cfg.model.num_loops == 0
    for bad, match in [
        (["ema,nope"], "unknown toggle 'nope'"),
        (["ema=model.num_loops=0"], "needs a new name"),
        (["baseline=model.num_loops=0"], "needs a new name"),
        (["x=model.num_loops"], "expected x=section.field=value"),
        (["ema", "ema"], "'ema' is given twice"),
        ([], "at least one technique"),
    ]:
        with pytest.raises(ConfigError, match=match):
            parse_toggles(bad)


def test_toggle_errors_name_the_toggle_and_field():
    smoke = preset("smoke")
    with pytest.raises(ConfigError, match=r"toggle 'bad': unknown config key 'model\.nope'"):
        toggled_config(smoke, Toggle("bad", ("model.nope=1",), ""))
    with pytest.raises(ConfigError, match=r"toggle 'neg': config key 'model\.num_loops': expected a number"):
        toggled_config(smoke, Toggle("neg", ("model.num_loops=-1",), ""))
    with pytest.raises(AlreadyOff, match="preset smoke already has it off"):
        toggled_config(smoke, ablate.TOGGLES["polar_ns"])  # smoke uses the quintic already


def test_every_builtin_toggle_names_real_fields_and_is_on_in_some_preset():
    from pgolf.config import PRESETS

    for t in BUILTIN:
        for item in t.sets:
            key, _, value = item.partition("=")
            set_value(RunConfig(), key, value)
        on = [name for name in PRESETS if _is_on(preset(name), t)]
        assert on, f"{t.name}: no preset has it on"
    assert ablate.TOGGLES["qk_gain"].sets == ("model.qk_gain_init=4.0",)  # #1394's value, not "no gain"


def _is_on(cfg: RunConfig, t: Toggle) -> bool:
    try:
        toggled_config(cfg, t)
    except AlreadyOff:
        return False
    return True


def test_list_shows_which_toggles_a_preset_has_on(capsys):
    assert main(["ablate", "pr1855", "--list"]) == 0
    states = {line.split()[0]: line[16:28].strip() for line in capsys.readouterr().out.splitlines()}
    assert list(states) == [t.name for t in BUILTIN]
    for name in ("polar_ns", "min_lr", "int7_embed", "pergroup", "smear_gate", "sparse_gate", "fused_ce"):
        assert states[name] == "on", name
    assert states["hessian_clip"] == "already off"
    assert main(["ablate", "pr1855", "--toggle", "ema"]) == 2
    assert "--out is required" in capsys.readouterr().err


def test_parse_seeds():
    assert parse_seeds("3", 1337) == [1337, 1338, 1339]
    assert parse_seeds("1337,42,7", 1) == [1337, 42, 7]
    assert parse_seeds("42,", 1) == [42]
    for bad in ("0", "x", "1,1", "1,,2", ""):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(bad, 1)


def test_bad_toggle_fails_before_any_training(tmp_path: Path, capsys):
    calls = []
    toggles = [EMA, Toggle("typo", ("optim.ema_dcay=0",), "")]
    with pytest.raises(ConfigError, match="toggle 'typo': unknown config key 'optim.ema_dcay'"):
        run_ablation(preset("smoke"), toggles, [1], tmp_path, runner=lambda *a, **k: calls.append(a))
    assert calls == [] and not any(tmp_path.iterdir())
    assert main(["ablate", "smoke", "--out", str(tmp_path), "--toggle", "ema,polar_ns", "--seeds", "1"]) == 2
    assert "preset smoke already has it off" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


FAST = [
    "train.iterations=2",
    "train.val_every=0",
    "data.max_val_tokens=2048",
    "eval.batch_seqs=16",
    "eval.plan=prequant,quant",
]


def ablate_args(data: Path, out: Path, *extra: str) -> list[str]:
    args = ["ablate", "smoke", "--data", str(data), "--out", str(out), "--toggle", "ema", "--seeds", "1,2"]
    for s in FAST:
        args += ["--set", s]
    return args + list(extra)


@pytest.fixture(scope="module")
def smoke_ablation(sp8192_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ablate") / "out"
    assert main(ablate_args(sp8192_shards, out)) == 0
    return out


def test_smoke_ablation_tree_and_delta(smoke_ablation: Path):
    out = smoke_ablation
    assert sorted(p.name for p in out.iterdir()) == ["ablation.json", "ablation.md", "baseline", "ema"]
    runs = {}
    for name in ("baseline", "ema"):
        assert sorted(p.name for p in (out / name).iterdir()) == ["seed_1", "seed_2"]
        for s in (1, 2):
            summary = json.loads((out / name / f"seed_{s}" / "summary.json").read_text())
            assert (summary["seed"], summary["steps"], summary["preset"]) == (s, 2, "smoke")
            runs[name, s] = summary
    assert "ema_decay = 0.0" in (out / "ema" / "seed_1" / "config.toml").read_text()
    assert "ema_decay = 0.5" in (out / "baseline" / "seed_1" / "config.toml").read_text()
    (row,) = json.loads((out / "ablation.json").read_text())["rows"]
    diffs = [runs["ema", s]["val_bpb"] - runs["baseline", s]["val_bpb"] for s in (1, 2)]
    assert row["n"] == 2
    assert row["delta_bpb"] == pytest.approx(np.mean(diffs), abs=1e-12)
    assert row["std_bpb"] == pytest.approx(np.std(diffs, ddof=1), abs=1e-12)
    art = [runs["ema", s]["artifact_bytes"] - runs["baseline", s]["artifact_bytes"] for s in (1, 2)]
    assert row["delta_artifact_bytes"] == pytest.approx(np.mean(art))


def test_rerun_reuses_finished_runs_and_continues_unfinished(
    smoke_ablation: Path, sp8192_shards: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    from pgolf.submit import pipeline

    out = smoke_ablation
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/seed_*/*") if p.is_file()}
    real, calls = pipeline.run_pipeline, []

    def spy(cfg, run_dir, **kw):
        calls.append(Path(run_dir))
        return real(cfg, run_dir, **kw)

    monkeypatch.setattr(pipeline, "run_pipeline", spy)
    assert main(ablate_args(sp8192_shards, out)) == 0
    assert calls == []
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert "4 of 4 runs already done" in capsys.readouterr().out

    before = json.loads((out / "ablation.json").read_text())["rows"][0]
    (out / "ema" / "seed_2" / "summary.json").unlink()  # as if interrupted before its summary
    assert main(ablate_args(sp8192_shards, out)) == 0
    assert calls == [out / "ema" / "seed_2"]
    after = json.loads((out / "ablation.json").read_text())["rows"][0]
    assert after["n"] == 2 and after["per_seed_delta_bpb"]["1"] == before["per_seed_delta_bpb"]["1"]

    calls.clear()
    assert main(ablate_args(sp8192_shards, out, "--set", "train.iterations=3")) == 2
    err = capsys.readouterr().err
    assert "holds a run of a different config" in err and "train.iterations: 2 there, 3 planned" in err
    assert calls == []


def test_a_quant_only_toggle_requantizes_the_baseline_and_a_mixed_one_retrains(
    sp8192_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from pgolf import rundir
    from pgolf.submit import pipeline

    base = preset("smoke")
    base.data.dir = str(sp8192_shards)
    for item in FAST:
        key, _, value = item.partition("=")
        set_value(base, key, value)
    real, calls = pipeline.run_pipeline, []

    def runner(cfg: RunConfig, run_dir: Path, **kw):
        calls.append(Path(run_dir).relative_to(tmp_path).as_posix())
        return real(cfg, run_dir, **kw)

    mixed = Toggle("mixed", ("model.qk_gain_init=4.0", "quant.method=rtn"), "")
    toggles = [ablate.TOGGLES["gptq"], mixed]
    assert ablate.requantizes(toggles[0]) and not ablate.requantizes(mixed)
    table = run_ablation(base, toggles, [1], tmp_path, runner=runner)
    assert calls == ["baseline/seed_1", "mixed/seed_1"]  # the quant-only toggle never trained
    b, g, m = (tmp_path / name / "seed_1" for name in ("baseline", "gptq", "mixed"))
    assert (g / "model.pt").read_bytes() == (b / "model.pt").read_bytes() != (m / "model.pt").read_bytes()
    assert (g / "train.json").read_bytes() == (b / "train.json").read_bytes()
    assert not (g / "checkpoint.pt").exists()
    quant = {d: json.loads((d / "quant.json").read_text()) for d in (b, g)}
    assert (quant[b]["method"], quant[g]["method"]) == ("gptq", "rtn")  # its own quantization ...
    assert (g / "model.ptz").read_bytes() != (b / "model.ptz").read_bytes()
    sb, sg = (json.loads((d / "summary.json").read_text()) for d in (b, g))
    assert sg["pre_quant_bpb"] == sb["pre_quant_bpb"] and sg["quant_bpb"] != sb["quant_bpb"]  # ... and eval
    assert (sg["steps"], sg["tokens_per_second"], sg["seed"]) == (sb["steps"], sb["tokens_per_second"], 1)
    row_g, row_m = table["rows"]
    assert row_g["requantized"] and row_g["delta_train_seconds"] == 0.0 and not row_m["requantized"]
    assert row_g["delta_quant_seconds"] == pytest.approx(sg["train_seconds"] - sb["train_seconds"])
    assert row_m["delta_quant_seconds"] is None
    assert row_g["delta_bpb"] == pytest.approx(sg["val_bpb"] - sb["val_bpb"], abs=1e-12)
    dq = format(row_g["delta_quant_seconds"], "+.1f")
    assert f"| +0.0 (requantized; quantization {dq} s) |" in (tmp_path / "ablation.md").read_text()
    rundir.check_fresh(g, ("train", "quant", "eval", "summary"))  # a run dir `pgolf report` accepts

    # resumable: finished runs are reused; an unfinished requantized run is redone from the baseline
    calls.clear()
    (g / "summary.json").unlink()
    requantized = []
    real_requantize = ablate.requantize
    monkeypatch.setattr(ablate, "requantize", lambda *a, **k: requantized.append(a[1]) or real_requantize(*a, **k))
    run_ablation(base, toggles, [1], tmp_path, runner=runner)
    assert calls == [] and requantized == [g] and (g / "summary.json").is_file()
    assert (g / "model.pt").read_bytes() == (b / "model.pt").read_bytes()

    # the training reused must be finished and of the same config outside quant / eval
    with pytest.raises(rundir.StaleRunError, match="run the train stage"):
        ablate.reuse_training(toggled_config(base, toggles[0]), tmp_path / "x", tmp_path / "nothing")
    with pytest.raises(ConfigError, match="model.qk_gain_init"):
        ablate.reuse_training(toggled_config(base, mixed), tmp_path / "y", b)
