"""Eval throughput on the real val split with a cpu-golf-shaped model.

Prints tokens/s and seconds of non-overlapping, sliding (stride 64) and score-first TTT eval on the first
--eval-tokens val tokens, and the n-gram hint precompute tokens/s on the whole val stream. The `unbatched`
part compares, on --unbatched-tokens, pgolf's sliding eval (eval.batch_seqs windows per forward, the last
layer and the head run only where the window is scored) with scoring each window separately the plain way
(one window per forward, logits of the whole window, the scored tail cut out: SPEC §5.2 as written), and
shows pgolf's eval at one window per forward between the two. Targets: hint precompute >= 1,000,000
tokens/s on one core; sliding eval >= 2x the tokens/s of the plain per-window loop.

  python benchmarks/eval.py [RUN_DIR] [--quick] [--parts hints,nonoverlap,sliding,ttt,unbatched]
Without RUN_DIR the model is a randomly initialised GPT of the cpu-golf preset (throughput does not depend
on the weights) and the val split is tokenized from --data with the preset's tokenizer.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from pgolf.config import load_run_config, preset
from pgolf.data.build import encode_documents, iter_documents
from pgolf.data.bytes import build_byte_tables, load_tokenizer
from pgolf.eval.ngram_hints import HintParams, compute_hints, token_flags
from pgolf.eval.run_eval import load_eval_data, load_quant_model
from pgolf.eval.score import eval_nonoverlap, eval_sliding
from pgolf.eval.ttt import eval_ttt
from pgolf.runtime import keep_freed_memory, resolve_precision

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from oracles import plain_sliding_nll  # noqa: E402  (the test oracle, not shipped in src/)

PARTS = ("hints", "nonoverlap", "sliding", "ttt", "unbatched")


def val_from_jsonl(data: Path, tokenizer: Path, vocab: int, max_docs: int) -> tuple[torch.Tensor, object]:
    sp = load_tokenizer(tokenizer, vocab)
    docs = list(iter_documents([data / "val" / "val_000.jsonl.gz"]))
    if max_docs:
        docs = docs[:max_docs]
    tokens = torch.from_numpy(encode_documents(sp, docs).astype(np.int64))
    return tokens, build_byte_tables(sp, vocab)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "run_dir", nargs="?", help="a run directory (its artifact and val data); default: random model"
    )
    ap.add_argument(
        "--data", default="/work/shared/data", help="corpus folder (val/val_000.jsonl.gz, tokenizers/)"
    )
    ap.add_argument("--quick", action="store_true", help="a few thousand tokens, seconds in all")
    ap.add_argument("--eval-tokens", type=int, default=65_536, help="val tokens for the model evals")
    ap.add_argument(
        "--unbatched-tokens", type=int, default=16_384, help="val tokens for batched vs unbatched"
    )
    ap.add_argument("--stride", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the unbatched rows (best)")
    ap.add_argument("--table-bits", type=int, default=0, help="n-gram table bits (0 = the config's)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {PARTS}")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    ap.add_argument(
        "--autocast",
        choices=("auto", "off", "bf16"),
        help="eval precision (default: the run's train.autocast)",
    )
    args = ap.parse_args()
    keep_freed_memory()  # as the pgolf command does
    parts = [p for p in args.parts.split(",") if p]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        ap.error(f"unknown parts {bad}; expected {PARTS}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.eval_tokens, args.unbatched_tokens, args.repeats = 1_024, 1_024, 1

    if args.run_dir:
        cfg = load_run_config(args.run_dir)
        tokens, tables = load_eval_data(cfg)
    else:
        cfg = preset("cpu-golf")
        tok_path = Path(args.data) / "tokenizers" / "corpus_1024_bpe.model"
        tokens, tables = val_from_jsonl(
            Path(args.data), tok_path, cfg.model.vocab_size, 40 if args.quick else 0
        )
    e, device = cfg.eval, torch.device("cpu")
    if args.autocast:
        cfg.train.autocast = args.autocast
    if args.table_bits:
        e.ngram_table_bits = args.table_bits
    print(
        f"val stream {tokens.numel():,} tokens; preset {cfg.preset}; torch threads {torch.get_num_threads()}"
    )
    rows: list[tuple[str, int, float]] = []
    summary = ""

    if "hints" in parts:
        flags = token_flags(tables)
        kinds = {False: "token expert", True: "+ within/word experts"}
        best = {}
        for _ in range(args.repeats):  # interleaved, best of each
            for experts in kinds:
                prm = replace(HintParams.from_config(e), experts=experts)
                compute_hints(tokens[:1000].numpy(), prm, flags, quiet=True)  # numba load/compile, untimed
                _, sec = timed(lambda prm=prm: compute_hints(tokens.numpy(), prm, flags, quiet=True))
                best[experts] = min(best.get(experts, float("inf")), sec)
        for experts, sec in best.items():
            name = f"n-gram hints, {kinds[experts]} (2^{prm.table_bits})"
            rows.append((name, tokens.numel(), sec))
        summary += (
            f"hint precompute with the experts / token expert only = {best[True] / best[False]:.2f}x time\n"
        )

    model_parts = [p for p in parts if p != "hints"]
    if model_parts:
        if args.run_dir:
            model = load_quant_model(Path(args.run_dir), cfg, device)
        else:
            from pgolf.model import GPT

            model = GPT(cfg.model).eval()
            model.set_looping(cfg.model.num_loops > 0)
        sub = tokens[: args.eval_tokens + 1]
        kw = dict(device=device, autocast_mode=cfg.train.autocast)
        precision = "bf16" if resolve_precision(cfg.train.autocast, device) == "bf16" else "fp32"
        n = sub.numel() - 1
        if "nonoverlap" in parts:
            _, sec = timed(
                lambda: eval_nonoverlap(model, sub, tables, seq_len=e.seq_len, batch_seqs=e.batch_seqs, **kw)
            )
            rows.append((f"non-overlapping (seq {e.seq_len}, batch {e.batch_seqs})", n, sec))
        if "sliding" in parts:
            _, sec = timed(
                lambda: eval_sliding(
                    model, sub, tables, seq_len=e.seq_len, stride=args.stride, batch_seqs=e.batch_seqs, **kw
                )
            )
            rows.append((f"sliding (stride {args.stride}, batch {e.batch_seqs})", n, sec))
        if "ttt" in parts:
            e.stride = args.stride
            # at least 4 chunks in the measured slice, so the timing includes training
            e.ttt_chunk_tokens = min(e.ttt_chunk_tokens, max(e.stride, n // 4 // e.stride * e.stride))
            _, sec = timed(lambda: eval_ttt(model, sub, tables, e, **kw))
            rows.append(
                (f"TTT (stride {e.stride}, chunk {e.ttt_chunk_tokens}, {e.ttt_epochs} epoch)", n, sec)
            )
        if "unbatched" in parts:
            small = tokens[: args.unbatched_tokens + 1]
            m = small.numel() - 1
            kw_small = dict(seq_len=e.seq_len, stride=args.stride, **kw)
            variants = {
                (b, "pgolf"): lambda b=b: eval_sliding(model, small, tables, batch_seqs=b, **kw_small)[0].loss
                for b in (e.batch_seqs, 1)
            }
            variants[(1, "plain")] = lambda: plain_sliding_nll(
                model, small, e.seq_len, args.stride, cfg.train.autocast
            )
            # Interleaved repeats, best time of each (timeit's rule): this machine's speed drifts by ~10%.
            best, losses = {key: float("inf") for key in variants}, []
            for _ in range(args.repeats):
                for key, fn in variants.items():
                    loss, sec = timed(fn)
                    best[key] = min(best[key], sec)
                    losses.append(loss)
            names = {
                key: f"sliding stride {args.stride}, pgolf, {key[0]} window(s) per forward" for key in best
            }
            names[(1, "plain")] = f"sliding stride {args.stride}, each window separately, full logits"
            rows.extend((names[key], m, sec) for key, sec in best.items())
            batched, single, plain = (best[k] for k in ((e.batch_seqs, "pgolf"), (1, "pgolf"), (1, "plain")))
            summary += (
                f"sliding eval / plain per-window loop = {plain / batched:.2f}x (target >= 2x); of it, batching"
                f" {single / batched:.2f}x and the scored-tail forward {plain / single:.2f}x\n"
                + forward_mfu(model, m, e.seq_len, args.stride, rows[-3:], args.quick, precision)
                + f"\nloss of the three sliding rows agrees to {max(losses) - min(losses):.1e} nats/token"
            )

    print(f"\n{'measurement':62s} {'tokens':>10s} {'seconds':>9s} {'tokens/s':>12s}")
    for name, count, sec in rows:
        print(f"{name:62s} {count:10,d} {sec:9.2f} {count / sec:12,.0f}")
    speeds = {name: count / sec for name, count, sec in rows}
    hint = [v for k, v in speeds.items() if k.startswith("n-gram")]
    if hint:
        print(f"\nhint precompute {hint[0]:,.0f} tokens/s (target >= 1,000,000 on one core)")
    if summary:
        print(summary)


def forward_mfu(
    model, targets: int, seq_len: int, stride: int, rows: list, quick: bool, precision: str
) -> str:
    """MFU of the sliding rows, counting the plain loop's work for all of them: a full forward of every window
    position (a third of the training FLOPs/token of benchmarks/train_throughput.py) over the matmul peak
    measured here in the eval's precision (`precision`: bf16 or fp32). pgolf's rows skip part of that work
    (last layer and head outside the scored tail), so theirs is an effective figure and may pass what the
    matmul peak allows the plain loop."""
    from train_throughput import flops_per_token, matmul_peak

    from pgolf.eval.score import sliding_windows

    windows = sliding_windows(targets, seq_len, stride)
    positions = int(windows[:, 1].sum())  # every window position runs a forward
    fwd = flops_per_token(model, seq_len) / 3.0
    peak = matmul_peak(512 if quick else 2048, precision, 0, 0.5 if quick else 3.0)
    parts = [
        f"{precision} matmul peak {peak / 1e9:.0f} GFLOP/s; full forward {fwd / 1e6:.2f} MFLOP/position;"
        " MFU of a full forward of every window position"
    ]
    for name, _count, sec in rows:
        parts.append(f"{name}: {positions * fwd / sec / peak:.0%}")
    return "; ".join(parts)


if __name__ == "__main__":
    main()
