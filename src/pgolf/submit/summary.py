"""summary.json: the one-screen result of a run, built from the files its stages left in the run directory.

Reads config.toml, train.json, quant.json and eval.json (the contract in docs/design.md) and nothing else:
no torch, so `pgolf stats` / `pgolf report` start fast.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pgolf import rundir
from pgolf.config import load_run_config
from pgolf.config.schema import EVAL_MODES
from pgolf.eval.modes import MODES
from pgolf.fileio import atomic_write_json
from pgolf.rundir import read_json as read_run_json

SUMMARY_FILE = rundir.SUMMARY_JSON

SUMMARY_KEYS = (
    "val_bpb",
    "val_loss",
    *(m.summary_key for m in MODES.values()),
    "artifact_bytes",
    "code_bytes",
    "total_bytes",
    "cap_bytes",
    "train_seconds",
    "eval_seconds",
    "steps",
    "tokens_per_second",
    "preset",
    "seed",
)

# The bpb waterfall in eval-plan order (that of EVAL_MODES): (eval.json mode, summary key, label).
WATERFALL = tuple((m.name, m.summary_key, m.label) for m in MODES.values())

# The challenge budgets (SPEC §0, §11): 600 s training (quantization included), 600 s evaluation.
DEFAULT_BUDGET_SECONDS = 600.0


def number(data: dict[str, Any], key: str, source: str, *, integer: bool = False) -> float | int:
    """data[key] checked to be a finite number (an int when `integer`); errors name source and key."""
    if key not in data:
        raise ValueError(f"{source}: missing field '{key}'")
    value = data[key]
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{source}: field '{key}' must be {kind}, got {value!r}")
    if integer and not (isinstance(value, int) or float(value).is_integer()):
        raise ValueError(f"{source}: field '{key}' must be {kind}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{source}: field '{key}' must be finite, got {value!r}")
    return int(value) if integer else float(value)


def read_stage_files(run_dir: str | Path) -> list[tuple[dict[str, Any], str]]:
    """[(data, path for messages)] of train.json, quant.json and eval.json."""
    names = (rundir.TRAIN_JSON, rundir.QUANT_JSON, rundir.EVAL_JSON)
    return [(read_run_json(run_dir, name), str(rundir.path(run_dir, name))) for name in names]


def eval_results(evaluation: dict[str, Any], source: str) -> list[dict[str, Any]]:
    """eval.json's results (`source` names the file), validated: known modes, each at most once,
    finite loss and bpb."""
    results = evaluation.get("results")
    if not isinstance(results, list) or not results:
        raise ValueError(f"{source}: field 'results' must be a non-empty list of evaluation results")
    seen: set[str] = set()
    for i, res in enumerate(results):
        where = f"{source}: results[{i}]"
        if not isinstance(res, dict):
            raise ValueError(f"{where} must be an object")
        mode = res.get("mode")
        if mode not in EVAL_MODES:
            raise ValueError(f"{where}: mode {mode!r} is not one of {', '.join(EVAL_MODES)}")
        if mode in seen:
            raise ValueError(f"{where}: mode '{mode}' appears more than once")
        seen.add(mode)
        number(res, "loss", where)
        number(res, "bpb", where)
    return results


def build_summary(run_dir: str | Path) -> dict[str, Any]:
    """The summary of a finished run, keys exactly SUMMARY_KEYS.

    The score (val_bpb, val_loss) is the result of the last mode that ran, in plan order
    prequant < quant < sliding < ttt < ngram. `train_seconds` is the time charged to the training budget:
    the training loop plus Hessian collection and GPTQ (SPEC §0, §11: quantization counts as training).
    """
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    (train, train_src), (quant, quant_src), (evaluation, eval_src) = read_stage_files(run_dir)

    by_mode = {res["mode"]: res for res in eval_results(evaluation, eval_src)}
    final = max(by_mode, key=EVAL_MODES.index)
    summary: dict[str, Any] = {
        "val_bpb": float(by_mode[final]["bpb"]),
        "val_loss": float(by_mode[final]["loss"]),
    }
    for mode, key, _ in WATERFALL:
        summary[key] = float(by_mode[mode]["bpb"]) if mode in by_mode else None
    for key in ("artifact_bytes", "code_bytes", "total_bytes", "cap_bytes"):
        summary[key] = number(quant, key, quant_src, integer=True)
    quant_seconds = sum(
        number(quant, key, quant_src) for key in ("hessian_seconds", "gptq_seconds") if key in quant
    )
    summary["train_seconds"] = number(train, "train_seconds", train_src) + quant_seconds
    summary["eval_seconds"] = number(evaluation, "eval_seconds", eval_src)
    summary["steps"] = number(train, "steps", train_src, integer=True)
    summary["tokens_per_second"] = number(train, "tokens_per_second", train_src)
    summary["preset"] = cfg.preset
    summary["seed"] = cfg.train.seed
    return {key: summary[key] for key in SUMMARY_KEYS}


def write_summary(run_dir: str | Path) -> dict[str, Any]:
    """Build the summary and write RUN_DIR/summary.json atomically; returns it."""
    summary = build_summary(run_dir)
    atomic_write_json(Path(run_dir) / SUMMARY_FILE, summary)
    rundir.record_stage(run_dir, "summary", None, [rundir.TRAIN_JSON, rundir.QUANT_JSON, rundir.EVAL_JSON])
    return summary


def run_budgets(run_dir: str | Path) -> tuple[float | None, float | None]:
    """(training, evaluation) time budgets in seconds from the run's config; None = unlimited."""
    cfg = load_run_config(run_dir)
    train_budget = cfg.train.max_wallclock_seconds
    eval_budget = cfg.eval.time_budget_seconds
    return (train_budget if train_budget > 0 else None, eval_budget if eval_budget > 0 else None)


