"""ShuffledSequenceLoader (SPEC §1.6): windows, determinism, rank ownership, epochs, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pgolf.data.loader import ShuffledSequenceLoader, sequences_per_microbatch
from pgolf.data.shards import shard_name, write_shard


def position_shards(root: Path, sizes: list[int]) -> list[Path]:
    """Shard i holds ids i*10000 + position: every token says which shard and offset it came from."""
    files = []
    for i, n in enumerate(sizes):
        files.append(write_shard(root / shard_name("train", i), i * 10_000 + np.arange(n)))
    return files


def decode(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(shard index, start) of each row of a batch of position_shards windows."""
    first = x[:, 0].numpy()
    return first // 10_000, first % 10_000


def test_windows_are_contiguous_and_shifted(tmp_path: Path) -> None:
    files = position_shards(tmp_path, [3000, 2500])
    x, y = ShuffledSequenceLoader(files, seq_len=32).next_batch(16)
    assert x.shape == y.shape == (16, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y - x, torch.ones_like(x))  # consecutive positions of one shard


def test_every_start_used_once_per_epoch_then_reshuffled(tmp_path: Path) -> None:
    sizes, L = [2000, 1500, 777], 50
    loader = ShuffledSequenceLoader(position_shards(tmp_path, sizes), seq_len=L)
    per_epoch = int(loader.remaining.sum())
    x, _ = loader.next_batch(per_epoch)
    shard, start = decode(x)
    for si, n in enumerate(sizes):
        mine = np.sort(start[shard == si])
        phase = int(mine[0]) % L
        assert 0 <= phase <= min(L - 1, n - L - 1)
        # exactly the starts phase + k·L for k < (n - 1 - phase) // L, each once
        assert np.array_equal(mine, phase + L * np.arange((n - 1 - phase) // L))
    assert loader.epoch == 0 and loader.remaining.sum() == 0
    x2, _ = loader.next_batch(per_epoch // 2)
    assert loader.epoch == 1
    shard2, start2 = decode(x2)
    assert len({(a, b) for a, b in zip(shard2, start2)}) == len(start2)  # still no repeats within the epoch


def test_shard_choice_follows_remaining_starts(tmp_path: Path) -> None:
    # A shard with 9x the starts is picked ~9x as often in the first sequences of an epoch.
    loader = ShuffledSequenceLoader(position_shards(tmp_path, [9 * 800 + 1, 800 + 1]), seq_len=8, seed=3)
    shard, _ = decode(loader.next_batch(400)[0])
    assert 0.85 < (shard == 0).mean() < 0.95


def test_determinism_per_rank_and_seed(tmp_path: Path) -> None:
    files = position_shards(tmp_path, [4000, 4000, 4000, 4000])

    def draw(rank: int, seed: int) -> torch.Tensor:
        loader = ShuffledSequenceLoader(files, seq_len=64, rank=rank, world_size=2, seed=seed)
        return torch.cat([loader.next_batch(8)[0] for _ in range(3)])

    assert torch.equal(draw(0, 0), draw(0, 0))
    assert torch.equal(draw(1, 7), draw(1, 7))
    assert not torch.equal(draw(0, 0), draw(0, 7))
    # seed 0 is the records' PCG64(rank): the first draw is that generator's phase for shard 0
    phase = int(np.random.Generator(np.random.PCG64(0)).integers(64))
    assert set(decode(draw(0, 0))[1][decode(draw(0, 0))[0] == 0] % 64) == {phase}


def test_ranks_own_disjoint_shards(tmp_path: Path) -> None:
    files = position_shards(tmp_path, [3000] * 5)
    owned = []
    for rank in range(2):
        loader = ShuffledSequenceLoader(files, seq_len=40, rank=rank, world_size=2)
        shard, _ = decode(loader.next_batch(int(loader.remaining.sum()))[0])
        owned.append(set(shard.tolist()))
    assert owned == [{0, 2, 4}, {1, 3}]
    for rank in (0, 5):  # every rank refuses, not only the ones left without a shard
        with pytest.raises(ValueError, match=f"rank {rank}: 5 train shard\\(s\\) for 6 ranks leave ranks 5..5"):
            ShuffledSequenceLoader(files, seq_len=40, rank=rank, world_size=6)


def test_resume_continues_identically(tmp_path: Path) -> None:
    files = position_shards(tmp_path, [1000, 1300, 900])
    a = ShuffledSequenceLoader(files, seq_len=30, seed=11)
    for _ in range(3):
        a.next_batch(10)
    state = json.loads(json.dumps(a.state_dict()))  # plain data: survives JSON and torch.save
    expected = [a.next_batch(25) for _ in range(6)]  # crosses an epoch boundary (~105 starts/epoch)
    assert a.epoch >= 1
    b = ShuffledSequenceLoader(files, seq_len=30, seed=11)
    b.next_batch(7)  # a different position before loading must not matter
    b.load_state_dict(state)
    for xa, ya in expected:
        xb, yb = b.next_batch(25)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert b.state_dict() == a.state_dict()


def test_resume_rejects_other_loader(tmp_path: Path) -> None:
    files = position_shards(tmp_path, [1000, 1300])
    state = ShuffledSequenceLoader(files, seq_len=30).state_dict()
    with pytest.raises(ValueError, match="seq_len is 30, expected 31"):
        ShuffledSequenceLoader(files, seq_len=31).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        ShuffledSequenceLoader(files, seq_len=30, seed=1).load_state_dict(state)


def test_too_short_shards_and_bad_files(tmp_path: Path) -> None:
    files = position_shards(tmp_path, [20, 30])
    with pytest.raises(ValueError, match="no shard holds a window of 64"):
        ShuffledSequenceLoader(files, seq_len=64)
    bad = tmp_path / "fineweb_train_000009.bin"
    bad.write_bytes(b"\x00" * 2048)
    with pytest.raises(ValueError, match="fineweb_train_000009.bin: bad magic"):
        ShuffledSequenceLoader([bad], seq_len=8)


def test_sequences_per_microbatch() -> None:
    assert sequences_per_microbatch(786_432, 2048, world_size=8, grad_accum=1) == 48  # SPEC §1.6
    assert sequences_per_microbatch(16_384, 512, world_size=1, grad_accum=8) == 4
    with pytest.raises(ValueError, match="not a multiple"):
        sequences_per_microbatch(16_384, 512, world_size=3, grad_accum=1)
