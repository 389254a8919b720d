"""`pgolf report`: PNG plots of a finished run and a report.md that embeds them with the summary table.

Plots (all PLOT_PIXELS in size): train/val loss vs step and vs wallclock (train.json history), the bpb
waterfall over the eval modes that ran (eval.json), the artifact bytes by tensor class with the cap line
(quant.json). matplotlib is an optional dependency (extras `report`), imported only here and only when a
report is rendered; figures are drawn on bare `Figure` objects, so no GUI backend or pyplot state is used.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from pgolf import rundir
from pgolf.config.schema import EVAL_MODES
from pgolf.fileio import atomic_write_bytes, atomic_write_text
from pgolf.submit.stats import optional_import
from pgolf.submit.summary import (
    WATERFALL,
    code_counts,
    eval_results,
    format_summary,
    number,
    read_stage_files,
    run_budgets,
    write_summary,
)

PLOT_INCHES = (8.0, 4.5)
PLOT_DPI = 100
PLOT_PIXELS = (800, 450)  # PLOT_INCHES * PLOT_DPI: the size of every PNG written here
REPORT_DIR = rundir.REPORT_DIR
REPORT_FILE = "report.md"
PLOT_FILES = {
    "loss_vs_step": "loss_vs_step.png",
    "loss_vs_time": "loss_vs_time.png",
    "bpb_waterfall": "bpb_waterfall.png",
    "artifact_bytes": "artifact_bytes.png",
}
_LABELS = {mode: label for mode, _, label in WATERFALL}


def _figure() -> Any:
    figure_mod = optional_import("matplotlib.figure", "pgolf report", "report")
    return figure_mod.Figure(figsize=PLOT_INCHES, dpi=PLOT_DPI, layout="constrained")


def _save(fig: Any, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PLOT_DPI)
    return atomic_write_bytes(path, buf.getvalue())


def _history(train: dict[str, Any], source: str) -> dict[str, list[dict[str, float]]]:
    """train.json history, checked: each point has numeric step, time_s, loss (and bpb for val).
    A loss may be non-finite (a run stopped on NaN); matplotlib leaves such points out."""
    history = train.get("history")
    if not isinstance(history, dict):
        raise ValueError(f"{source}: field 'history' must be an object with 'train' and 'val' lists")
    out: dict[str, list[dict[str, float]]] = {}
    for split in ("train", "val"):
        points = history.get(split, [])
        if not isinstance(points, list):
            raise ValueError(f"{source}: history.{split} must be a list")
        rows = []
        for i, point in enumerate(points):
            where = f"{source}: history.{split}[{i}]"
            if not isinstance(point, dict):
                raise ValueError(f"{where} must be an object")
            row = {"step": number(point, "step", where), "time_s": number(point, "time_s", where)}
            loss = point.get("loss")
            if isinstance(loss, bool) or not isinstance(loss, (int, float)):
                raise ValueError(f"{where}: field 'loss' must be a number, got {loss!r}")
            row["loss"] = float(loss)
            rows.append(row)
        out[split] = rows
    return out


def plot_loss(
    history: dict[str, list[dict[str, float]]], x_key: str, path: Path, loop_step: Any = None
) -> Path:
    """Train and val loss against `x_key` ("step" or "time_s"); a dotted line where looping switched on."""
    fig = _figure()
    ax = fig.subplots()
    for split, style in (("train", "-"), ("val", "o-")):
        points = history[split]
        if points:
            ax.plot([p[x_key] for p in points], [p["loss"] for p in points], style, label=f"{split} loss")
    if x_key == "step" and isinstance(loop_step, (int, float)) and not isinstance(loop_step, bool):
        ax.axvline(loop_step, color="grey", linestyle=":", label=f"looping on (step {loop_step})")
    if not history["train"] and not history["val"]:
        ax.text(0.5, 0.5, "no loss history in train.json", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend()
    ax.set_xlabel("step" if x_key == "step" else "wallclock (s)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("loss vs " + ("step" if x_key == "step" else "training wallclock"))
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_waterfall(results: list[dict[str, Any]], path: Path) -> Path:
    """The bpb of each eval mode that ran, in plan order: the first as a bar, the rest as floating bars
    from the previous stage's bpb (green = better, red = worse), each labelled with its value and delta."""
    ordered = sorted(results, key=lambda r: EVAL_MODES.index(r["mode"]))
    values = [float(r["bpb"]) for r in ordered]
    lo, hi = min(values), max(values)
    pad = max(hi - lo, 1e-3) * 0.6
    bottom = lo - pad
    fig = _figure()
    ax = fig.subplots()
    previous = None
    for i, value in enumerate(values):
        if previous is None:
            ax.bar(i, value - bottom, bottom=bottom, color="tab:blue", width=0.6)
            text = f"{value:.5f}"
        else:
            color = "tab:green" if value <= previous else "tab:red"
            ax.bar(i, value - previous, bottom=previous, color=color, width=0.6)
            ax.plot([i - 1.3, i + 0.3], [previous, previous], color="grey", linewidth=0.8)
            text = f"{value:.5f}\n({value - previous:+.5f})"
        ax.text(i, max(value, previous or value) + pad * 0.08, text, ha="center", va="bottom", fontsize=9)
        previous = value
    ax.set_xticks(range(len(ordered)), [_LABELS[r["mode"]] for r in ordered])
    ax.set_ylim(bottom, hi + pad)
    ax.set_ylabel("val bpb")
    ax.set_title("bpb waterfall (final score: " + _LABELS[ordered[-1]["mode"]] + f" {values[-1]:.5f})")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def byte_segments(quant: dict[str, Any], source: str) -> list[tuple[str, int]]:
    """(label, bytes) parts of the counted total: each tensor class of quant.json, the container overhead
    (artifact bytes the classes do not account for, if any) and the code."""
    classes = quant.get("classes")
    if not isinstance(classes, dict) or not classes:
        raise ValueError(f"{source}: field 'classes' must be a non-empty object of tensor classes")
    segments = []
    for name, info in classes.items():
        where = f"{source}: classes.{name}"
        if not isinstance(info, dict):
            raise ValueError(f"{where} must be an object")
        nbytes = number(info, "bytes", where, integer=True)
        label = f"{name} {nbytes:,} B"
        if isinstance(info.get("bits_per_weight"), (int, float)):
            label += f" ({number(info, 'bits_per_weight', where):.2f} bits/w)"
        segments.append((label, nbytes))
    artifact = number(quant, "artifact_bytes", source, integer=True)
    overhead = artifact - sum(n for _, n in segments)
    if overhead > 0:
        segments.append((f"container {overhead:,} B", overhead))
    code = number(quant, "code_bytes", source, integer=True)
    segments.append((f"code {code:,} B", code))
    return segments


