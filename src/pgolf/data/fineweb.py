"""Download the challenge's published FineWeb shards + tokenizer (SPEC §1.2): `pgolf data fineweb`.

The published export lives in a Hugging Face *dataset* repo under a root folder (default "datasets",
the challenge's MATCHED_FINEWEB_REMOTE_ROOT_PREFIX):
  {prefix}/manifest.json                                  export manifest (shard counts, tokenizer path)
  {prefix}/datasets/fineweb10B_sp{V}/fineweb_{val,train}_NNNNNN.bin
  {prefix}/tokenizers/fineweb_{V}_bpe.model
sp1024 is published in willdepueoai/parameter-golf, sp4096/sp8192 in kevclark/parameter-golf. All val
shards and the first N train shards are fetched; the val shard count comes from the export manifest
(or, without one, from probing consecutive shards). Every shard is validated after download; files
already present and valid are skipped, so an interrupted download resumes.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from pgolf.data.shards import ShardError, read_header, shard_name
from pgolf.fileio import atomic_write_json

VARIANTS = {"sp1024": 1024, "sp4096": 4096, "sp8192": 8192}
DEFAULT_REPOS = {
    "sp1024": "willdepueoai/parameter-golf",
    "sp4096": "kevclark/parameter-golf",
    "sp8192": "kevclark/parameter-golf",
}
DEFAULT_PREFIX = "datasets"


class FetchError(ValueError):
    """A download failed; the message names the repo and remote file."""


def _hub():
    """The huggingface_hub module (tests replace its hf_hub_download), with a clear error when missing."""
    try:
        import huggingface_hub
        import huggingface_hub.errors  # noqa: F401  (a lazy submodule: import it explicitly)
    except ImportError:
        raise FetchError(
            "pgolf data fineweb needs huggingface_hub: pip install 'pgolf[fineweb]' (or pip install huggingface_hub)"
        ) from None
    return huggingface_hub


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def fetch_file(repo_id: str, remote_path: str, dest: Path) -> bool:
    """Download one file of a dataset repo to `dest` (atomically); False when the repo lacks it."""
    hub = _hub()
    absent = getattr(hub.errors, "RemoteEntryNotFoundError", hub.errors.EntryNotFoundError)
    try:
        cached = Path(hub.hf_hub_download(repo_id=repo_id, filename=remote_path, repo_type="dataset"))
    except absent:
        return False
    except OSError as err:
        raise FetchError(f"{repo_id}:{remote_path}: download failed ({err})") from None
    # The hub cache holds symlinks to blobs: link (or copy) the blob itself next to dest, then rename.
    source = cached.resolve(strict=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, dest)
    return True


def _valid_shard(path: Path) -> bool:
    try:
        read_header(path)
        return True
    except ShardError:
        return False


def _fetch_shard(repo_id: str, remote_dir: str, local: Path, log) -> bool:
    """A validated shard at `local` (kept when already valid); False when the repo has no such file."""
    if local.is_file() and _valid_shard(local):
        log(f"  {local.name}: present")
        return True
    remote = _join(remote_dir, local.name)
    if not fetch_file(repo_id, remote, local):
        return False
    try:
        tokens = read_header(local)
    except ShardError as err:
        local.unlink()
        raise ShardError(f"downloaded {repo_id}:{remote} is not a valid shard: {err}") from None
    log(f"  {local.name}: downloaded ({tokens:,} tokens)")
    return True


def _remote_manifest(repo_id: str, prefix: str, out: Path) -> dict[str, Any] | None:
    """The export's manifest.json (cached in DIR/remote_manifest.json), or None when the repo has none."""
    local = out / "remote_manifest.json"
    if not local.is_file() and not fetch_file(repo_id, _join(prefix, "manifest.json"), local):
        return None
    try:
        return json.loads(local.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        local.unlink()
        raise FetchError(f"{repo_id}:{_join(prefix, 'manifest.json')}: invalid JSON ({err})") from None


def _plan(manifest: dict[str, Any] | None, variant: str, dataset_dir: str | None, tokenizer_path: str | None):
    """(dataset dir, tokenizer path, val shard count or None, train shard count or None) under the prefix."""
    vocab = VARIANTS[variant]
    name = f"fineweb10B_{variant}"
    entry = None
    if manifest is not None:
        entry = next((d for d in manifest.get("datasets", []) if d.get("name") == name), None)
    stats = (entry or {}).get("stats") or {}
    n_val = int(stats["files_val"]) if "files_val" in stats else None
    n_train = int(stats["files_train"]) if "files_train" in stats else None
    if tokenizer_path is None and entry is not None:
        tok = next(
            (t for t in manifest.get("tokenizers", []) if t.get("name") == entry.get("tokenizer_name")), {}
        )
        tokenizer_path = tok.get("model_path") or tok.get("path")
    return (
        dataset_dir or _join("datasets", name),
        tokenizer_path or f"tokenizers/fineweb_{vocab}_bpe.model",
        n_val,
        n_train,
    )


def download_fineweb(
    variant: str,
    train_shards: int,
    out_dir: str | Path,
    repo_id: str | None = None,
    remote_prefix: str = DEFAULT_PREFIX,
    dataset_dir: str | None = None,
    tokenizer_path: str | None = None,
    quiet: bool = False,
    command: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fetch all val shards + the first `train_shards` train shards + tokenizer.model into `out_dir`."""
    from pgolf.data.build import file_sha256
    from pgolf.data.bytes import TokenizerError, load_tokenizer

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    if train_shards < 0:
        raise ValueError(f"--train-shards must be >= 0, got {train_shards}")
    repo_id = repo_id or DEFAULT_REPOS[variant]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    manifest = _remote_manifest(repo_id, remote_prefix, out)
    data_rel, tok_rel, n_val, n_train = _plan(manifest, variant, dataset_dir, tokenizer_path)
    if n_train is not None and train_shards > n_train:
        raise ValueError(f"{repo_id}: {variant} has {n_train} train shards, {train_shards} requested")
    remote_dir = _join(remote_prefix, data_rel)
    log(f"{repo_id}:{remote_dir} -> {out}")

    val_names: list[str] = []
    while n_val is None or len(val_names) < n_val:
        local = out / shard_name("val", len(val_names))
        if not _fetch_shard(repo_id, remote_dir, local, log):
            if n_val is None and val_names:
                break  # probing without a manifest: the first missing index ends the split
            raise FileNotFoundError(f"{repo_id}: {_join(remote_dir, local.name)} does not exist")
        val_names.append(local.name)
    for i in range(train_shards):
        local = out / shard_name("train", i)
        if not _fetch_shard(repo_id, remote_dir, local, log):
            raise FileNotFoundError(f"{repo_id}: {_join(remote_dir, local.name)} does not exist")

    model = out / "tokenizer.model"
    remote_tok = _join(remote_prefix, tok_rel)
    vocab = VARIANTS[variant]
    sp = None
    if model.is_file():
        try:
            sp = load_tokenizer(model, vocab)
            log("  tokenizer.model: present")
        except TokenizerError:
            model.unlink()  # a stale or foreign model: fetch the published one
    if sp is None:
        if not fetch_file(repo_id, remote_tok, model):
            raise FileNotFoundError(f"{repo_id}: tokenizer {remote_tok} does not exist")
        sp = load_tokenizer(model)
        if sp.get_piece_size() != vocab:
            model.unlink()
            raise TokenizerError(
                f"{repo_id}:{remote_tok}: tokenizer vocab is {sp.get_piece_size()} but variant {variant} needs {vocab}"
            )
        log("  tokenizer.model: downloaded")

    def split_entry(names: list[str]) -> dict[str, Any]:
        shards = [{"name": n, "tokens": read_header(out / n)} for n in names]
        return {"tokens": sum(s["tokens"] for s in shards), "shards": shards}

    result = {
        "format": "pgolf-data/1",
        "bos_id": 1,
        "append_eos": False,
        "command": command,
        "source": {
            "repo_id": repo_id,
            "remote_prefix": remote_prefix,
            "dataset_dir": data_rel,
            "variant": variant,
        },
        "tokenizer": {
            "path": "tokenizer.model",
            "source": f"{repo_id}:{remote_tok}",
            "sha256": file_sha256(model),
            "vocab_size": int(sp.get_piece_size()),
            "trainer": None,
        },
        "splits": {
            "val": split_entry(val_names),
            "train": split_entry([shard_name("train", i) for i in range(train_shards)]),
        },
    }
    atomic_write_json(out / "manifest.json", result)
    log(
        f"done: {len(val_names)} val shard(s) ({result['splits']['val']['tokens']:,} tokens), "
        f"{train_shards} train shard(s) ({result['splits']['train']['tokens']:,} tokens)"
    )
    return result
