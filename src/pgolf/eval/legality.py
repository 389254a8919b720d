"""Behavioural legality checks of the eval modes (issue #1017 conditions, SPEC §5.4).

Each check runs an eval mode as a black box on a token stream and reads what it did from an EvalTrace
(positions scored with their NLL, positions each parameter update read, the predictive distribution at
probe positions):
  C1 causality      perturbing the tokens at positions >= t changes neither the score of any target < t nor
                    the distribution predicted for position t (so it cannot depend on x_t itself either);
  C2 normalisation  the (tilted) predictive distribution sums to 1 at the probe positions;
  C3 score first    every token an update reads was scored before the update (position 0, the stream's
                    first context token, is never a target);
  C4 single pass    every target is scored exactly once.
A mode is a `ModeRunner(tokens, trace)`; the tests inject deliberately illegal runners to show each check
fails on its violation.
A mode that consumes the stream in its own order (lora_ttt: documents batched by length, a schedule read
from the document segmentation alone) states C1 in that order: its `pass_order` lists the target positions
in the order it scores them, "before t" means earlier in that order, and the perturbation keeps the
segmentation (BOS tokens stay, no new BOS appears) so that the schedule is the same in both runs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from pgolf.eval.score import EvalTrace
from pgolf.model.layers import BOS_ID

ModeRunner = Callable[[torch.Tensor, EvalTrace], None]
CHECKS = ("C1", "C2", "C3", "C4")
CHECK_NAMES = {
    "C1": "causal: perturbing tokens >= t leaves scores < t and p_t unchanged",
    "C2": "p_t sums to 1 at probe positions",
    "C3": "no update reads a token before it is scored",
    "C4": "every target scored exactly once",
}


@dataclass
class CheckResult:
    mode: str
    check: str
    passed: bool
    detail: str


def traced_run(run_mode: ModeRunner, tokens: torch.Tensor, probes: list[int]) -> EvalTrace:
    trace = EvalTrace(probe_positions=frozenset(int(p) for p in probes))
    run_mode(tokens, trace)
    return trace


def first_scores(trace: EvalTrace) -> dict[int, float]:
    return {p: v[0] for p, v in trace.scores.items()}


def check_single_pass(trace: EvalTrace, num_tokens: int) -> tuple[bool, str]:
    """C4: positions 1..num_tokens-1 each scored exactly once, nothing else scored."""
    counts = np.zeros(num_tokens, np.int64)
    outside = 0
    for event in trace.events:
        if event[0] == "score":
            pos = event[1]
            inside = (pos >= 1) & (pos < num_tokens)
            outside += int((~inside).sum())
            np.add.at(counts, pos[inside], 1)
    counts = counts[1:]
    missing, repeated = int((counts == 0).sum()), int((counts > 1).sum())
    ok = missing == 0 and repeated == 0 and outside == 0
    return (
        ok,
        f"{num_tokens - 1} targets: {missing} unscored, {repeated} scored more than once, {outside} out of range",
    )


def check_score_before_update(trace: EvalTrace) -> tuple[bool, str]:
    """C3: at every ("train", lo, hi) event, positions [max(lo, 1), hi) have all been scored already."""
    scored: set[int] = set()
    updates, bad = 0, []
    for event in trace.events:
        if event[0] == "score":
            scored.update(event[1].tolist())
        else:
            updates += 1
            _, lo, hi = event
            unscored = [p for p in range(max(lo, 1), hi) if p not in scored]
            if unscored:
                bad.append(
                    f"update {updates} read [{lo},{hi}) with {len(unscored)} unscored (first {unscored[0]})"
                )
    if updates == 0:
        return True, "no parameter updates"
    return not bad, (bad[0] if bad else f"{updates} updates, each on scored tokens only")


def check_normalization(trace: EvalTrace, atol: float = 1e-4) -> tuple[bool, str]:
    """C2: Σ_v q_t(v) = 1 at every probe position the pass reported."""
    if not trace.probes:
        return False, "no probe position was reported by the pass"
    worst_pos, worst = -1, 0.0
    for p, logq in trace.probes.items():
        err = abs(float(torch.logsumexp(logq, 0).exp()) - 1.0)
        if err > worst:
            worst_pos, worst = p, err
    ok = worst <= atol
    return ok, f"{len(trace.probes)} probes, max |Σq − 1| = {worst:.2e}" + (
        "" if ok else f" at position {worst_pos}"
    )


def perturb_from(tokens: torch.Tensor, t: int, vocab_size: int, seed: int) -> torch.Tensor:
    """Copy of tokens with every token at position >= t replaced by a different random id."""
    gen = torch.Generator().manual_seed(seed)
    out = tokens.clone()
    n = tokens.numel() - t
    shift = torch.randint(1, vocab_size, (n,), generator=gen)
    out[t:] = (tokens[t:] + shift) % vocab_size
    return out


def perturb_keeping_documents(tokens: torch.Tensor, positions: np.ndarray, vocab_size: int, seed: int
                              ) -> torch.Tensor:  # fmt: skip
    """Copy of tokens with every non-BOS token at `positions` replaced by a different non-BOS id."""
    gen = torch.Generator().manual_seed(seed)
    out = tokens.clone()
    pos = torch.from_numpy(np.asarray(positions, np.int64))
    pos = pos[tokens[pos] != BOS_ID]
    # a random id among the vocab_size - 2 that are neither the old token nor BOS
    new = torch.randint(0, vocab_size - 2, (pos.numel(),), generator=gen)
    lo, hi = torch.minimum(tokens[pos], torch.tensor(BOS_ID)), torch.maximum(tokens[pos], torch.tensor(BOS_ID))
    new = new + (new >= lo).long()
    out[pos] = new + (new >= hi).long()
    return out


def check_causality(
    run_mode: ModeRunner,
    tokens: torch.Tensor,
    base: EvalTrace,
    positions: list[int],
    vocab_size: int,
    seed: int = 0,
    atol: float = 1e-5,
    order: np.ndarray | None = None,
) -> tuple[bool, str]:
    """C1 at each t in `positions`: re-run on tokens perturbed from t on (in `order` when the mode has
    one, see the module doc); compare with the base run."""
    base_scores = first_scores(base)
    for i, t in enumerate(positions):
        if order is None:
            earlier = range(1, t)
            perturbed = perturb_from(tokens, t, vocab_size, seed + i)
        else:
            at = int(np.flatnonzero(order == t)[0])
            earlier = order[:at].tolist()
            perturbed = perturb_keeping_documents(tokens, order[at:], vocab_size, seed + i)
        trace = traced_run(run_mode, perturbed, [t])
        scores = first_scores(trace)
        changed = [
            p for p in earlier if not abs(scores.get(p, np.inf) - base_scores.get(p, -np.inf)) <= atol
        ]
        if changed:
            return (
                False,
                f"perturbing from t={t} changed the score at {len(changed)} earlier positions (first {changed[0]})",
            )
        if t in base.probes and t in trace.probes:
            diff = float((base.probes[t] - trace.probes[t]).abs().max())
            if not diff <= atol:
                return (
                    False,
                    f"perturbing from t={t} changed the distribution predicted at t (max |Δlog q| {diff:.2e})",
                )
        elif t in base.probes or t in trace.probes:
            return False, f"position {t} was probed in only one of the two runs"
    return True, f"{len(positions)} perturbations (t = {', '.join(map(str, positions))})"


def pick_positions(tokens: torch.Tensor, candidates: np.ndarray | None, count: int, seed: int,
                   order: np.ndarray | None = None) -> list[int]:  # fmt: skip
    """`count` positions in the second half of the stream (of `order`, when given), preferring `candidates`
    (e.g. hinted positions)."""
    n = tokens.numel()
    rng = np.random.default_rng(seed)
    pool = np.arange(n // 2, n) if order is None else order[order.size // 2 :]
    if candidates is not None:
        hinted = np.asarray(candidates)
        hinted = hinted[(hinted >= n // 2) & (hinted < n)]
        if hinted.size:
            pool = hinted
    return sorted(int(p) for p in rng.choice(pool, size=min(count, pool.size), replace=False))


def run_checks(
    mode: str,
    run_mode: ModeRunner,
    tokens: torch.Tensor,
    vocab_size: int,
    *,
    candidates: np.ndarray | None = None,
    num_perturbations: int = 2,
    num_probes: int = 16,
    seed: int = 0,
    order: np.ndarray | None = None,
) -> list[CheckResult]:
    """C1-C4 for one mode: one traced base run with probes, then one run per perturbation. `order`: the
    mode's pass order of the target positions (None: the stream's)."""
    probes = pick_positions(tokens, candidates, num_probes, seed, order)
    base = traced_run(run_mode, tokens, probes)
    out = []
    c1 = check_causality(run_mode, tokens, base, probes[:num_perturbations], vocab_size, seed, order=order)
    for name, (ok, detail) in zip(
        CHECKS,
        (
            c1,
            check_normalization(base),
            check_score_before_update(base),
            check_single_pass(base, tokens.numel()),
        ),
    ):
        out.append(CheckResult(mode, name, ok, detail))
    return out


def format_table(results: list[CheckResult]) -> str:
    lines = [f"{'mode':9s} {'check':5s} {'result':6s} detail"]
    for r in results:
        lines.append(f"{r.mode:9s} {r.check:5s} {'pass' if r.passed else 'FAIL':6s} {r.detail}")
    lines.append("")
    lines += [f"{c}: {CHECK_NAMES[c]}" for c in CHECKS]
    return "\n".join(lines)


def check_stream(tokens: torch.Tensor, seq_len: int, windows: int = 4) -> torch.Tensor:
    """A short check stream: the first (windows/2)·seq_len val tokens twice over (+1), so that high-order
    n-gram contexts recur and the tilt is exercised; the checks hold for any stream."""
    half = max(1, windows // 2) * seq_len
    head = tokens[: min(half, tokens.numel() - 1)]
    return torch.cat([head, head, tokens[:1]])


def check_run(run_dir, sets: list[str] | None = None, seq_windows: int = 4) -> list[CheckResult]:
    """Checks every mode of RUN_DIR's eval plan on a short check stream; prints the table."""
    from pathlib import Path

    from pgolf.config import load_run_config
    from pgolf.config.overrides import apply_sets
    from pgolf.eval.modes import MODES, entry_point
    from pgolf.eval.run_eval import EvalContext, build_transform, load_eval_data, plan_passes, run_pass
    from pgolf.eval.score import Budget
    from pgolf.runtime import dist_info

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    apply_sets(cfg, sets or [])
    val, tables = load_eval_data(cfg)
    tokens = check_stream(val, cfg.eval.seq_len, seq_windows)
    check_cfg = copy.deepcopy(cfg)
    e = check_cfg.eval
    # Several TTT chunks inside the short stream (a multiple of the stride), and small hint tables:
    # neither changes what is being checked.
    e.ttt_chunk_tokens = max(e.stride, (tokens.numel() // 4) // e.stride * e.stride)
    e.ngram_table_bits = min(e.ngram_table_bits, 18)
    e.ngram_expert_table_bits = min(e.ngram_expert_table_bits, 18)
    # lora_ttt: several batches and all its global phases, each of several SGD chunks, in the short stream
    num_docs = int((tokens[:-1] == BOS_ID).sum()) + 1
    e.lora_ttt_batch_docs = max(1, min(e.lora_ttt_batch_docs, num_docs // 4))
    e.phased_prefix_docs, e.phased_prefix_frac = num_docs, 0.5
    e.phased_chunk_tokens = max(e.lora_ttt_chunk, tokens.numel() // 8)
    check_cfg.train.compile = "off"
    print(
        f"check {run_dir}: {tokens.numel():,}-token check stream, TTT chunks of {e.ttt_chunk_tokens} tokens"
    )
    ctx = EvalContext(run_dir, check_cfg, dist_info(), tokens, tables, Budget(None))
    results: list[CheckResult] = []
    for p in plan_passes(list(cfg.eval.plan)):
        for mode, tilted in ((p.plain, False), (p.tilted, True)):
            if mode is None:
                continue

            def runner(toks: torch.Tensor, trace: EvalTrace, p=p, tilted=tilted) -> None:
                tilt = build_transform(ctx, p.tilted, toks)[0] if tilted else None
                ctx.trace = trace
                run_pass(ctx, p, tilt, tokens=toks)

            # probe where the transform acts (an n-gram tilt's hinted positions)
            hints = getattr(build_transform(ctx, mode)[0], "hints", None) if tilted else None
            cands = np.nonzero(np.asarray(hints) >= 0)[0] if hints is not None else None
            spec = MODES[mode]
            order = entry_point(spec.pass_order)(tokens, e) if spec.pass_order else None
            results += run_checks(mode, runner, tokens, cfg.model.vocab_size, candidates=cands, order=order)
    print(format_table(results))
    return results
