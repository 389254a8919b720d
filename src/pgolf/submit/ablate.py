"""`pgolf ablate`: train a preset as is and with each technique switched off in turn, over paired seeds.

Layout: OUT/baseline/seed_S and OUT/<toggle>/seed_S are ordinary `run_pipeline` run directories;
OUT/ablation.json and OUT/ablation.md hold the table, rewritten after every finished run. A run whose
summary.json exists and whose config.toml equals the planned config is reused, so rerunning the same
command continues an interrupted ablation.

A toggle that sets only quant.* / eval.* fields (`requantizes`) does not change training: its run takes the
trained weights of the baseline of the same seed (model.pt hard-linked, train.json and train.log copied) and
runs only quantize + eval, so its Δtrain s is 0 by construction and the table marks it "requantized". The
quantization reserve is part of training and stays the baseline's. Runs go seed by seed, the baseline of a
seed first, so a seed's baseline has finished training before any toggle reuses it.

Δ = toggled-off minus baseline for the same seed (positive Δbpb = the technique helps); the table gives
the mean of these paired differences and their sample standard deviation.
"""

from __future__ import annotations

import copy
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pgolf import rundir
from pgolf.config import ConfigError, RunConfig, load_run_config, set_value, to_dict, to_toml, validate
from pgolf.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from pgolf.submit.stats import mean_std
from pgolf.submit.summary import SUMMARY_FILE, read_run_json

BASELINE = "baseline"
TABLE_JSON = "ablation.json"
TABLE_MD = "ablation.md"


@dataclass(frozen=True)
class Toggle:
    """A technique and the `section.field=value` sets that switch it off; `note` says what "off" is."""

    name: str
    sets: tuple[str, ...]
    note: str


# One line per technique. The "off" value is the one the technique replaced, which is not always "none":
# the note says whose value it is.
BUILTIN: tuple[Toggle, ...] = (
    Toggle("polar_ns", ("optim.muon_ns_coeffs=quintic",), "fixed quintic Newton-Schulz of #1394"),
    Toggle("min_lr", ("optim.min_lr=0.0",), "warmdown decays to 0 (no LR floor)"),
    Toggle("beta2", ("optim.beta2=0.95",), "Adam beta2 0.95, #1394's value"),
    Toggle("warmdown", ("optim.warmdown_frac=0.75",), "warmdown 0.75, #1855's code default"),
    Toggle("ema", ("optim.ema_decay=0",), "no EMA: the live weights are exported"),
    Toggle("muoneq_r", ("optim.muon_row_normalize=false",), "plain Muon, no row normalisation"),
    Toggle("loop", ("model.num_loops=0",), "no depth recurrence"),
    Toggle("parallel_lanes", ("model.parallel_mode=none",), "one sequential residual stream"),
    Toggle("xsa", ("model.xsa_last_n=0",), "no XSA in any layer"),
    Toggle("qk_gain", ("model.qk_gain_init=4.0",), "QK gain 4.0, the previous record's (#1394) value"),
    Toggle("skip_gates", ("model.skip_gates=false",), "ungated U-Net skips"),
    Toggle("smear_gate", ("model.smear_gate=false",), "no SmearGate"),
    Toggle("sparse_gate", ("model.sparse_attn_gate=false",), "no sparse attention output gate"),
    Toggle("doc_attention", ("model.doc_attention=false",), "attention across documents of a packed row"),
    Toggle(
        "fused_ce", ("model.fused_ce=false",), "eager softcapped CE: the same loss, a speed/memory switch"
    ),
    Toggle("ln_scale", ("model.ln_scale=false",), "no 1/sqrt(l+1) layer-norm scale"),
    Toggle(
        "int7_embed",
        ("quant.embed_bits=8", "quant.embed_clip_sigmas=20.0"),
        "int8 embedding with k=20, #1394's",
    ),
    Toggle("hessian_clip", ("quant.hessian_clip_lambda=0",), "plain SDClip (no Hessian-aware clip)"),
    Toggle("gptq", ("quant.method=rtn",), "round to nearest with the same scales"),
    Toggle("pergroup", ("quant.compressor=brotli",), "one brotli-11 stream of byte-shuffled codes, #1394's"),
    Toggle("lqer", ("quant.lqer_top_k=0",), "no LQER correction"),
    Toggle("class_clips", ("quant.attn_clip_sigmas=0", "quant.mlp_clip_sigmas=0"), "one matrix clip, #1394's"),
    Toggle("gate_int8", ("quant.gate_int8=false",), "attention gate stored like the other small tensors"),
)
TOGGLES: dict[str, Toggle] = {t.name: t for t in BUILTIN}


