"""The quantization schemes under the cpu-golf v2 cap (issue 14.2): for each scheme, the best model that fits.

Takes trained run directories (models of different sizes: `pgolf run`/`pgolf train` outputs holding model.pt
and config.toml), and for every scheme below quantizes each model in a temporary copy (the run directory is
never written), scores the artifact by the non-overlapping quantized eval on the val split the run points at
(optionally the sliding eval too), and prints two markdown tables: every model x scheme, and per scheme the
best model whose model.ptz fits the cap (code bytes are not counted, as on the v2 track).

  python benchmarks/cpu_golf_schemes.py RUN [RUN ...] [--cap 100000] [--calibration-batches 16]
      [--max-val-tokens N] [--sliding] [--schemes fp16,int8,...] [--json OUT.json]

Columns: pre-quant bpb (the trained weights), quantized bpb, model.ptz bytes and whether they fit, effective
bits per weight (8 x bytes / all parameters), the entropy bound n·H(codes)/8 of the code groups (the per-group
quant.json's `entropy_bound`, summed) against the bytes those groups really take, and the fit's changes.
Every scheme writes the per-group container (quant.compressor=pergroup) so the rows differ in the
quantization only.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RUN_FILES = ("config.toml", "model.pt", "train.json", "train.log", "fingerprints.json")


@dataclass(frozen=True)
class Scheme:
    name: str
    label: str
    sets: tuple[str, ...]


# Every scheme: per-group artifact, cap on model.ptz alone; fit_to_cap only where the scheme says so.
SCHEMES = (
    Scheme("fp16", "fp16", ("quant.matrix_bits=16", "quant.embed_bits=16", "quant.calibration_batches=0")),
    Scheme(
        "int8",
        "int8 per-row, round-to-nearest (percentile clip, SPEC §8)",
        ("quant.method=rtn", "quant.matrix_bits=8", "quant.embed_bits=8", "quant.calibration_batches=0",
         "quant.clip_percentile=99.99984"),
    ),
    Scheme(
        "int6",
        "GPTQ + SDClip int6 matrices / int8 embedding (records)",
        ("quant.method=gptq", "quant.matrix_bits=6", "quant.embed_bits=8"),
    ),
    # int5 / int4: the records' k is tuned for int6 / int8, so the clip is searched per tensor at the width
    Scheme(
        "int5",
        "GPTQ int5, clip searched per tensor",
        ("quant.method=gptq", "quant.matrix_bits=5", "quant.embed_bits=5", "quant.clip_mode=search"),
    ),
    Scheme(
        "int4",
        "GPTQ int4, clip searched per tensor",
        ("quant.method=gptq", "quant.matrix_bits=4", "quant.embed_bits=4", "quant.clip_mode=search"),
    ),
    Scheme(
        "mixed",
        "mixed bits per group, fit from int8 by Hessian cost per byte",
        ("quant.method=gptq", "quant.matrix_bits=8", "quant.embed_bits=8", "quant.fit_to_cap=true"),
    ),
)


def scheme_sets(scheme: Scheme, cap: int, calibration_batches: int) -> list[str]:
    base = [
        "quant.compressor=pergroup",
        "quant.cap_counts_code=false",
        f"quant.cap_bytes={cap}",
        "quant.fit_to_cap=false",
        "quant.clip_percentile=0",
        "quant.clip_mode=sigma",
        f"quant.calibration_batches={calibration_batches}",
    ]
    return base + list(scheme.sets)  # later --set entries win


def copy_run(run: Path, into: Path) -> Path:
    """The files quantize + eval read, copied (the source run directory is never written)."""
    into.mkdir(parents=True)
    for name in RUN_FILES:
        if (run / name).is_file():
            shutil.copy2(run / name, into / name)
    if not (into / "model.pt").is_file() or not (into / "config.toml").is_file():
        raise SystemExit(f"{run}: not a trained run directory (expected model.pt and config.toml)")
    return into


def bpb_of(out: dict[str, Any], mode: str) -> float | None:
    return next((float(r["bpb"]) for r in out["results"] if r["mode"] == mode), None)


def measure(
    run: Path, scheme: Scheme, work: Path, cap: int, calibration_batches: int, eval_sets: list[str],
    sliding: bool,
) -> dict[str, Any]:
    """Quantize a copy of `run` with `scheme`; score it when it fits. One row of the full table."""
    from pgolf.eval.run_eval import evaluate_run
    from pgolf.quant.fit import FitError
    from pgolf.quant.pipeline import OverCapError, quantize_run

    tmp = copy_run(run, work / f"{run.name}-{scheme.name}")
    row: dict[str, Any] = {"run": str(run), "scheme": scheme.name}
    try:
        report = quantize_run(tmp, sets=scheme_sets(scheme, cap, calibration_batches), verbose=False, code_bytes=0)
    except OverCapError as err:
        report = err.report
    except FitError as err:
        return dict(row, fits=False, error=str(err))
    groups = {g: c for g, c in report["classes"].items() if "entropy_bound" in c and g not in ("remainder", "perms")}
    params = sum(c["params"] for c in report["classes"].values())
    row.update(
        fits=bool(report["fits"]),
        bytes=report["artifact_bytes"],
        params=params,
        bits_per_weight=8.0 * report["artifact_bytes"] / max(params, 1),
        code_bytes=sum(c["bytes"] for c in groups.values()),
        entropy_bound=sum(c["entropy_bound"] for c in groups.values()),
        quant_seconds=report["hessian_seconds"] + report["gptq_seconds"] + report["compress_seconds"],
        fit=[f"{g} int{s['bits']} k={s['clip_sigmas']:g}" for g, s in report.get("fit", {}).get("overrides", {}).items()],
    )
    if row["fits"]:
        modes = ["quant", "sliding"] if sliding else ["quant"]
        out = evaluate_run(tmp, modes=modes, budget_seconds=0, sets=eval_sets)
        row["quant_bpb"] = bpb_of(out, "quant")
        row["sliding_bpb"] = bpb_of(out, "sliding")
    shutil.rmtree(tmp, ignore_errors=True)
    return row


def prequant_bpb(run: Path, work: Path, eval_sets: list[str]) -> float:
    from pgolf.eval.run_eval import evaluate_run

    tmp = copy_run(run, work / f"{run.name}-prequant")
    out = evaluate_run(tmp, modes=["prequant"], budget_seconds=0, sets=eval_sets)
    shutil.rmtree(tmp, ignore_errors=True)
    return bpb_of(out, "prequant")


def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def full_table(rows: list[dict[str, Any]], pre: dict[str, float]) -> str:
    head = "| model | params | scheme | fits | bytes | bits/weight | codes B | H bound B | pre-quant bpb | quant bpb | sliding bpb | quant s | fit |"
    lines = [head, "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(
            f"| {Path(r['run']).name} | {_fmt(r.get('params'), ',')} | {r['scheme']} | {'yes' if r['fits'] else 'no'} "
            f"| {_fmt(r.get('bytes'), ',')} | {_fmt(r.get('bits_per_weight'), '.3f')} | {_fmt(r.get('code_bytes'), ',')} "
            f"| {_fmt(r.get('entropy_bound'), ',.0f')} | {pre[r['run']]:.5f} | {_fmt(r.get('quant_bpb'), '.5f')} "
            f"| {_fmt(r.get('sliding_bpb'), '.5f')} | {_fmt(r.get('quant_seconds'), '.1f')} | {', '.join(r.get('fit', [])) or r.get('error', '')} |"
        )
    return "\n".join(lines)


def best_table(rows: list[dict[str, Any]], pre: dict[str, float], cap: int) -> str:
    """Per scheme, the model with the best quantized bpb among those that fit the cap."""
    lines = [
        f"| scheme | best model under {cap:,} B | params | pre-quant bpb | quant bpb | sliding bpb | bytes | bits/weight | H bound B (codes) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in SCHEMES:
        fitting = [r for r in rows if r["scheme"] == s.name and r["fits"] and r.get("quant_bpb") is not None]
        if not fitting:
            if any(r["scheme"] == s.name for r in rows):
                lines.append(f"| {s.label} | none fits | | | | | | | |")
            continue
        r = min(fitting, key=lambda r: r["quant_bpb"])
        lines.append(
            f"| {s.label} | {Path(r['run']).name} | {r['params']:,} | {pre[r['run']]:.5f} | {r['quant_bpb']:.5f} "
            f"| {_fmt(r.get('sliding_bpb'), '.5f')} | {r['bytes']:,} | {r['bits_per_weight']:.3f} | {r['entropy_bound']:,.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="trained run directories (model.pt + config.toml)")
    ap.add_argument("--cap", type=int, default=100_000, help="bytes of model.ptz (default: the v2 cap)")
    ap.add_argument("--calibration-batches", type=int, default=16)
    ap.add_argument("--max-val-tokens", type=int, default=0, help="score the first N val tokens (0 = all)")
    ap.add_argument("--sliding", action="store_true", help="also the sliding eval (the run's stride)")
    ap.add_argument("--schemes", default=",".join(s.name for s in SCHEMES))
    ap.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = ap.parse_args(argv)
    names = args.schemes.split(",")
    unknown = [n for n in names if n not in {s.name for s in SCHEMES}]
    if unknown:
        ap.error(f"--schemes: unknown {unknown}; expected some of {', '.join(s.name for s in SCHEMES)}")
    for run in args.runs:
        if not (run / "model.pt").is_file():
            ap.error(f"{run}: no model.pt (expected a trained run directory)")
    eval_sets = [f"data.max_val_tokens={args.max_val_tokens}"] if args.max_val_tokens else []
    rows, pre = [], {}
    with tempfile.TemporaryDirectory(prefix="cpu_golf_schemes-") as tmp:
        work = Path(tmp)
        for run in args.runs:
            pre[str(run)] = prequant_bpb(run, work, eval_sets)
            for s in SCHEMES:
                if s.name in names:
                    rows.append(measure(run, s, work, args.cap, args.calibration_batches, eval_sets, args.sliding))
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(full_table(rows, pre))
    print()
    print(best_table(rows, pre, args.cap))
    if args.json:
        args.json.write_text(json.dumps({"cap": args.cap, "prequant": pre, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
