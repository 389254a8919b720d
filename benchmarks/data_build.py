"""Throughput of `pgolf data build` (docs → shards) on the shared train corpus, per tokenizer.

    python benchmarks/data_build.py [--data /work/shared/data] [--workers 2] [--quick]

Builds the whole train corpus (train/*.jsonl.gz, 3 files; --quick: the first file only) with the sp8192
tokenizer and the cpu-golf corpus_1024 tokenizer into a temporary folder, and prints a table of documents,
tokens, seconds and tokens/s. "encode tok/s" covers read + decode JSON + tokenize + write shards (the
manifest's encode time); "wall tok/s" adds tokenizer loading, pool start-up and input hashing.
Target: >= 1,000,000 tokens/s with both cores.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from pgolf.data.build import build_dataset

TOKENIZERS = {"sp8192": "fineweb_8192_bpe.model", "cpu-golf 1024": "corpus_1024_bpe.model"}
TARGET = 1_000_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("PGOLF_TEST_DATA", "/work/shared/data"))
    parser.add_argument("--workers", type=int, default=0, help="tokenizer processes (0 = all cores)")
    parser.add_argument("--chunk-docs", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="one train file only")
    args = parser.parse_args()

    data = Path(args.data)
    files = sorted((data / "train").glob("*.jsonl.gz"))
    if not files:
        raise SystemExit(f"no train/*.jsonl.gz under {data}")
    if args.quick:
        files = files[:1]
    print(
        f"inputs: {len(files)} file(s), {sum(p.stat().st_size for p in files) / 1e6:.1f} MB gzip; cores {os.cpu_count()}"
    )
    header = f"{'tokenizer':14s} {'workers':>7s} {'docs':>8s} {'tokens':>12s} {'seconds':>8s} {'encode tok/s':>13s} {'wall tok/s':>12s}  target"
    print(header)
    print("-" * len(header))
    for name, model in TOKENIZERS.items():
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            m = build_dataset(
                files,
                out,
                val_docs=0,
                tokenizer=data / "tokenizers" / model,
                workers=args.workers,
                chunk_docs=args.chunk_docs,
                progress=False,
            )
            wall = time.perf_counter() - t0
        tokens = m["splits"]["train"]["tokens"]
        ok = "ok" if m["tokens_per_second"] >= TARGET else "BELOW"
        print(
            f"{name:14s} {m['workers']:>7d} {m['splits']['train']['docs']:>8,} {tokens:>12,} {wall:>8.2f} "
            f"{m['tokens_per_second']:>13,.0f} {tokens / wall:>12,.0f}  {ok}"
        )


if __name__ == "__main__":
    main()