# Config sections that training never reads: a toggle confined to them reuses the baseline's training.
TRAINING_FREE_SECTIONS = ("quant", "eval")


def requantizes(toggle: Toggle) -> bool:
    """True when the toggle sets only quant.* / eval.* fields (its run reuses the baseline's training)."""
    return all(item.partition(".")[0].strip() in TRAINING_FREE_SECTIONS for item in toggle.sets)


class AlreadyOff(ConfigError):
    """The preset already has the technique off: ablating it would train the baseline again."""


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # a directory name under OUT


def parse_toggles(args: Sequence[str]) -> list[Toggle]:
    """--toggle values: comma lists of TOGGLES names, each optionally ending with one ad-hoc toggle
    `name=section.field=value[;section.field=value]` (whose values may hold commas, e.g. list fields)."""
    out: list[Toggle] = []
    for arg in args:
        head, eq, adhoc_sets = arg.partition("=")
        names = [n.strip() for n in head.split(",")]
        adhoc = names.pop() if eq else None
        for name in names:
            if not name:
                raise ConfigError(f"--toggle {arg!r}: empty toggle name")
            if name not in TOGGLES:
                raise ConfigError(
                    f"--toggle: unknown toggle '{name}'; expected one of {', '.join(TOGGLES)} "
                    "or NAME=section.field=value[;section.field=value]"
                )
            out.append(TOGGLES[name])
        if adhoc is not None:
            if not _NAME.fullmatch(adhoc) or adhoc in TOGGLES or adhoc == BASELINE:
                raise ConfigError(
                    f"--toggle {arg!r}: an ad-hoc toggle needs a new name of letters, digits, '_', '-' "
                    f"(not '{BASELINE}' or a built-in toggle), got {adhoc!r}"
                )
            sets = tuple(s.strip() for s in adhoc_sets.split(";") if s.strip())
            if not sets or any("=" not in s for s in sets):
                raise ConfigError(
                    f"--toggle {arg!r}: expected {adhoc}=section.field=value[;section.field=value]"
                )
            out.append(Toggle(adhoc, sets, "ad hoc"))
    seen: set[str] = set()
    for t in out:
        if t.name in seen:
            raise ConfigError(f"--toggle: '{t.name}' is given twice")
        seen.add(t.name)
    if not out:
        raise ConfigError("--toggle: name at least one technique to switch off")
    return out


def parse_seeds(text: str, first_seed: int) -> list[int]:
    """--seeds N (a count: first_seed, first_seed + 1, ...) or a comma list of distinct seeds ("42," = one)."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) > 1 and not parts[-1]:
        parts.pop()  # a trailing comma makes a single number a list
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if "," not in text:
        if len(values) != 1 or values[0] < 1:
            raise ConfigError(f"--seeds {text!r}: expected a count >= 1 or a comma list like 1337,42,7")
        return [first_seed + i for i in range(values[0])]
    if not values or len(set(values)) != len(values):
        raise ConfigError(f"--seeds {text!r}: expected distinct integers separated by commas, e.g. 1337,42,7")
    return values


def toggled_config(base: RunConfig, toggle: Toggle) -> RunConfig:
    """`base` with the toggle's sets applied and validated; errors name the toggle and the field."""
    cfg = copy.deepcopy(base)
    for item in toggle.sets:
        key, _, value = item.partition("=")
        try:
            set_value(cfg, key.strip(), value)
        except ConfigError as err:
            raise ConfigError(f"toggle '{toggle.name}': {err}") from None
    try:
        validate(cfg)
    except ConfigError as err:
        raise ConfigError(f"toggle '{toggle.name}' ({'; '.join(toggle.sets)}): {err}") from None
    if to_dict(cfg) == to_dict(base):
        raise AlreadyOff(
            f"toggle '{toggle.name}': preset {base.preset} already has it off ({'; '.join(toggle.sets)})"
        )
    return cfg


