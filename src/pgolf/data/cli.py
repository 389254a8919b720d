"""`pgolf data build|fineweb|stats`: make token shards from documents, download the challenge's, inspect."""

from __future__ import annotations

import argparse
import json

from pgolf.data.shards import MAX_SHARD_TOKENS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="build, download and inspect token shards")
    dsub = p.add_subparsers(dest="data_command", required=True)

    b = dsub.add_parser(
        "build",
        help="tokenize documents into shards",
        description="Tokenize documents (.jsonl/.jsonl.gz with a 'text' field per line; a .txt file is one "
        "document; a folder = its such files, sorted) into fineweb_{val,train}_NNNNNN.bin shards. The first "
        "--val-docs documents are validation, the rest training; each document is [BOS=1] + ids, no EOS. "
        "With --caseops the text is CaseOps-transformed and each val shard gets a byte sidecar.",
    )
    b.add_argument(
        "--docs", nargs="+", required=True, metavar="PATH", help="document files or folders, in order"
    )
    tok = b.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", metavar="MODEL", help="an existing SentencePiece model")
    tok.add_argument(
        "--train-tokenizer",
        type=int,
        metavar="VOCAB",
        help="train a SentencePiece BPE of this vocab with the challenge's settings on the TRAIN docs only",
    )
    b.add_argument("--out", required=True, metavar="DIR", help="output data folder")
    b.add_argument("--val-docs", type=int, required=True, metavar="N", help="the first N documents are val")
    b.add_argument("--vocab-size", type=int, help="fail unless the tokenizer has exactly this many pieces")
    b.add_argument(
        "--shard-tokens", type=int, default=MAX_SHARD_TOKENS, help="tokens per shard (default 1e8)"
    )
    b.add_argument("--workers", type=int, default=0, help="tokenizer processes (default: all CPU cores)")
    b.add_argument("--chunk-docs", type=int, default=256, help="documents per encode task")
    b.add_argument(
        "--tokenizer-train-docs",
        type=int,
        default=0,
        help="train the tokenizer on the first N train docs (0 = all)",
    )
    b.add_argument(
        "--caseops",
        action="store_true",
        help="CaseOps case transform (SPEC-1855 §1): operators reserved at ids 4-7, val byte sidecars",
    )
    b.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_build)

    f = dsub.add_parser("fineweb", help="download the challenge's published FineWeb shards + tokenizer")
    f.add_argument("--variant", required=True, choices=["sp1024", "sp4096", "sp8192"])
    f.add_argument(
        "--train-shards", type=int, default=1, metavar="N", help="first N train shards (default 1)"
    )
    f.add_argument("--out", metavar="DIR", help="default data/datasets/fineweb10B_<variant>")
    f.add_argument(
        "--repo-id",
        help="HF dataset repo (default: willdepueoai/parameter-golf for sp1024, "
        "kevclark/parameter-golf for sp4096/sp8192)",
    )
    f.add_argument("--remote-prefix", default="datasets", help="export root folder inside the repo")
    f.add_argument(
        "--dataset-dir", help="shard folder under the prefix (default datasets/fineweb10B_<variant>)"
    )
    f.add_argument(
        "--tokenizer-path", help="tokenizer model under the prefix (default from the export manifest)"
    )
    f.add_argument("--quiet", action="store_true")
    f.set_defaults(func=_fineweb)

    s = dsub.add_parser("stats", help="token/byte counts of a data folder")
    s.add_argument("dir")
    s.add_argument(
        "--seq-len", type=int, default=2048, help="eval window: the val stream is cut to whole windows + 1"
    )
    s.add_argument("--tokenizer", help="SentencePiece model for byte counts (default DIR/tokenizer.model)")
    s.add_argument("--json", action="store_true", help="machine-readable JSON")
    s.set_defaults(func=_stats)


def _build(args: argparse.Namespace) -> int:
    from pgolf.data.build import build_dataset

    m = build_dataset(
        docs=args.docs,
        out_dir=args.out,
        val_docs=args.val_docs,
        tokenizer=args.tokenizer,
        train_vocab=args.train_tokenizer or 0,
        vocab_size=args.vocab_size,
        shard_tokens=args.shard_tokens,
        workers=args.workers,
        chunk_docs=args.chunk_docs,
        tokenizer_train_docs=args.tokenizer_train_docs,
        overwrite=args.overwrite,
        progress=not args.quiet,
        command={k: v for k, v in vars(args).items() if k != "func"},
        caseops=args.caseops,
    )
    for split in ("val", "train"):
        info = m["splits"][split]
        print(
            f"{split:5s} {info['docs']:>10,} docs {info['tokens']:>14,} tokens {len(info['shards']):>4} shard(s)"
        )
    print(
        f"{m['tokens_per_second']:,.0f} tokens/s with {m['workers']} worker(s); wrote {args.out}/manifest.json"
    )
    return 0


def _fineweb(args: argparse.Namespace) -> int:
    from pgolf.data.fineweb import download_fineweb

    download_fineweb(
        variant=args.variant,
        train_shards=args.train_shards,
        out_dir=args.out or f"data/datasets/fineweb10B_{args.variant}",
        repo_id=args.repo_id,
        remote_prefix=args.remote_prefix,
        dataset_dir=args.dataset_dir,
        tokenizer_path=args.tokenizer_path,
        quiet=args.quiet,
        command={k: v for k, v in vars(args).items() if k != "func"},
    )
    return 0


def _stats(args: argparse.Namespace) -> int:
    from pgolf.data.stats import data_stats, format_stats

    stats = data_stats(args.dir, seq_len=args.seq_len, tokenizer=args.tokenizer)
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0
