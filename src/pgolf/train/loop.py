"""The training loop (SPEC §3.3–3.4): `train(cfg, run_dir)` -> the train.json dict, run by a `Trainer`.

Per iteration: progress frac from the (rank-agreed) training clock → looping switch, LR multiplier and
Muon momentum → micro-steps of forward/backward + grad clip → one tiny all-reduce (MAX) that agrees the
clock, a SIGTERM/SIGINT request and a non-finite loss across ranks → optimizer step (skipped on a
non-finite loss) → EMA → log, validation, checkpoint. Validation pauses the clock; checkpoints do not
(their time is training time, as it is on the challenge's wallclock). At the end: final validation of the
live weights, model.pt (EMA weights) written, then the final checkpoint, then train.json (once).
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
from pgolf.train.preflight import check_inputs
from pgolf.train.step import TrainStep
from pgolf.train.validate import build_validator

# Exit status of an interrupted run, as a shell reports a process ended by that signal (128 + signum).
SIGNAL_EXIT = {"sigint": 128 + signal.SIGINT, "sigterm": 128 + signal.SIGTERM}


class TrainingDiverged(RuntimeError):
    """The training loss became NaN/inf; the message says at which step and what is on disk."""


@dataclass
class StepEvent:
    """Passed to `on_step` after every optimizer step (progress displays, sweeps, tests)."""

    step: int
    loss: float
    frac: float
    model: nn.Module


class TrainClock:
    """Training seconds (time.perf_counter), excluding pauses for validation."""

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
            f"--resume with a different config than {rundir.path(run_dir, rundir.CONFIG)}: "
            + "; ".join(diffs[:5])
        )


def _check_start(run_dir: Path, resume: bool, fresh: bool) -> None:
    """A checkpoint is never discarded silently: without --resume it is an error naming both choices."""
    ck = rundir.path(run_dir, rundir.CHECKPOINT)
    if resume and fresh:
        raise ConfigError("--resume and --fresh exclude each other")
    if not resume and not fresh and ck.is_file():
        raise ConfigError(
            f"{ck} exists: pass --resume to continue that training, or --fresh to discard it and start over"
        )


class _StopSignals:
    """SIGTERM and SIGINT (Ctrl-C) set `raised` (main thread only); the loop checkpoints and stops at the
    next step. A second signal of either kind while stopping falls back to the previous handler."""

    SIGNALS = {signal.SIGTERM: "sigterm", signal.SIGINT: "sigint"}

    def __init__(self) -> None:
        self.raised: str | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.raised is not None:
            self.__exit__()
            signal.raise_signal(signum)
            return
        self.raised = self.SIGNALS[signal.Signals(signum)]

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}


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


class Trainer:
    """One training run into RUN_DIR: build (model, optimizers, data, EMA; restored from the checkpoint on
    resume), then `run()`: `step()` until a stop reason, `evaluate()` and `checkpoint()` on their schedules,
    `finish()` writing model.pt, the last checkpoint and train.json."""

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: str | Path,
        resume: bool = False,
        quant_reserve_seconds: float | None = None,
        on_step: Callable[[StepEvent], None] | None = None,
    ) -> None:
        from pgolf.model import GPT

        self.cfg, self.run_dir, self.resume, self.on_step = cfg, Path(run_dir), resume, on_step
        self.dist = dist = init_distributed(cfg.train.device)
        tc, oc = cfg.train, cfg.optim
        reserve = tc.quant_reserve_seconds if quant_reserve_seconds is None else quant_reserve_seconds
        self.reserve = max(0.0, reserve)
        self.budget = train_budget_seconds(tc, self.reserve)
        self.grad_accum = grad_accum_steps(cfg, dist.world_size)
        self.micro_seqs = sequences_per_microbatch(
            cfg.data.train_batch_tokens, cfg.data.train_seq_len, dist.world_size, self.grad_accum
        )
        self.train_files = list_shards(cfg.data.dir, "train")

        seed_everything(tc.seed)
        self.raw = raw = GPT(cfg.model).to(dist.device)
        if resolve_precision(tc.autocast, dist.device) == "off":
            raw.tok_emb.float()  # bf16 master embedding only pays with bf16 compute (SPEC §2.7)
        self.opts = build_optimizers(raw, oc, dist)
        self.model = _wrap_model(raw, cfg, dist)
        params = [p for p in raw.parameters() if p.requires_grad]
        self.stepper = TrainStep(self.model, params, dist.device, tc.autocast, oc.grad_clip_norm)
        self.loader = self.new_loader()
        if tc.warmup_steps > 0:
            self.warmup()
        self.ema = EMA(raw, oc.ema_decay, oc.ema_start_frac)

        self.step_count, self.elapsed, self.looping_at = 0, 0.0, None
        self.history: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
        self.checkpoint_at: tuple[int, float] | None = None  # (step, elapsed) of the last checkpoint
        if resume:
            self.restore()
        self.last_val: dict[str, Any] = {"loss": None, "bpb": None}
        self.last_loss = math.nan
        self.validator, self.val_note = build_validator(cfg, dist, self.micro_seqs)
        self.logger = TrainLogger(
            rundir.path(self.run_dir, rundir.TRAIN_LOG), dist.is_main, tc.iterations, self.step_count
        )

    # ------------------------------------------------------------------------------ setup
    def new_loader(self) -> ShuffledSequenceLoader:
        d, dist = self.cfg.data, self.dist
        return ShuffledSequenceLoader(
            self.train_files, d.train_seq_len, dist.rank, dist.world_size, d.shuffle_seed
        )

    def batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self.loader.next_batch(self.micro_seqs, self.dist.device) for _ in range(self.grad_accum)]

    def warmup(self) -> None:
        """Compile warm-up (§3.3): real steps for each graph (plain, then looped), then back to the start."""
        raw, opts = self.raw, self.opts
        snapshot = copy.deepcopy({"model": raw.state_dict(), "optim": opts.state_dict()})
        for looping in [False, True] if self.cfg.model.num_loops > 0 else [False]:
            raw.set_looping(looping)
            for _ in range(self.cfg.train.warmup_steps):
                self.stepper.run(self.batches())
                opts.step()
                opts.zero_grad()
        raw.set_looping(False)
        raw.load_state_dict(snapshot["model"])
        opts.load_state_dict(snapshot["optim"])
        self.loader = self.new_loader()

    def restore(self) -> None:
        path = rundir.path(self.run_dir, rundir.CHECKPOINT)
        ck = load_checkpoint(path)
        if ck["world_size"] != self.dist.world_size:
            raise ConfigError(
                f"{path} was written by {ck['world_size']} rank(s); resume with the same "
                f"number (now {self.dist.world_size}): each rank continues its own data stream"
            )
        self.raw.load_state_dict(ck["model"])
        self.opts.load_state_dict(ck["optim"])
        self.ema.load_state_dict(ck["ema"])
        self.loader.load_state_dict(ck["per_rank"][self.dist.rank]["loader"])
        set_rng_state(ck["per_rank"][self.dist.rank]["rng"])
        self.step_count, self.elapsed = ck["step"], ck["elapsed_s"]
        self.looping_at, self.history = ck["looping_enabled_at_step"], ck["history"]
        self.checkpoint_at = (self.step_count, self.elapsed)
        self.raw.set_looping(ck["looping"])

    # ------------------------------------------------------------------------------ the loop
    def run(self) -> dict[str, Any]:
        tc, oc, raw, logger = self.cfg.train, self.cfg.optim, self.raw, self.logger
        self.log_start()
        clock = TrainClock(self.elapsed, self.dist.device)
        last_step_s = 0.0
        reason = None
        sync = torch.zeros(3, dtype=torch.float64, device=self.dist.device)
        with _StopSignals() as signals:
            while True:
                frac = training_fraction(self.elapsed, self.step_count, tc, self.reserve)
                if self.step_count >= tc.iterations:
                    reason = "iterations"
                elif self.budget > 0 and (frac >= 1.0 or self.elapsed + last_step_s > self.budget):
                    # stop before a step that would end past the budget: the cap is a hard limit on CPU,
                    # where one step can take seconds (the records only stop once the cap is passed)
                    reason = "wallclock"
                elif signals.raised:
                    reason = signals.raised
                if reason:
                    break
                if (
                    self.cfg.model.num_loops > 0
                    and not raw.looping
                    and frac >= self.cfg.model.enable_looping_at
                ):
                    raw.set_looping(True)
                    self.looping_at = self.step_count
                    logger.log(f"loop_enabled step:{self.step_count} frac:{frac:.4f}")
                self.opts.set_lr_multiplier(lr_multiplier(frac, oc, self.step_count))
                self.opts.set_muon_momentum(muon_momentum(self.step_count, frac, oc))
                loss = self.stepper.run(self.batches())
                # Agree across ranks on the clock, a stop signal and a non-finite loss (one tiny all-reduce).
                sync[0] = clock.elapsed()
                sync[1] = {None: 0, "sigint": signal.SIGINT, "sigterm": signal.SIGTERM}[signals.raised]
                sync[2] = (~torch.isfinite(loss)).double()
                all_reduce_(sync, "max")
                agreed_s, signum, nonfinite = sync.tolist()
                last_step_s, self.elapsed = agreed_s - self.elapsed, agreed_s
                signals.raised = _StopSignals.SIGNALS.get(int(signum)) if signum else None
                if nonfinite > 0:
                    reason = "nan"
                    break
                self.step(loss, frac)
                if self.validation_due():
                    clock.pause()
                    self.evaluate()
                    clock.resume()
                if self.checkpoint_due():
                    self.checkpoint()
                    logger.log(f"checkpoint step:{self.step_count} train_time:{self.elapsed * 1000:.0f}ms")
            clock.pause()
            if reason != "nan":
                self.elapsed = clock.elapsed()
            return self.finish(reason)

    def step(self, loss: torch.Tensor, frac: float) -> None:
        """The optimizer step for the gradients of `loss`, the EMA, the log line and the on_step hook."""
        tc = self.cfg.train
        self.opts.step()
        self.opts.zero_grad()
        self.step_count += 1
        step = self.step_count
        self.ema.update(self.raw, training_fraction(self.elapsed, step, tc, self.reserve))
        self.last_loss = float(loss)
        self.logger.advance(self.last_loss)
        if step % max(1, tc.log_every) == 0 or step == tc.iterations:
            mean_loss = all_reduce_(loss.detach().clone(), "sum").item() / self.dist.world_size
            self.history["train"].append({"step": step, "time_s": self.elapsed, "loss": mean_loss})
            tok_s = step * self.cfg.data.train_batch_tokens / max(self.elapsed, 1e-9)
            self.logger.log(format_train_line(step, tc.iterations, mean_loss, self.elapsed * 1000, tok_s))
        if self.on_step is not None:
            self.on_step(StepEvent(step, self.last_loss, frac, self.raw))

    def validation_due(self) -> bool:
        tc = self.cfg.train
        return tc.val_every > 0 and self.step_count % tc.val_every == 0 and self.step_count < tc.iterations

    def checkpoint_due(self) -> bool:
        """Every train.checkpoint_every steps and every train.checkpoint_seconds of training time (the
        rank-agreed clock, so every rank decides alike)."""
        tc = self.cfg.train
        if tc.checkpoint_every > 0 and self.step_count % tc.checkpoint_every == 0:
            return True
        since = self.elapsed - (self.checkpoint_at[1] if self.checkpoint_at else 0.0)
        return tc.checkpoint_seconds > 0 and since >= tc.checkpoint_seconds

    def evaluate(self) -> None:
        if self.validator is None:
            return
        loss, bpb = self.validator(self.raw)
        self.last_val.update(loss=loss, bpb=bpb)
        self.history["val"].append(
            {"step": self.step_count, "time_s": self.elapsed, "loss": loss, "bpb": bpb}
        )
        self.logger.log(format_val_line(self.step_count, loss, bpb))

    def checkpoint(self) -> None:
        """Write the resumable state (a collective: every rank takes part; rank 0 writes atomically)."""
        per_rank = gather_per_rank(
            {"loader": self.loader.state_dict(), "rng": rng_state()}, self.dist.world_size
        )
        state = {
            "config": to_dict(self.cfg),
            "world_size": self.dist.world_size,
            "step": self.step_count,
            "elapsed_s": self.elapsed,
            "looping": self.raw.looping,
            "looping_enabled_at_step": self.looping_at,
            "history": self.history,
            "model": self.raw.state_dict(),
            "optim": self.opts.state_dict(),
            "ema": self.ema.state_dict(),
            "per_rank": per_rank,
        }
        if self.dist.is_main:
            save_checkpoint(rundir.path(self.run_dir, rundir.CHECKPOINT), state)
        self.checkpoint_at = (self.step_count, self.elapsed)

    # ------------------------------------------------------------------------------ the ends
    def log_start(self) -> None:
        if self.resume:
            self.logger.log(f"resumed step:{self.step_count} train_time:{self.elapsed * 1000:.0f}ms")
            return
        d = self.cfg.data
        self.logger.log(
            f"model_params:{sum(p.numel() for p in self.raw.parameters())} world_size:{self.dist.world_size} "
            f"grad_accum:{self.grad_accum} micro_batch_seqs:{self.micro_seqs} seq_len:{d.train_seq_len} "
            f"tokens_per_step:{d.train_batch_tokens} train_budget_s:{self.budget:.1f} "
            f"quant_reserve_s:{self.reserve:.1f} {self.val_note}"
        )

    def finish(self, reason: str) -> dict[str, Any]:
        """Stop for `reason`: model.pt before the checkpoint it comes from is replaced (nothing is lost when
        a write fails), then train.json once. A signal keeps the checkpoint only; a non-finite loss writes
        neither and raises TrainingDiverged."""
        ck = rundir.path(self.run_dir, rundir.CHECKPOINT)
        if reason == "nan":
            kept = (
                f"the last checkpoint {ck} (step {self.checkpoint_at[0]}) is left untouched"
                if self.checkpoint_at
                else "no checkpoint was written"
            )
            message = (
                f"non-finite train loss at step {self.step_count + 1}: training stopped before that optimizer "
                f"step; no model.pt written; {kept}"
            )
            self.logger.log(f"stopped reason:nan step:{self.step_count} {message}")
            self.write_summary(reason)
            raise TrainingDiverged(message)
        self.logger.log(
            f"stopped reason:{reason} step:{self.step_count} train_time:{self.elapsed * 1000:.0f}ms"
        )
        if reason not in SIGNAL_EXIT:
            self.evaluate()
            if self.dist.is_main:
                atomic_torch_save(rundir.path(self.run_dir, rundir.MODEL), self.ema.averaged_state(self.raw))
        self.checkpoint()
        if reason in SIGNAL_EXIT:
            self.logger.log(f"interrupted by {reason.upper()}: checkpoint {ck} at step {self.step_count}")
        return self.write_summary(reason)

    def write_summary(self, reason: str) -> dict[str, Any]:
        elapsed, nan = self.elapsed, reason == "nan"
        summary = {
            "steps": self.step_count,
            "train_seconds": elapsed,
            "tokens_per_second": None
            if nan
            else (self.step_count * self.cfg.data.train_batch_tokens / elapsed if elapsed > 0 else 0.0),
            "final_train_loss": None if nan or math.isnan(self.last_loss) else self.last_loss,
            "val_loss": self.last_val["loss"],
            "val_bpb": self.last_val["bpb"],
            "looping_enabled_at_step": self.looping_at,
            "stopped_reason": reason,
            "history": self.history,
        }
        if self.dist.is_main:
            atomic_write_json(rundir.path(self.run_dir, rundir.TRAIN_JSON), summary)
            rundir.record_stage(self.run_dir, "train", to_toml(self.cfg), [])
        return summary

    def close(self) -> None:
        self.logger.close()


def train(
    cfg: RunConfig,
    run_dir: str | Path,
    resume: bool = False,
    quant_reserve_seconds: float | None = None,
    on_step: Callable[[StepEvent], None] | None = None,
    fresh: bool = False,
) -> dict[str, Any]:
    """Train per SPEC §3 into RUN_DIR (config.toml, train.log, checkpoint.pt, model.pt, train.json).

    Inputs are checked before anything is written; RUN_DIR is locked for the run; an existing checkpoint
    needs `resume` (continue it) or `fresh` (discard it); earlier outputs of every stage are removed."""
    run_dir = Path(run_dir)
    check_inputs(cfg, need_eval=False)
    _check_start(run_dir, resume, fresh)
    dist = init_distributed(cfg.train.device)
    with rundir.RunLock(run_dir, enabled=dist.is_main):
        if resume:
            _check_resume_config(cfg, run_dir)
        elif dist.is_main:
            rundir.invalidate_from(run_dir, "train")
            rundir.path(run_dir, rundir.CHECKPOINT).unlink(missing_ok=True)
            rundir.path(run_dir, rundir.TRAIN_LOG).unlink(missing_ok=True)
            atomic_write_text(rundir.path(run_dir, rundir.CONFIG), to_toml(cfg))
        trainer = Trainer(cfg, run_dir, resume, quant_reserve_seconds, on_step)
        if resume and dist.is_main:
            rundir.invalidate_from(
                run_dir, "train"
            )  # only once the checkpoint has loaded: a failed resume keeps all
        try:
            return trainer.run()
        finally:
            trainer.close()
