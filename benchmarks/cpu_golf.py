"""The cpu-golf track table (SPEC §11): presets x (val_bpb, total bytes, train s, eval s, steps).

Runs `pgolf run` for each preset on the real corpus (each run: 600 s training incl. quantization + up to
600 s eval on 2 cores), or, with --reuse, tabulates run directories that already hold summary.json.

  python benchmarks/cpu_golf.py --data DATA_DIR --out runs/track            # runs both presets
  python benchmarks/cpu_golf.py --out runs/track --reuse                    # table of finished runs
DATA_DIR: `pgolf data build --docs VAL.jsonl.gz TRAIN/ --tokenizer corpus_1024_bpe.model --val-docs 2020`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PRESETS = ("baseline-cpu", "cpu-golf")


def run_preset(name: str, data: str, out: Path) -> None:
    from pgolf.cli import main as pgolf_main

    rc = pgolf_main(["run", "--preset", name, "--data", data, "--out", str(out)])
    if rc not in (0, 2):  # 2: a clear error (e.g. over the cap) that still leaves summary.json
        raise SystemExit(f"pgolf run --preset {name} failed with exit code {rc}")


def table(rows: list[tuple[str, dict]]) -> str:
    head = f"{'preset':14s} {'val_bpb':>8s} {'score from':>10s} {'total bytes':>12s} {'cap':>10s} {'train s':>8s} {'eval s':>7s} {'steps':>6s}"
    lines = [head, "-" * len(head)]
    for name, s in rows:
        mode = next(m for m in ("ngram", "ttt", "sliding", "quant", "pre_quant") if s.get(f"{m}_bpb") is not None)
        over = " OVER" if s["total_bytes"] > s["cap_bytes"] else ""
        lines.append(
            f"{name:14s} {s['val_bpb']:8.4f} {mode:>10s} {s['total_bytes']:12,d} {s['cap_bytes']:10,d}{over} "
            f"{s['train_seconds']:8.1f} {s['eval_seconds']:7.1f} {s['steps']:6d}"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="cpu-golf data folder (shards + tokenizer.model)")
    ap.add_argument("--out", required=True, help="folder holding one run directory per preset")
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--reuse", action="store_true", help="only tabulate existing OUT/PRESET/summary.json")
    args = ap.parse_args()
    rows = []
    for name in args.presets.split(","):
        run_dir = Path(args.out) / name
        if not args.reuse:
            if not args.data:
                ap.error("--data is required unless --reuse")
            run_preset(name, args.data, run_dir)
        rows.append((name, json.loads((run_dir / "summary.json").read_text())))
    print(table(rows))


if __name__ == "__main__":
    main()
