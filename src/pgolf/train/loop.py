"""The training loop (SPEC §3.3–3.4): `train(cfg, run_dir)` -> the train.json dict.

Per iteration: progress frac from the (rank-agreed) training clock → looping switch, LR multiplier and
Muon momentum → micro-steps of forward/backward + grad clip → one tiny all-reduce (MAX) that agrees the
clock, a SIGTERM request and a non-finite loss across ranks → optimizer step (skipped on a non-finite
loss, so the weights stay those of the last good step) → EMA. Validation and checkpointing pause the
clock. At the end: final validation of the live weights, EMA copied in, model.pt written.
"""

from __future__ import annotations

import copy
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pgolf import rundir
from pgolf.config import ConfigError, RunConfig, load_run_config, to_dict, to_toml
from pgolf.data.loader import ShuffledSequenceLoader, sequences_per_microbatch
from pgolf.data.shards import list_shards
from pgolf.fileio import atomic_torch_save, atomic_write_json, atomic_write_text
from pgolf.optim import (
    build_optimizers,
    lr_multiplier,
    muon_momentum,
    train_budget_seconds,
    training_fraction,
)
from pgolf.runtime import (
    DistInfo,
    all_reduce_,
    init_distributed,
    resolve_precision,
    seed_everything,
    use_compile,
)
from pgolf.train.checkpoint import gather_per_rank, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from pgolf.train.ema import EMA
from pgolf.train.log import TrainLogger, format_train_line, format_val_line
from pgolf.train.step import TrainStep
from pgolf.train.validate import build_validator


class TrainingDiverged(RuntimeError):
    """The training loss became NaN/inf; the message says at which step and what was kept."""


@dataclass
class StepEvent:
    """Passed to `on_step` after every optimizer step (progress displays, sweeps, tests)."""

    step: int
    loss: float
    frac: float
    model: nn.Module


