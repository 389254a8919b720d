"""The whole pipeline in one process: train → quantize → evaluate → summary.json.

`pgolf run` and the bundled `train_gpt.py` both call `run_pipeline`, so a record folder runs the very stage
functions the tests cover. Under torchrun every rank runs every stage; rank 0 writes the files.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pgolf import rundir
from pgolf.config import RunConfig
from pgolf.eval.run_eval import evaluate_run, plan_passes
from pgolf.quant.budget import quant_reserve_seconds
from pgolf.quant.pipeline import OverCapError, quantize_run
from pgolf.runtime import barrier, init_distributed
from pgolf.submit.summary import code_counts, format_summary, run_budgets, write_summary
from pgolf.train.loop import SIGNAL_EXIT, train
from pgolf.train.preflight import check_inputs


class TrainingInterrupted(RuntimeError):
    """Training stopped on SIGINT/SIGTERM (checkpoint written): the pipeline ends there, exit 128 + signal."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def run_pipeline(
    cfg: RunConfig,
    run_dir: str | Path,
    resume: bool = False,
    code_bytes: int | None = None,
    verbose: bool = True,
    fresh: bool = False,
) -> dict[str, Any]:
    """Train, quantize (inside the training budget's reserve), evaluate the preset's plan; returns summary.
    Inputs (data, tokenizer, eval plan) are checked first; RUN_DIR stays locked throughout."""
    run_dir = Path(run_dir)
    check_inputs(cfg, need_eval=True)
    plan_passes(list(cfg.eval.plan))
    dist = init_distributed(cfg.train.device)
    with rundir.RunLock(run_dir, enabled=dist.is_main):
        return _run_stages(cfg, run_dir, resume, fresh, code_bytes, verbose)


def _run_stages(
    cfg: RunConfig, run_dir: Path, resume: bool, fresh: bool, code_bytes: int | None, verbose: bool
) -> dict[str, Any]:
    dist = init_distributed(cfg.train.device)
    reserve = quant_reserve_seconds(cfg, dist.device)
    if verbose and dist.is_main:
        print(
            f"pgolf run {cfg.preset} -> {run_dir} (world {dist.world_size}, quantization reserve {reserve:.1f} s)"
        )
    result = train(cfg, run_dir, resume=resume, quant_reserve_seconds=reserve, fresh=fresh)
    barrier()
    reason = result["stopped_reason"]
    if reason in SIGNAL_EXIT:
        raise TrainingInterrupted(
            f"training interrupted by {reason.upper()} at step {result['steps']}: "
            f"{rundir.path(run_dir, rundir.CHECKPOINT)} saved; not quantized or evaluated; "
            f"continue with `pgolf run ... --resume`",
            SIGNAL_EXIT[reason],
        )
    return quantize_and_evaluate(cfg, run_dir, code_bytes, verbose)


def quantize_and_evaluate(
    cfg: RunConfig, run_dir: Path, code_bytes: int | None = None, verbose: bool = True
) -> dict[str, Any]:
    """The stages after training, on the model.pt in RUN_DIR: quantize, evaluate, summary.json (also what
    `pgolf ablate` runs for a toggle that changes only quantization or eval, on the baseline's weights).
    Over the cap only the unquantized weights are scored and OverCapError is raised after the summary."""
    dist = init_distributed(cfg.train.device)
    if code_bytes is None:
        from pgolf.singlefile import bundle_code_bytes  # not bundled: a bundled run passes its own size

        code_bytes = bundle_code_bytes(cfg)
    over_cap = None
    try:
        quantize_run(run_dir, verbose=verbose, code_bytes=code_bytes)
    except OverCapError as err:
        # No valid artifact: score only the unquantized weights (diagnostic), then report the failure.
        over_cap = err
    barrier()  # rank 0 wrote model.ptz; every rank evaluates it
    evaluate_run(run_dir, modes=["prequant"] if over_cap else None)
    barrier()
    summary = write_summary(run_dir) if dist.is_main else {}
    if verbose and dist.is_main:
        train_budget, eval_budget = run_budgets(run_dir)
        print(format_summary(summary, train_budget, eval_budget, code_counts(run_dir)))
    if over_cap is not None:
        raise over_cap
    return summary


def seed_configs(cfg: RunConfig, seeds: list[int]) -> list[RunConfig]:
    """One config per seed (train.seed set), for `pgolf run --seeds`."""
    out = []
    for seed in seeds:
        c = copy.deepcopy(cfg)
        c.train.seed = seed
        out.append(c)
    return out