def plan_configs(base: RunConfig, toggles: Sequence[Toggle]) -> dict[str, RunConfig]:
    """{"baseline": base, toggle name: toggled config}, every toggle checked before anything trains."""
    plan = {BASELINE: base}
    for t in toggles:
        plan[t.name] = toggled_config(base, t)
    return plan


def run_dir(out: str | Path, name: str, seed: int) -> Path:
    return Path(out) / name / f"seed_{seed}"


def _config_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [
        f"{sec}.{key}: {a[sec][key]!r} there, {b[sec].get(key)!r} planned"
        for sec in a
        if isinstance(a[sec], dict)
        for key in a[sec]
        if a[sec][key] != b[sec].get(key)
    ]


def reusable(cfg: RunConfig, directory: Path) -> bool:
    """True when `directory` holds a finished run of `cfg`. A run (finished or not) of another config there
    is an error: reusing it would mix configs, and retraining over it would destroy it."""
    if (directory / "config.toml").is_file():
        diffs = _config_diff(to_dict(load_run_config(directory)), to_dict(cfg))
        if diffs:
            raise ConfigError(
                f"{directory} holds a run of a different config ({'; '.join(diffs[:3])}): "
                "use another --out or remove that run"
            )
    return (directory / SUMMARY_FILE).is_file()


Runner = Callable[..., Any]


