"""The whole pipeline in one process: train → quantize → evaluate → summary.json.

`pgolf run` and the bundled `train_gpt.py` both call `run_pipeline`, so a record folder runs the very stage
functions the tests cover. Under torchrun every rank runs every stage; rank 0 writes the files.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pgolf.config import RunConfig
from pgolf.eval.run_eval import evaluate_run
from pgolf.quant.budget import quant_reserve_seconds
from pgolf.quant.pipeline import OverCapError, quantize_run
from pgolf.runtime import barrier, init_distributed
from pgolf.submit.summary import format_summary, run_budgets, write_summary
from pgolf.train.loop import train


def run_pipeline(
    cfg: RunConfig,
    run_dir: str | Path,
    resume: bool = False,
    code_bytes: int | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Train, quantize (inside the training budget's reserve), evaluate the preset's plan; returns summary."""
    run_dir = Path(run_dir)
    dist = init_distributed(cfg.train.device)
    reserve = quant_reserve_seconds(cfg, dist.device)
    if verbose and dist.is_main:
        print(
            f"pgolf run {cfg.preset} -> {run_dir} (world {dist.world_size}, quantization reserve {reserve:.1f} s)"
        )
    train(cfg, run_dir, resume=resume, quant_reserve_seconds=reserve)
    barrier()
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
        print(format_summary(summary, train_budget, eval_budget))
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
