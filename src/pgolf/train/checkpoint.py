"""Resumable training state: one atomically written file (RUN_DIR/checkpoint.pt), rank 0 writes it.

Shared state (weights, optimizers, EMA, step, clock, looping flag, history) is identical on every rank;
per-rank state (loader position, RNG states) is gathered so each rank restores its own on resume.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pgolf.fileio import atomic_torch_save

CHECKPOINT_VERSION = 1


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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
    try:
        # Our own file: it holds numpy/python RNG states, which the weights-only unpickler rejects.
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file: say which
        raise ValueError(f"{path}: not a readable pgolf checkpoint ({err})") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: not a pgolf checkpoint of version {CHECKPOINT_VERSION}")
    return state