class TrainClock:
    """Training seconds (time.perf_counter), excluding pauses for validation and checkpoints."""

    def __init__(self, already: float, device: torch.device) -> None:
        self.base, self.device, self.t0 = already, device, time.perf_counter()
        self.paused = False

    def elapsed(self) -> float:
        return self.base if self.paused else self.base + time.perf_counter() - self.t0

    def pause(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.base, self.paused = self.elapsed(), True

    def resume(self) -> None:
        self.t0, self.paused = time.perf_counter(), False


def grad_accum_steps(cfg: RunConfig, world_size: int) -> int:
    """data.grad_accum, or 8 // world_size as the records (world must divide 8)."""
    if cfg.data.grad_accum > 0:
        return cfg.data.grad_accum
    if 8 % world_size:
        raise ConfigError(
            f"data.grad_accum=0 means 8 // world_size, but world_size={world_size} does not divide 8"
        )
    return 8 // world_size


def _check_resume_config(cfg: RunConfig, run_dir: Path) -> None:
    stored = to_dict(load_run_config(run_dir))
    given = to_dict(cfg)
    diffs = [
        f"{sec}.{key}: {stored[sec][key]!r} in config.toml, {given[sec].get(key)!r} now"
        for sec in stored
        if isinstance(stored[sec], dict)
        for key in stored[sec]
        if stored[sec][key] != given[sec].get(key)
    ]
    if diffs:
        raise ConfigError(
            f"--resume with a different config than {rundir.path(run_dir, rundir.CONFIG)}: " + "; ".join(diffs[:5])
        )


class _SigtermFlag:
    """Sets a flag on SIGTERM (main thread only); the loop checkpoints and exits at the next step."""

    def __init__(self) -> None:
        self.raised = False
        self.previous: Any = None

    def __enter__(self) -> _SigtermFlag:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.raised = True

    def __exit__(self, *exc: Any) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def _wrap_model(raw: nn.Module, cfg: RunConfig, dist: DistInfo) -> nn.Module:
    model: nn.Module = raw
    if use_compile(cfg.train.compile, dist.device):
        if dist.distributed:
            torch._dynamo.config.optimize_ddp = False  # as the records: one graph, DDP hooks outside it
        model = torch.compile(raw, dynamic=False)
    if dist.distributed:
        ids = [dist.device.index] if dist.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
    return model


def train(
    cfg: RunConfig,
    run_dir: str | Path,
    resume: bool = False,
    quant_reserve_seconds: float | None = None,
    on_step: Callable[[StepEvent], None] | None = None,
) -> dict[str, Any]:
    """Train per SPEC §3 into RUN_DIR (config.toml, train.log, checkpoint.pt, model.pt, train.json)."""
    from pgolf.model import GPT

    run_dir = Path(run_dir)
    dist = init_distributed(cfg.train.device)
    device = dist.device
    tc, oc = cfg.train, cfg.optim
    reserve = tc.quant_reserve_seconds if quant_reserve_seconds is None else quant_reserve_seconds
    reserve = max(0.0, reserve)
    budget = train_budget_seconds(tc, reserve)
    if resume:
        _check_resume_config(cfg, run_dir)
    elif dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(rundir.path(run_dir, rundir.CONFIG), to_toml(cfg))
        (rundir.path(run_dir, rundir.TRAIN_LOG)).unlink(missing_ok=True)

    grad_accum = grad_accum_steps(cfg, dist.world_size)
    seq_len = cfg.data.train_seq_len
    micro_seqs = sequences_per_microbatch(cfg.data.train_batch_tokens, seq_len, dist.world_size, grad_accum)
    train_files = list_shards(cfg.data.dir, "train")

    def new_loader() -> ShuffledSequenceLoader:
        return ShuffledSequenceLoader(train_files, seq_len, dist.rank, dist.world_size, cfg.data.shuffle_seed)

    seed_everything(tc.seed)
    raw = GPT(cfg.model).to(device)
    if resolve_precision(tc.autocast, device) == "off":
        raw.tok_emb.float()  # bf16 master embedding only pays with bf16 compute (SPEC §2.7)
    opts = build_optimizers(raw, oc, dist)
    model = _wrap_model(raw, cfg, dist)
    stepper = TrainStep(
        model, [p for p in raw.parameters() if p.requires_grad], device, tc.autocast, oc.grad_clip_norm
    )
    loader = new_loader()

    def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [loader.next_batch(micro_seqs, device) for _ in range(grad_accum)]

    if tc.warmup_steps > 0:
        # Compile warm-up (§3.3): real steps for each graph (plain, then looped), then back to the start.
        snapshot = copy.deepcopy({"model": raw.state_dict(), "optim": opts.state_dict()})
        for looping in [False, True] if cfg.model.num_loops > 0 else [False]:
            raw.set_looping(looping)
            for _ in range(tc.warmup_steps):
                stepper.run(batches())
                opts.step()
                opts.zero_grad()
        raw.set_looping(False)
        raw.load_state_dict(snapshot["model"])
        opts.load_state_dict(snapshot["optim"])
        loader = new_loader()

    ema = EMA(raw, oc.ema_decay, oc.ema_start_frac)
    step, elapsed, looping_at = 0, 0.0, None
    history: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
    if resume:
        ck = load_checkpoint(rundir.path(run_dir, rundir.CHECKPOINT))
        if ck["world_size"] != dist.world_size:
            raise ConfigError(
                f"{rundir.path(run_dir, rundir.CHECKPOINT)} was written by {ck['world_size']} rank(s); resume with the same "
                f"number (now {dist.world_size}): each rank continues its own data stream"
            )
        raw.load_state_dict(ck["model"])
        opts.load_state_dict(ck["optim"])
        ema.load_state_dict(ck["ema"])
        loader.load_state_dict(ck["per_rank"][dist.rank]["loader"])
        set_rng_state(ck["per_rank"][dist.rank]["rng"])
        step, elapsed, looping_at, history = (
            ck["step"],
            ck["elapsed_s"],
            ck["looping_enabled_at_step"],
            ck["history"],
        )
        raw.set_looping(ck["looping"])

    validator, val_note = build_validator(cfg, dist, micro_seqs)
    logger = TrainLogger(rundir.path(run_dir, rundir.TRAIN_LOG), dist.is_main, tc.iterations, step)
    tokens_per_step = cfg.data.train_batch_tokens
    if resume:
        logger.log(f"resumed step:{step} train_time:{elapsed * 1000:.0f}ms")
    else:
        n_params = sum(p.numel() for p in raw.parameters())
        logger.log(
            f"model_params:{n_params} world_size:{dist.world_size} grad_accum:{grad_accum} "
            f"micro_batch_seqs:{micro_seqs} seq_len:{seq_len} tokens_per_step:{tokens_per_step} "
            f"train_budget_s:{budget:.1f} quant_reserve_s:{reserve:.1f} {val_note}"
        )

    def checkpoint_state() -> dict[str, Any]:
        per_rank = gather_per_rank({"loader": loader.state_dict(), "rng": rng_state()}, dist.world_size)
        return {
            "config": to_dict(cfg),
            "world_size": dist.world_size,
            "step": step,
            "elapsed_s": elapsed,
            "looping": raw.looping,
            "looping_enabled_at_step": looping_at,
            "history": history,
            "model": raw.state_dict(),
            "optim": opts.state_dict(),
            "ema": ema.state_dict(),
            "per_rank": per_rank,
        }

    def write_checkpoint() -> None:
        state = checkpoint_state()  # collective: every rank takes part
        if dist.is_main:
            save_checkpoint(rundir.path(run_dir, rundir.CHECKPOINT), state)

    last_val: dict[str, Any] = {"loss": None, "bpb": None}

    def run_validation() -> None:
        if validator is None:
            return
        loss, bpb = validator(raw)
        last_val.update(loss=loss, bpb=bpb)
        history["val"].append({"step": step, "time_s": elapsed, "loss": loss, "bpb": bpb})
        logger.log(format_val_line(step, loss, bpb))

    clock = TrainClock(elapsed, device)
    last_step_s = 0.0
    last_loss = math.nan
    reason = None
    sync = torch.zeros(3, dtype=torch.float64, device=device)
    try:
        with _SigtermFlag() as sigterm:
            while True:
                frac = training_fraction(elapsed, step, tc, reserve)
                if step >= tc.iterations:
                    reason = "iterations"
                elif budget > 0 and (frac >= 1.0 or elapsed + last_step_s > budget):
                    # stop before a step that would end past the budget: the cap is a hard limit on CPU,
                    # where one step can take seconds (the records only stop once the cap is passed)
                    reason = "wallclock"
                elif sigterm.raised:
                    reason = "sigterm"
                if reason:
                    break
                if cfg.model.num_loops > 0 and not raw.looping and frac >= cfg.model.enable_looping_at:
                    raw.set_looping(True)
                    looping_at = step
                    logger.log(f"loop_enabled step:{step} frac:{frac:.4f}")
                opts.set_lr_multiplier(lr_multiplier(frac, oc, step))
                opts.set_muon_momentum(muon_momentum(step, frac, oc))
                loss = stepper.run(batches())
                # Agree across ranks on the clock, a SIGTERM and a non-finite loss (one tiny all-reduce).
                sync[0], sync[1] = clock.elapsed(), float(sigterm.raised)
                sync[2] = (~torch.isfinite(loss)).double()
                all_reduce_(sync, "max")
                flags = sync.tolist()
                last_step_s = flags[0] - elapsed
                elapsed, sigterm.raised = flags[0], flags[1] > 0
                if flags[2] > 0:
                    reason = "nan"
                    break
                opts.step()
                opts.zero_grad()
                step += 1
                ema.update(raw, training_fraction(elapsed, step, tc, reserve))
                last_loss = float(loss)
                logger.advance(last_loss)
                if step % max(1, tc.log_every) == 0 or step == tc.iterations:
                    mean_loss = all_reduce_(loss.detach().clone(), "sum").item() / dist.world_size
                    history["train"].append({"step": step, "time_s": elapsed, "loss": mean_loss})
                    logger.log(
                        format_train_line(
                            step,
                            tc.iterations,
                            mean_loss,
                            elapsed * 1000,
                            step * tokens_per_step / max(elapsed, 1e-9),
                        )
                    )
                if on_step is not None:
                    on_step(StepEvent(step, last_loss, frac, raw))
                do_val = tc.val_every > 0 and step % tc.val_every == 0 and step < tc.iterations
                do_ckpt = tc.checkpoint_every > 0 and step % tc.checkpoint_every == 0
                if do_val or do_ckpt:
                    clock.pause()
                    if do_val:
                        run_validation()
                    if do_ckpt:
                        write_checkpoint()
                    clock.resume()
            clock.pause()
            elapsed = clock.elapsed() if reason != "nan" else elapsed
            if reason == "nan":
                return _diverged(run_dir, dist, logger, step, elapsed, looping_at, history, last_val)
            logger.log(f"stopped reason:{reason} step:{step} train_time:{elapsed * 1000:.0f}ms")
            if reason == "sigterm":
                write_checkpoint()
            else:
                run_validation()
                write_checkpoint()
                ema.copy_to(raw)
                if dist.is_main:
                    atomic_torch_save(rundir.path(run_dir, rundir.MODEL), raw.state_dict())
        summary = {
            "steps": step,
            "train_seconds": elapsed,
            "tokens_per_second": step * tokens_per_step / elapsed if elapsed > 0 else 0.0,
            "final_train_loss": None if math.isnan(last_loss) else last_loss,
            "val_loss": last_val["loss"],
            "val_bpb": last_val["bpb"],
            "looping_enabled_at_step": looping_at,
            "stopped_reason": reason,
            "history": history,
        }
        if dist.is_main:
            atomic_write_json(rundir.path(run_dir, rundir.TRAIN_JSON), summary)
        return summary
    finally:
        logger.close()


def _diverged(
    run_dir: Path,
    dist: DistInfo,
    logger: TrainLogger,
    step: int,
    elapsed: float,
    looping_at: int | None,
    history: dict[str, Any],
    last_val: dict[str, Any],
) -> dict[str, Any]:
    ck = rundir.path(run_dir, rundir.CHECKPOINT)
    kept = f"last good checkpoint {ck} left untouched" if ck.is_file() else "no checkpoint was written"
    message = (
        f"non-finite train loss at step {step + 1}: training stopped before that optimizer step "
        f"(weights of step {step} kept; {kept})"
    )
    logger.log(f"stopped reason:nan step:{step} {message}")
    if dist.is_main:
        atomic_write_json(
            rundir.path(run_dir, rundir.TRAIN_JSON),
            {
                "steps": step,
                "train_seconds": elapsed,
                "tokens_per_second": None,
                "final_train_loss": None,
                "val_loss": last_val["loss"],
                "val_bpb": last_val["bpb"],
                "looping_enabled_at_step": looping_at,
                "stopped_reason": "nan",
                "history": history,
            },
        )
    raise TrainingDiverged(message)
