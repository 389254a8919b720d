"""Resumable training state: one atomically written file (RUN_DIR/checkpoint.pt), rank 0 writes it.

Shared state (weights, optimizers, EMA, step, clock, looping flag, history) is identical on every rank;
per-rank state (loader position, RNG states) is gathered so each rank restores its own on resume.
Everything in it is tensors and plain Python data (numpy's RNG key as a list), so it loads with
torch.load(weights_only=True): a checkpoint that would need unpickling code to load is refused.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pgolf.fileio import atomic_torch_save
from pgolf.rundir import load_plain

CHECKPOINT_VERSION = 2  # 2: plain-data RNG states (loads with weights_only=True)


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": _plain_numpy_state(np.random.get_state(legacy=False)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _plain_numpy_state(state: dict[str, Any]) -> dict[str, Any]:
    return dict(state, state=dict(state["state"], key=[int(k) for k in state["state"]["key"]]))


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy_state = dict(state["numpy"])
    numpy_state["state"] = dict(
        numpy_state["state"], key=np.asarray(numpy_state["state"]["key"], dtype=np.uint32)
    )
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_per_rank(obj: Any, world_size: int) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank (a plain list in a single process)."""
    if world_size <= 1:
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` atomically (a crash mid-write leaves the previous checkpoint intact)."""
    return atomic_torch_save(path, {"version": CHECKPOINT_VERSION, **state})


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint to resume from (train without --resume first)")
    state = load_plain(path, "pgolf checkpoint")
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: not a pgolf checkpoint of version {CHECKPOINT_VERSION}")
    return state