def _link_or_copy(src: Path, dst: Path) -> None:
    """dst becomes a hard link to src (a copy across file systems), replaced atomically."""
    tmp = dst.with_name(f".{dst.name}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
        os.replace(tmp, dst)
    except OSError:
        tmp.unlink(missing_ok=True)
        atomic_write_bytes(dst, src.read_bytes())


def reuse_training(cfg: RunConfig, directory: Path, trained: Path) -> None:
    """Make `directory` a run of `cfg` whose train stage is the one in `trained` (a finished run whose config
    differs from `cfg` only in TRAINING_FREE_SECTIONS): model.pt hard-linked (written atomically by every
    stage, never in place), train.json and train.log copied, the train stage recorded for `cfg`."""
    rundir.check_fresh(trained, ("train",))  # finished training, its files as it recorded them
    theirs, ours = to_dict(load_run_config(trained)), to_dict(cfg)
    diffs = [d for d in _config_diff(theirs, ours) if d.partition(".")[0] not in TRAINING_FREE_SECTIONS]
    if diffs:
        raise ConfigError(f"{directory}: cannot reuse the training of {trained}: {'; '.join(diffs[:3])}")
    directory.mkdir(parents=True, exist_ok=True)
    rundir.invalidate_from(directory, "train")
    rundir.path(directory, rundir.CHECKPOINT).unlink(missing_ok=True)
    _link_or_copy(rundir.path(trained, rundir.MODEL), rundir.path(directory, rundir.MODEL))
    for name in (rundir.TRAIN_JSON, rundir.TRAIN_LOG):  # small; train.log is appended in place on resume
        if rundir.path(trained, name).is_file():
            atomic_write_bytes(rundir.path(directory, name), rundir.path(trained, name).read_bytes())
    text = to_toml(cfg)
    atomic_write_text(rundir.path(directory, rundir.CONFIG), text)
    rundir.record_stage(directory, "train", text, [], extra={"requantized_from": str(trained)})


def requantize(cfg: RunConfig, directory: Path, trained: Path, verbose: bool = True) -> dict[str, Any]:
    """The run of `cfg` in `directory` on the training of `trained`: quantize + eval + summary only."""
    from pgolf.eval.run_eval import plan_passes
    from pgolf.runtime import barrier, init_distributed
    from pgolf.submit.pipeline import quantize_and_evaluate
    from pgolf.train.preflight import check_inputs

    check_inputs(cfg, need_eval=True)
    plan_passes(list(cfg.eval.plan))
    dist = init_distributed(cfg.train.device)
    with rundir.RunLock(directory, enabled=dist.is_main):
        if dist.is_main:
            print(f"pgolf ablate: {directory} requantizes the training of {trained}")
            reuse_training(cfg, directory, trained)
        barrier()
        return quantize_and_evaluate(cfg, directory, verbose=verbose)


def _run_one(run: Runner, *args: Any, **kwargs: Any) -> None:
    from pgolf.quant.pipeline import OverCapError

    try:
        run(*args, **kwargs)
    except OverCapError:
        pass  # summary.json holds the unquantized score; the table leaves the pair out of Δbpb


def run_ablation(
    base: RunConfig,
    toggles: Sequence[Toggle],
    seeds: Sequence[int],
    out: str | Path,
    runner: Runner | None = None,
    requantizer: Runner | None = None,
) -> dict[str, Any]:
    """Every (config, seed) run not already finished, seed by seed (the baseline first), so that an
    interrupted ablation leaves complete seeds behind; a `requantizes` toggle's run reuses its seed's
    baseline training (`requantizer(cfg, directory, trained)`, default `requantize`), every other run
    trains (`runner(cfg, directory, resume=...)`, default run_pipeline). The table is rewritten after each
    run (rank 0 under torchrun) and returned."""
    from pgolf.runtime import init_distributed
    from pgolf.submit.pipeline import run_pipeline, seed_configs

    runner, requantizer = runner or run_pipeline, requantizer or requantize
    plan = plan_configs(base, toggles)
    reused = {t.name for t in toggles if requantizes(t)}
    jobs = [
        (name, cfg, run_dir(out, name, cfg.train.seed))
        for seed in seeds
        for name, planned in plan.items()
        for cfg in seed_configs(planned, [seed])
    ]
    todo = [(n, c, d) for n, c, d in jobs if not reusable(c, d)]  # every mismatch reported before training
    main = init_distributed(base.train.device).is_main
    if main:
        print(f"pgolf ablate {base.preset}: {len(jobs) - len(todo)} of {len(jobs)} runs already done")
    table = ablation_table(out, base.preset, toggles, seeds)
    for name, cfg, directory in todo:
        if name in reused:
            _run_one(requantizer, cfg, directory, run_dir(out, BASELINE, cfg.train.seed))
        else:
            _run_one(runner, cfg, directory, resume=(directory / "checkpoint.pt").is_file())
        if main:
            table = write_table(out, base.preset, toggles, seeds)
    if main:
        table = write_table(out, base.preset, toggles, seeds)
        print(format_table(table))
        print(f"\ntable: {Path(out) / TABLE_MD}")
    return table


def _score(directory: Path) -> dict[str, Any] | None:
    if not (directory / SUMMARY_FILE).is_file():
        return None
    return read_run_json(directory, SUMMARY_FILE)


def _unquantized(summary: dict[str, Any]) -> bool:
    """No quantized score: the run was over the cap, so the pipeline scored only the trained weights."""
    return summary["quant_bpb"] is None


def _mean(values: Sequence[float]) -> float | None:
    return mean_std(values)[0] if values else None


def _std(values: Sequence[float]) -> float | None:
    std = mean_std(values)[1] if values else math.nan
    return None if math.isnan(std) else std


def _mean_diff(pairs: dict[int, tuple[dict[str, Any], dict[str, Any]]], key: str) -> float | None:
    return _mean([off[key] - b[key] for b, off in pairs.values()])


def ablation_table(
    out: str | Path, preset: str, toggles: Sequence[Toggle], seeds: Sequence[int]
) -> dict[str, Any]:
    """The table from the summary.json files present: per toggle, paired differences over the seeds whose
    baseline and toggled runs both finished. Δbpb leaves out a pair whose toggled run went over the cap
    (scored unquantized, its baseline quantized); bytes and seconds use every pair. A `requantizes`
    toggle's row says so ("requantized": its runs reuse the baseline's training, see below)."""
    base = {s: _score(run_dir(out, BASELINE, s)) for s in seeds}
    done = [s for s in seeds if base[s] is not None]
    baseline = {
        "n": len(done),
        "val_bpb": _mean([base[s]["val_bpb"] for s in done]),
        "artifact_bytes": _mean([base[s]["artifact_bytes"] for s in done]),
        "train_seconds": _mean([base[s]["train_seconds"] for s in done]),
        "eval_seconds": _mean([base[s]["eval_seconds"] for s in done]),
    }
    rows = []
    for t in toggles:
        pairs = {s: (base[s], _score(run_dir(out, t.name, s))) for s in done}
        pairs = {s: p for s, p in pairs.items() if p[1] is not None}
        lost = {s for s, (b, off) in pairs.items() if _unquantized(off) and not _unquantized(b)}
        scored = {s: off["val_bpb"] - b["val_bpb"] for s, (b, off) in pairs.items() if s not in lost}
        # A requantized run's training loop is its baseline's (train.json copied): Δtrain s is 0 by
        # construction, and the difference of the summaries' train_seconds (loop + calibration + GPTQ, the
        # time charged to the training budget) is the quantization's alone.
        requant = requantizes(t)

        rows.append(
            {
                "toggle": t.name,
                "off": list(t.sets),
                "note": t.note,
                "n": len(scored),
                "delta_bpb": _mean(list(scored.values())),
                "std_bpb": _std(list(scored.values())),
                "per_seed_delta_bpb": {str(s): d for s, d in scored.items()},
                "delta_artifact_bytes": _mean_diff(pairs, "artifact_bytes"),
                "delta_train_seconds": 0.0 if requant and pairs else _mean_diff(pairs, "train_seconds"),
                "delta_eval_seconds": _mean_diff(pairs, "eval_seconds"),
                "over_cap": len(lost),
                "requantized": requant,
                "delta_quant_seconds": _mean_diff(pairs, "train_seconds") if requant else None,
            }
        )
    return {"preset": preset, "seeds": list(seeds), "baseline": baseline, "rows": rows}


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


COLUMNS = ("technique", "Δbpb", "± std", "Δartifact B", "Δtrain s", "Δeval s", "n")


def _cells(row: dict[str, Any]) -> list[str]:
    cells = [
        row["toggle"],
        _num(row["delta_bpb"], "+.5f"),
        _num(row["std_bpb"], ".5f"),
        _num(row["delta_artifact_bytes"], "+,.0f"),
        _num(row["delta_train_seconds"], "+.1f"),
        _num(row["delta_eval_seconds"], "+.1f"),
        str(row["n"]),
    ]
    if row["over_cap"]:
        cells[1] += f" ({row['over_cap']} over cap)"
    if row.get("requantized"):
        cells[4] += f" (requantized; quantization {_num(row['delta_quant_seconds'], '+.1f')} s)"
    return cells


def _headline(table: dict[str, Any]) -> str:
    b = table["baseline"]
    seeds = ",".join(str(s) for s in table["seeds"])
    if not b["n"]:
        return f"ablation of {table['preset']}, seeds {seeds}: no baseline run finished yet"
    return (
        f"ablation of {table['preset']}, seeds {seeds}: baseline val_bpb {b['val_bpb']:.5f}, "
        f"artifact {b['artifact_bytes']:,.0f} B, train {b['train_seconds']:.1f} s, eval {b['eval_seconds']:.1f} s "
        f"(mean of {b['n']}); Δ = off − baseline per seed, positive Δbpb = the technique helps"
    )


def format_table(table: dict[str, Any]) -> str:
    """The console table: one row per technique, columns aligned."""
    grid = [list(COLUMNS)] + [_cells(r) for r in table["rows"]]
    widths = [max(len(line[i]) for line in grid) for i in range(len(COLUMNS))]
    lines = [_headline(table)]
    for line in grid:
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def markdown_table(table: dict[str, Any]) -> str:
    """The same table as markdown, with what "off" means for each technique."""
    head = list(COLUMNS) + ["off ="]
    lines = [_headline(table), "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table["rows"]:
        off = "; ".join(f"`{s}`" for s in row["off"]) + f" ({row['note']})"
        lines.append("| " + " | ".join(_cells(row) + [off]) + " |")
    return "\n".join(lines) + "\n"


def write_table(
    out: str | Path, preset: str, toggles: Sequence[Toggle], seeds: Sequence[int]
) -> dict[str, Any]:
    """OUT/ablation.json and OUT/ablation.md from the runs finished so far; returns the table."""
    table = ablation_table(out, preset, toggles, seeds)
    atomic_write_json(Path(out) / TABLE_JSON, table)
    atomic_write_text(Path(out) / TABLE_MD, markdown_table(table))
    return table


def list_toggles(base: RunConfig) -> str:
    """The built-in toggles with their "off" sets and whether `base` can be ablated by each."""
    lines = []
    for t in BUILTIN:
        try:
            toggled_config(base, t)
            state = "on"
        except AlreadyOff:
            state = "already off"
        except ConfigError as err:
            state = f"error: {err}"
        lines.append(f"{t.name:15s} {state:12s} {'; '.join(t.sets)}  ({t.note})")
    return "\n".join(lines)
