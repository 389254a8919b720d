"""Device, precision, seeding and process-group helpers shared by every stage.

CPU is the tested default; CUDA paths are selected by the same calls. Under torchrun the env vars
RANK / WORLD_SIZE / LOCAL_RANK are read and a process group is created with an explicit backend
(NCCL on CUDA, gloo otherwise).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' -> cuda:LOCAL_RANK when CUDA is available, else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.device=cuda but CUDA is not available on this machine")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device_name: str = "auto") -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 (idempotent); single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist.is_initialized():
        dist.barrier()


def shutdown_distributed(wait: bool = True) -> None:
    """Leave the process group cleanly: a barrier, then destroy it (no-op without one).

    The barrier keeps a rank that finishes first from tearing down its pairs while another is still in a
    collective; the destroy is what torch asks of every process before it exits. It does not cure a rarer
    abort inside torch 2.13's gloo teardown (see tests/dist_common.py). `wait=False` (no barrier) on error
    paths, where the other ranks may never arrive.
    """
    if dist.is_initialized():
        try:
            if wait:
                barrier()
        finally:
            dist.destroy_process_group()


def dist_info() -> DistInfo:
    """The current process's rank/world without creating a process group."""
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce when a process group exists; a no-op in a single process."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        if tensor.device.type == "cpu" and dist.get_backend() == "nccl":
            # NCCL reduces device tensors only: round-trip small host tensors (meters, flags) via the GPU
            on_gpu = tensor.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(on_gpu, op=ops[op])
            tensor.copy_(on_gpu.cpu())
        else:
            dist.all_reduce(tensor, op=ops[op])
    return tensor


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


@functools.cache
def _cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmuls run several times faster than fp32. Without them (plain AVX2) torch
    emulates bf16 and a 2048² bf16 matmul is ~50x slower than fp32, so bf16 must not be the CPU default."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return torch.backends.cpu.get_cpu_capability() in ("AMX", "AVX512_BF16")


def fast_bf16(device: torch.device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and _cpu_has_fast_bf16())


def resolve_precision(mode: str, device: torch.device) -> str:
    """'auto' -> 'bf16' where bf16 matmuls are fast (CUDA, AMX/AVX512-BF16 CPUs), else 'off' (fp32)."""
    if mode == "auto":
        return "bf16" if fast_bf16(device) else "off"
    return mode


@contextlib.contextmanager
def autocast(device: torch.device, mode: str = "auto") -> Iterator[None]:
    """bf16 autocast on CUDA and on CPUs with fast bf16; mode 'auto' decides by the hardware."""
    if resolve_precision(mode, device) == "off":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        yield


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest accepted value (HEAP_MAX_SIZE / 2 on 64-bit)
_TRIM_THRESHOLD_BYTES = (1 << 31) - 1  # mallopt takes an int


@functools.cache
def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed blocks up to 32 MiB for reuse instead of unmapping them (Linux only).

    A CPU training step or eval batch allocates and frees the same multi-MB activations every call; by
    default glibc serves many of them with fresh mmaps and returns freed heap tops to the OS, so every step
    page-faults its memory back in (measured gains: docs/presets/cpu-golf-2mb.md).
    The cost is a process RSS that stays at its peak. Returns whether the setting was applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)
        )
    except (OSError, AttributeError):  # not glibc (musl, ...): leave the allocator alone
        return False


def use_compile(mode: str, device: torch.device) -> bool:
    """train.compile: 'auto' compiles on CUDA only (CPU compile costs more warm-up than it saves)."""
    return mode == "on" or (mode == "auto" and device.type == "cuda")