def counted_bytes(summary: dict[str, Any], code_counted: bool = True) -> int:
    """The bytes the cap bounds: artifact + code, or the artifact alone on a track that does not count code
    (cpu-golf v2: `quant.cap_counts_code = false`)."""
    return summary["total_bytes"] if code_counted else summary["artifact_bytes"]


def code_counts(run_dir: str | Path) -> bool:
    """Whether the run's cap counts the code bytes (its config's quant.cap_counts_code)."""
    return load_run_config(run_dir).quant.cap_counts_code


def final_stage(summary: dict[str, Any]) -> str:
    """Label of the waterfall stage the score comes from (the last one that ran)."""
    ran = [label for _, key, label in WATERFALL if summary.get(key) is not None]
    if not ran:
        raise ValueError("summary has no evaluation result (every *_bpb is null)")
    return ran[-1]


def _time_line(name: str, seconds: float, budget: float | None) -> str:
    if budget is None:
        return f"  {name:<12s}{seconds:10.1f} s   (no budget)"
    flag = "ok" if seconds <= budget else f"OVER BUDGET by {seconds - budget:.1f} s"
    return f"  {name:<12s}{seconds:10.1f} s / {budget:.0f} s  {100 * seconds / budget:5.1f}%  {flag}"


def format_summary(
    summary: dict[str, Any],
    train_budget_seconds: float | None = DEFAULT_BUDGET_SECONDS,
    eval_budget_seconds: float | None = DEFAULT_BUDGET_SECONDS,
    code_counted: bool = True,
) -> str:
    """A one-screen table: score, bpb waterfall with stage deltas, bytes vs cap, time vs budget."""
    s = summary
    lines = [
        f"pgolf run  preset {s['preset']}  seed {s['seed']}",
        f"score  val_bpb {s['val_bpb']:.5f}  val_loss {s['val_loss']:.5f} nats/token"
        f"  (from {final_stage(s)})",
        "",
        "bpb waterfall",
    ]
    previous = None
    for _, key, label in WATERFALL:
        value = s.get(key)
        if value is None:
            lines.append(f"  {label:<12s}{'-':>10s}   (not run)")
            continue
        delta = "" if previous is None else f"  {value - previous:+.5f}"
        lines.append(f"  {label:<12s}{value:10.5f}{delta}")
        previous = value

    counted, cap = counted_bytes(s, code_counted), s["cap_bytes"]
    if counted > cap:
        flag = f"OVER CAP by {counted - cap:,} bytes"
    else:
        flag = f"ok, {cap - counted:,} bytes to spare"
    lines += [
        "",
        "bytes",
        f"  {'artifact':<12s}{s['artifact_bytes']:>12,d}",
        f"  {'code':<12s}{s['code_bytes']:>12,d}{'' if code_counted else '   (not counted on this track)'}",
        f"  {'counted':<12s}{counted:>12,d} / cap {cap:,}  {100 * counted / cap:5.1f}%  {flag}",
        "",
        "time",
        _time_line("train+quant", s["train_seconds"], train_budget_seconds),
        _time_line("eval", s["eval_seconds"], eval_budget_seconds),
        f"  {'steps':<12s}{s['steps']:>10,d}   {s['tokens_per_second']:,.0f} tokens/s",
    ]
    return "\n".join(lines)
