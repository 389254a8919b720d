"""Two gloo processes against one: distributed Muon, DDP training steps, and a 2-rank `train()` run."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from dist_common import end_worker, free_port

from pgolf.config import preset
from pgolf.model import GPT
from pgolf.optim import Muon, build_optimizers
from pgolf.runtime import DistInfo
from pgolf.train import StepEvent, TrainStep, train

pytestmark = [pytest.mark.distributed, pytest.mark.usefixtures("one_thread")]


SHAPES = [(48, 32), (32, 48), (32, 32), (32, 48), (96, 32)]
GLOBAL_SEQS, SEQ_LEN, STEPS = 4, 32, 3


def muon_run(rank: int, world: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Two MuonEq-R steps on fixed params/grads; returns (params, gathered momentum buffers)."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in SHAPES]
    opt = Muon(params, lr=0.05, momentum=0.95, weight_decay=0.1, rank=rank, world_size=world)
    for k in range(2):
        g = torch.Generator().manual_seed(100 + k)
        for p, s in zip(params, SHAPES):
            p.grad = torch.randn(s, generator=g)
        opt.step()
    return [p.detach().clone() for p in params], opt.state_dict()["momentum_buffers"]


def tiny_model_cfg():
    cfg = preset("smoke")
    cfg.model.vocab_size = 256
    return cfg


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    out = []
    for _ in range(STEPS):
        toks = torch.randint(0, 256, (GLOBAL_SEQS, SEQ_LEN + 1), generator=gen)
        out.append((toks[:, :-1], toks[:, 1:]))
    return out


def ddp_steps(rank: int, world: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """STEPS optimizer steps on the fixed global batch: rank r takes its contiguous share of sequences;
    one process takes the whole batch as `world` micro-steps (same global mean gradient)."""
    cfg = tiny_model_cfg()
    torch.manual_seed(0)
    raw = GPT(cfg.model)
    raw.tok_emb.float()
    with torch.no_grad():
        # Non-zero output projections: with identity blocks the skip-gate gradients are pure rounding
        # noise, which AdamW's m/sqrt(v) would blow up to full-size steps in either run.
        for name, p in raw.named_parameters():
            if name.endswith("proj.weight"):
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    dist = DistInfo(rank, world, 0, torch.device("cpu"))
    opts = build_optimizers(raw, cfg.optim, dist)
    model = torch.nn.parallel.DistributedDataParallel(raw, broadcast_buffers=False) if world > 1 else raw
    stepper = TrainStep(model, list(raw.parameters()), dist.device, "off", cfg.optim.grad_clip_norm)
    per = GLOBAL_SEQS // world
    losses = []
    for x, y in global_batches():
        if world > 1:
            micro = [(x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per])]
        else:
            micro = [(x[i * 2 : (i + 1) * 2], y[i * 2 : (i + 1) * 2]) for i in range(GLOBAL_SEQS // 2)]
        loss = stepper.run(micro)
        if world > 1:
            torch.distributed.all_reduce(loss)
            loss /= world
        losses.append(float(loss))
        opts.step()
        opts.zero_grad()
    return losses, {k: v.detach().clone() for k, v in raw.state_dict().items()}


def worker(rank: int, world: int, port: int, out: str, data_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    from pgolf.runtime import init_distributed

    init_distributed("cpu")
    params, bufs = muon_run(rank, world)
    losses, weights = ddp_steps(rank, world)
    torch.save({"params": params, "bufs": bufs, "losses": losses, "weights": weights}, f"{out}/rank{rank}.pt")

    from conftest import tiny_cfg

    cfg = tiny_cfg(Path(data_dir), "train.iterations=3", "data.grad_accum=1")

    def save_live(ev: StepEvent) -> None:
        if ev.step == 3:
            torch.save(ev.model.state_dict(), f"{out}/live{rank}.pt")

    train(cfg, f"{out}/run", on_step=save_live)
    end_worker()


def spawn_two(out: Path, data_dir: Path, timeout_s: float = 240.0) -> None:
    ctx = mp.spawn(worker, args=(2, free_port(), str(out), str(data_dir)), nprocs=2, join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"2-process run did not finish in {timeout_s} s")


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory) -> Path:
    from conftest import write_tiny_shards

    out = tmp_path_factory.mktemp("dist")
    spawn_two(out, write_tiny_shards(out / "data"))
    return out


def test_distributed_muon_equals_single_process(two_rank_results):
    """Round-robin ownership + one SUM all-reduce of the bf16 update buffer: adding zeros is exact and
    batched Newton–Schulz treats each matrix independently, so the update is identical to one process."""
    ref_params, ref_bufs = muon_run(0, 1)
    for rank in (0, 1):
        got = torch.load(two_rank_results / f"rank{rank}.pt", weights_only=True)
        for p, q in zip(got["params"], ref_params):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-7)
        for b, rb in zip(got["bufs"], ref_bufs):  # state_dict gathers every rank's buffers
            torch.testing.assert_close(b, rb, rtol=0, atol=0)


def test_two_process_ddp_steps_match_one_process(two_rank_results):
    """Same global batch: 2 ranks × 2 sequences (DDP mean) vs 1 process × 2 micro-steps of 2 sequences.
    Not bitwise: the gradient sums are ordered differently (all-reduce vs accumulation), so fp32 rounding
    differs at ~1e-7 and Newton–Schulz amplifies it; losses agree to 1e-5, weights to 1e-4."""
    ref_losses, ref_weights = ddp_steps(0, 1)
    r0 = torch.load(two_rank_results / "rank0.pt", weights_only=True)
    r1 = torch.load(two_rank_results / "rank1.pt", weights_only=True)
    assert r0["losses"] == pytest.approx(ref_losses, rel=1e-5) and r0["losses"] == r1["losses"]
    for name, ref in ref_weights.items():
        diff = (r0["weights"][name] - ref).abs().max().item()
        assert diff < 1e-4, (name, diff)
        assert torch.equal(r0["weights"][name], r1["weights"][name]), name  # ranks stay in lockstep


def test_two_rank_train_run(two_rank_results):
    run = two_rank_results / "run"
    summary = json.loads((run / "train.json").read_text())
    assert summary["steps"] == 3 and summary["stopped_reason"] == "iterations"
    log = (run / "train.log").read_text()
    assert "world_size:2 grad_accum:1 micro_batch_seqs:4" in log  # 1024 tokens = 2 ranks × 4 × 128
    live0 = torch.load(two_rank_results / "live0.pt", weights_only=True)
    live1 = torch.load(two_rank_results / "live1.pt", weights_only=True)
    assert all(torch.equal(live0[k], live1[k]) for k in live0)
    per_rank = torch.load(run / "checkpoint.pt", weights_only=False)["per_rank"]
    assert [r["loader"]["rank"] for r in per_rank] == [0, 1]
