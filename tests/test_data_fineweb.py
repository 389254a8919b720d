"""`pgolf data fineweb` against a local folder standing in for the Hugging Face hub."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import huggingface_hub
import huggingface_hub.errors
import numpy as np
import pytest
import test_data_common

from pgolf.cli import main
from pgolf.data.fineweb import FetchError, download_fineweb
from pgolf.data.shards import ShardError, read_shard, shard_name, write_shard

tiny_tokenizer = test_data_common.tiny_tokenizer  # the shared session fixture

REPO = "someone/parameter-golf"


class FakeMissing(huggingface_hub.errors.RemoteEntryNotFoundError):
    def __init__(self, message: str):
        Exception.__init__(self, message)


class FakeHub:
    """hf_hub_download over `root`: returns a cache symlink to a blob, like the real cache; counts calls."""

    def __init__(self, root: Path, cache: Path):
        self.root, self.cache, self.calls = root, cache, []

    def __call__(self, repo_id: str, filename: str, *, repo_type: str | None = None, **kwargs) -> str:
        assert repo_id == REPO and repo_type == "dataset" and not kwargs
        self.calls.append(filename)
        src = self.root / filename
        if not src.is_file():
            raise FakeMissing(f"404: {filename}")
        blob = self.cache / "blobs" / f"{len(self.calls)}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, blob)
        link = self.cache / "snapshots" / filename
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink():
            link.unlink()
        link.symlink_to(blob)
        return str(link)


def make_hub(root: Path, tokenizer: Path, n_val: int = 2, n_train: int = 3, manifest: bool = True) -> Path:
    data = root / "datasets" / "datasets" / "fineweb10B_sp1024"
    rng = np.random.default_rng(0)
    for i in range(n_val):
        write_shard(data / shard_name("val", i), rng.integers(0, 1024, size=5000 + i))
    for i in range(n_train):
        write_shard(data / shard_name("train", i), rng.integers(0, 1024, size=8000 + i))
    (root / "datasets" / "tokenizers").mkdir(parents=True)
    shutil.copyfile(tokenizer, root / "datasets" / "tokenizers" / "fineweb_1024_bpe.model")
    if manifest:
        entry = {"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024",
                 "stats": {"files_val": n_val, "files_train": n_train}}  # fmt: skip
        tok = {"name": "sp_bpe_1024", "model_path": "tokenizers/fineweb_1024_bpe.model"}
        (root / "datasets" / "manifest.json").write_text(
            json.dumps({"datasets": [entry], "tokenizers": [tok]})
        )
    return data


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    fake = FakeHub(tmp_path / "hub", tmp_path / "cache")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    return fake


def test_download_validates_writes_manifest_and_resumes(
    hub: FakeHub, tiny_tokenizer: Path, tmp_path: Path
) -> None:
    remote = make_hub(hub.root, tiny_tokenizer)
    out = tmp_path / "out"
    argv = [
        "data",
        "fineweb",
        "--variant",
        "sp1024",
        "--train-shards",
        "2",
        "--out",
        str(out),
        "--repo-id",
        REPO,
    ]
    assert main([*argv, "--quiet"]) == 0
    names = [
        "fineweb_val_000000.bin",
        "fineweb_val_000001.bin",
        "fineweb_train_000000.bin",
        "fineweb_train_000001.bin",
    ]
    for name in names:
        assert (out / name).read_bytes() == (remote / name).read_bytes()
        assert not (out / name).is_symlink()
    assert not (out / "fineweb_train_000002.bin").exists()
    assert (out / "tokenizer.model").read_bytes() == tiny_tokenizer.read_bytes()
    m = json.loads((out / "manifest.json").read_text())
    assert m["splits"]["val"]["tokens"] == 5000 + 5001 and m["splits"]["train"]["tokens"] == 8000 + 8001
    assert m["tokenizer"]["vocab_size"] == 1024 and m["source"]["repo_id"] == REPO
    assert hub.calls[0] == "datasets/manifest.json"
    assert "datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin" in hub.calls

    # resume: everything present and valid -> nothing fetched; a truncated shard is fetched again
    hub.calls.clear()
    assert main([*argv, "--quiet"]) == 0
    assert hub.calls == []
    bad = out / "fineweb_train_000001.bin"
    bad.write_bytes(bad.read_bytes()[:-2])
    assert main([*argv, "--quiet"]) == 0
    assert hub.calls == ["datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin"]
    assert len(read_shard(bad)) == 8001


def test_without_manifest_probes_val_shards(hub: FakeHub, tiny_tokenizer: Path, tmp_path: Path) -> None:
    make_hub(hub.root, tiny_tokenizer, n_val=3, manifest=False)
    m = download_fineweb("sp1024", 1, tmp_path / "out", repo_id=REPO, quiet=True)
    assert [s["name"] for s in m["splits"]["val"]["shards"]] == [shard_name("val", i) for i in range(3)]
    with pytest.raises(FileNotFoundError, match="fineweb10B_sp1024/fineweb_train_000003.bin does not exist"):
        download_fineweb("sp1024", 4, tmp_path / "out", repo_id=REPO, quiet=True)


def test_too_many_train_shards_and_bad_remote_shard(
    hub: FakeHub, tiny_tokenizer: Path, tmp_path: Path
) -> None:
    remote = make_hub(hub.root, tiny_tokenizer)
    with pytest.raises(ValueError, match="sp1024 has 3 train shards, 5 requested"):
        download_fineweb("sp1024", 5, tmp_path / "a", repo_id=REPO, quiet=True)
    (remote / "fineweb_val_000001.bin").write_bytes(b"not a shard" * 200)
    with pytest.raises(
        ShardError, match=r"someone/parameter-golf:datasets/.*fineweb_val_000001.bin is not a valid shard"
    ):
        download_fineweb("sp1024", 1, tmp_path / "b", repo_id=REPO, quiet=True)
    assert not (tmp_path / "b" / "fineweb_val_000001.bin").exists()


def test_wrong_tokenizer_vocab(hub: FakeHub, tiny_tokenizer: Path, tmp_path: Path) -> None:
    make_hub(hub.root, tiny_tokenizer)
    with pytest.raises(
        ValueError, match="fineweb_1024_bpe.model: tokenizer vocab is 1024 but variant sp8192 needs 8192"
    ):
        # the sp1024 export served as sp8192: its tokenizer does not fit the variant
        download_fineweb("sp8192", 1, tmp_path / "out", repo_id=REPO, quiet=True, dataset_dir="datasets/fineweb10B_sp1024",
                         tokenizer_path="tokenizers/fineweb_1024_bpe.model")  # fmt: skip


def test_missing_huggingface_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(FetchError, match=r"needs huggingface_hub: pip install 'pgolf\[fineweb\]'"):
        download_fineweb("sp8192", 1, tmp_path, quiet=True)
    assert main(["data", "fineweb", "--variant", "sp8192", "--out", str(tmp_path), "--quiet"]) == 2
    assert "pgolf[fineweb]" in capsys.readouterr().err
