"""`evaluate_run(run_dir)`: the eval plan of a run (SPEC §5.1) under the eval time budget, into eval.json.

The modes are those of the registry `pgolf.eval.modes`: prequant (RUN_DIR/model.pt, non-overlapping
windows), quant (the artifact, non-overlapping), sliding (artifact, stride), ttt (artifact, score-first TTT
over sliding windows), ngram (the causal n-gram tilt applied inside the final scoring pass: the TTT pass
when ttt is in the plan, else a sliding pass). One pass that carries a transform measures both modes:
one TTT pass yields `ttt` and `ngram` (ngram's seconds = that pass + the hint precompute).
eval_seconds is the wall time of the whole call: config and data load, artifact decompression, compilation
(the first batch of each compiled function) and every mode; pgolf runs no separate warm-up.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pgolf import rundir
from pgolf.config import RunConfig, load_run_config
from pgolf.config.overrides import ConfigError, apply_sets
from pgolf.data.bytes import BpbResult, ByteTables, build_byte_tables, load_tokenizer
from pgolf.data.val import load_val_stream
from pgolf.eval.modes import MODES, entry_point
from pgolf.eval.score import Budget, EvalBudgetExceeded, EvalTrace, NllTransform, ScoreOptions
from pgolf.rundir import looping_after_training
from pgolf.runtime import DistInfo, init_distributed, use_compile

EVAL_FILE = rundir.EVAL_JSON


def tokenizer_path(cfg: RunConfig) -> Path:
    """data.tokenizer, or DIR/tokenizer.model when it is empty."""
    return Path(cfg.data.tokenizer) if cfg.data.tokenizer else Path(cfg.data.dir) / "tokenizer.model"


def load_eval_data(cfg: RunConfig) -> tuple[torch.Tensor, ByteTables]:
    """The val stream (data.dir, eval.seq_len, data.max_val_tokens) and the byte tables of its tokenizer
    (carrying the stream's byte sidecar when the data has one: CaseOps)."""
    if not cfg.data.dir:
        raise ConfigError("data.dir is empty: set it to the folder holding fineweb_val_*.bin")
    tokens, sidecar = load_val_stream(cfg.data.dir, cfg.eval.seq_len, cfg.data.max_val_tokens)
    if int(tokens.max()) >= cfg.model.vocab_size:
        raise ValueError(
            f"{cfg.data.dir}: val token id {int(tokens.max())} >= model.vocab_size={cfg.model.vocab_size}"
        )
    sp = load_tokenizer(tokenizer_path(cfg), cfg.model.vocab_size)
    return tokens, build_byte_tables(sp, cfg.model.vocab_size, sidecar)


def load_prequant_model(run_dir: Path, cfg: RunConfig, device: torch.device) -> torch.nn.Module:
    """GPT(cfg.model) with RUN_DIR/model.pt (a plain state_dict)."""
    from pgolf.model import GPT

    path = rundir.path(run_dir, rundir.MODEL)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (the 'prequant' mode needs the trained weights)")
    model = GPT(cfg.model)
    model.load_state_dict(rundir.load_weights(path))
    model.set_looping(looping_after_training(run_dir, cfg))
    return model.to(device).eval()


def load_quant_model(run_dir: Path, cfg: RunConfig, device: torch.device) -> torch.nn.Module:
    """The dequantized artifact RUN_DIR/model.ptz."""
    from pgolf.quant.pipeline import load_artifact_model

    path = rundir.path(run_dir, rundir.ARTIFACT)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (the quant/sliding/ttt modes need the artifact)")
    model = load_artifact_model(path, cfg)
    model.set_looping(looping_after_training(run_dir, cfg))
    return model.to(device).eval()


@dataclass
class Pass:
    """One scoring pass and the modes it reports: (plain mode or None, transform mode or None)."""

    kind: str  # the scoring mode that runs
    plain: str | None
    tilted: str | None = None


def plan_passes(plan: list[str]) -> list[Pass]:
    """The passes a plan needs, in registry order; a transform mode rides on the plan's last scoring mode
    that takes a transform, else on its carrier (which then reports only the transform mode)."""
    order = list(MODES)
    bad = [m for m in plan if m not in MODES]
    if bad:
        raise ConfigError(f"unknown eval modes {bad}; expected a subset of {', '.join(order)}")
    passes = {m: Pass(m, m) for m in order if m in plan and MODES[m].score}
    for t in (m for m in order if m in plan and MODES[m].transform):
        takers = [m for m in passes if MODES[m].takes_transform]
        kind = takers[-1] if takers else MODES[t].carrier
        passes.setdefault(kind, Pass(kind, None)).tilted = t
    return sorted(passes.values(), key=lambda p: order.index(p.kind))


@dataclass
class EvalContext:
    run_dir: Path
    cfg: RunConfig
    info: DistInfo
    tokens: torch.Tensor
    tables: ByteTables
    budget: Budget
    trace: EvalTrace | None = None
    models: dict[str, torch.nn.Module] = field(default_factory=dict)

    def model(self, weights: str) -> torch.nn.Module:
        """The model of an EvalMode's `weights` (prequant | quant), loaded once."""
        if weights not in self.models:
            loader = load_prequant_model if weights == "prequant" else load_quant_model
            self.models[weights] = loader(self.run_dir, self.cfg, self.info.device)
        return self.models[weights]


def run_pass(
    ctx: EvalContext, p: Pass, tilt: NllTransform | None = None, tokens: torch.Tensor | None = None
) -> tuple[BpbResult, BpbResult | None]:
    """Score one pass; `tokens` defaults to the context's val stream (the legality checks pass others)."""
    mode = MODES[p.kind]
    opts = ScoreOptions(
        device=ctx.info.device,
        autocast_mode=ctx.cfg.train.autocast,
        nll_transform=tilt,
        trace=ctx.trace,
        budget=ctx.budget,
        compile=use_compile(ctx.cfg.train.compile, ctx.info.device),
    )
    tokens = ctx.tokens if tokens is None else tokens
    return entry_point(mode.score)(ctx.model(mode.weights), tokens, ctx.tables, ctx.cfg.eval, opts)


def build_transform(
    ctx: EvalContext, mode: str, tokens: torch.Tensor | None = None
) -> tuple[NllTransform, float]:
    """The NllTransform of a transform mode for `tokens` (default: the val stream) and its build seconds."""
    tokens = ctx.tokens if tokens is None else tokens
    return entry_point(MODES[mode].transform)(tokens, ctx.cfg.eval, ctx.tables)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _record(results: dict, mode: str, res: BpbResult, seconds: float, main: bool) -> None:
    results[mode] = {"mode": mode, **res.to_dict(), "seconds": round(seconds, 3)}
    if main:
        print(
            f"eval {mode:9s} loss {res.loss:.5f}  bpb {res.bpb:.5f}  tokens {res.tokens:,}  "
            f"bytes {res.bytes:,}  {seconds:.1f} s",
            flush=True,
        )


def evaluate_run(
    run_dir: str | Path,
    modes: list[str] | None = None,
    budget_seconds: float | None = None,
    sets: list[str] | None = None,
) -> dict:
    """Run the eval plan (modes, default cfg.eval.plan) of RUN_DIR and write RUN_DIR/eval.json.

    The budget (budget_seconds, default cfg.eval.time_budget_seconds; <= 0 = none) covers every mode
    together: a warning at 90%, a clean stop at 100% keeping the modes already measured (stopped_early).
    eval.json accumulates: results of modes not rerun are kept while they scored the same model files.
    """
    start = time.monotonic()
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    apply_sets(cfg, sets or [])
    plan = list(modes) if modes else list(cfg.eval.plan)
    passes = plan_passes(plan)
    info = init_distributed(cfg.train.device)
    tokens, tables = load_eval_data(cfg)
    budget_s = cfg.eval.time_budget_seconds if budget_seconds is None else budget_seconds
    ctx = EvalContext(run_dir, cfg, info, tokens, tables, Budget(budget_s, start))
    if info.is_main:
        print(f"eval {run_dir}: plan {plan}, {tokens.numel() - 1:,} targets, world {info.world_size}")

    results: dict[str, dict] = {}
    stopped_early = False
    try:
        for p in passes:
            ctx.budget.check()
            tilt, hint_seconds = None, 0.0
            if p.tilted is not None:
                tilt, hint_seconds = build_transform(ctx, p.tilted)
                if info.is_main:
                    print(f"{p.tilted}: built in {hint_seconds:.1f} s")
            t0 = time.monotonic()
            plain, tilted = run_pass(ctx, p, tilt)
            _sync(info.device)
            seconds = time.monotonic() - t0
            if p.plain is not None:
                _record(results, p.plain, plain, seconds, info.is_main)
            if p.tilted is not None:
                _record(results, p.tilted, tilted, seconds + hint_seconds, info.is_main)
    except EvalBudgetExceeded as err:
        stopped_early = True
        if info.is_main:
            print(f"eval stopped early: {err}; keeping {len(results)} finished mode(s)")

    out = {
        "results": [results[m] for m in plan if m in results],
        "eval_seconds": round(time.monotonic() - start, 3),
        "budget_seconds": budget_s if budget_s and budget_s > 0 else None,
        "stopped_early": stopped_early,
    }
    if info.is_main:
        rundir.write_eval_results(run_dir, out)  # the file keeps earlier modes measured on the same files
        print(f"eval done in {out['eval_seconds']:.1f} s -> {run_dir / EVAL_FILE}")
    return out