def plot_bytes(quant: dict[str, Any], source: str, path: Path) -> Path:
    """One stacked horizontal bar of the counted bytes by tensor class, with the cap as a vertical line."""
    segments = byte_segments(quant, source)
    cap = number(quant, "cap_bytes", source, integer=True)
    total = number(quant, "total_bytes", source, integer=True)
    if quant.get("cap_counts_code") is False:  # cpu-golf v2: the cap bounds the artifact alone
        total = number(quant, "artifact_bytes", source, integer=True)
        segments = segments[:-1]
    fig = _figure()
    ax = fig.subplots()
    left = 0
    for label, nbytes in segments:
        ax.barh(0, nbytes, left=left, height=0.5, label=label)
        left += nbytes
    ax.axvline(cap, color="red", linestyle="--", linewidth=1.5, label=f"cap {cap:,} B")
    ax.set_xlim(0, max(total, cap, left) * 1.08)
    ax.xaxis.set_major_formatter(lambda x, _pos: f"{x:,.0f}")  # whole bytes, not a 1e6 offset
    ax.set_yticks([])
    ax.set_xlabel("bytes")
    flag = f"OVER CAP by {total - cap:,} B" if total > cap else f"{cap - total:,} B under the cap"
    counted = "artifact" if quant.get("cap_counts_code") is False else "artifact + code"
    ax.set_title(f"{counted} = {total:,} B: {flag}")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=3, fontsize=8)
    return _save(fig, path)


def _md_number(value: Any, fmt: str) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return format(value, fmt)
    return "-"


def render_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write summary.json, the four plots and report.md (in RUN_DIR/report unless `out_dir`); returns
    the report.md path."""
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / REPORT_DIR
    rundir.check_fresh(run_dir, ("train", "quant", "eval"))  # one model's parts, or a refusal naming the file
    summary = write_summary(run_dir)
    train_budget, eval_budget = run_budgets(run_dir)
    (train, train_src), (quant, quant_src), (evaluation, eval_src) = read_stage_files(run_dir)
    results = eval_results(evaluation, eval_src)

    history = _history(train, train_src)
    loop_step = train.get("looping_enabled_at_step")
    plot_loss(history, "step", out / PLOT_FILES["loss_vs_step"], loop_step)
    plot_loss(history, "time_s", out / PLOT_FILES["loss_vs_time"])
    plot_waterfall(results, out / PLOT_FILES["bpb_waterfall"])
    plot_bytes(quant, quant_src, out / PLOT_FILES["artifact_bytes"])

    lines = [
        f"# pgolf report: {run_dir.name}",
        "",
        "```text",
        format_summary(summary, train_budget, eval_budget, code_counts(run_dir)),
        "```",
        "",
        "## Training",
        "",
        f"Stopped by: {train.get('stopped_reason', '-')}; looping enabled at step "
        f"{loop_step if loop_step is not None else '-'}; final train loss "
        f"{_md_number(train.get('final_train_loss'), '.4f')}.",
        "",
        f"![train and val loss vs step]({PLOT_FILES['loss_vs_step']})",
        "",
        f"![train and val loss vs wallclock]({PLOT_FILES['loss_vs_time']})",
        "",
        "## Evaluation",
        "",
        f"![bpb waterfall]({PLOT_FILES['bpb_waterfall']})",
        "",
        "| mode | loss | bpb | tokens | bytes | seconds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(results, key=lambda r: EVAL_MODES.index(r["mode"])):
        lines.append(
            f"| {_LABELS[r['mode']]} | {r['loss']:.5f} | {r['bpb']:.5f} | {_md_number(r.get('tokens'), ',')} "
            f"| {_md_number(r.get('bytes'), ',')} | {_md_number(r.get('seconds'), '.1f')} |"
        )
    lines += [
        "",
        "## Artifact",
        "",
        f"![artifact bytes by tensor class]({PLOT_FILES['artifact_bytes']})",
        "",
        "| class | params | bits | bytes | bits/weight |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, info in quant["classes"].items():
        lines.append(
            f"| {name} | {_md_number(info.get('params'), ',')} | {_md_number(info.get('bits'), 'g')} "
            f"| {_md_number(info.get('bytes'), ',')} | {_md_number(info.get('bits_per_weight'), '.3f')} |"
        )
    lines += [
        "",
        f"Compressor {quant.get('compressor', '-')}; Hessians {_md_number(quant.get('hessian_seconds'), '.1f')} s, "
        f"GPTQ {_md_number(quant.get('gptq_seconds'), '.1f')} s (counted in train+quant time).",
        "",
    ]
    return atomic_write_text(out / REPORT_FILE, "\n".join(lines))
