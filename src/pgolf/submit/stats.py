"""Seed statistics and the challenge's record test (SPEC §0): a new record must beat the SOTA by at least
0.005 nats per token with p < 0.01, typically over 3 seeds.

The test is one-sided on the improvement d = baseline nats − run nats (per token):
H0: E[d] <= threshold, H1: E[d] > threshold.

* Against a bpb number B (the SOTA's published val_bpb): each run's score is converted to the baseline's
  nats with the run's own nats-per-bpb ratio r = val_loss / val_bpb (= ln 2 · bytes/token of the val set,
  identical for every run of one tokenizer; for SP8192 FineWeb r ≈ 2.583, i.e. 1 nat = 0.3871 bpb), so
  d_i = r_i · (B − val_bpb_i); then a one-sample t-test of the d_i against the threshold.
* Against baseline run directories: a Welch two-sample t-test (unequal variances) of the baseline runs'
  val_loss against the new runs' val_loss shifted by the threshold. Nats per token only compare runs of
  the same tokenizer: when the two groups' nats/bpb ratios differ (another tokenizer, e.g. CaseOps against
  plain), both groups are scored by val_bpb converted at the baseline's mean ratio instead, i.e. the bpb
  difference expressed in the baseline's nats per token, and a note says so.

scipy is an optional dependency (extras `test`); it is imported only when a test is run.
"""

from __future__ import annotations

import importlib
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from pgolf import rundir
from pgolf.submit.summary import SUMMARY_FILE, number, read_run_json

RECORD_THRESHOLD_NATS = 0.005
RECORD_ALPHA = 0.01
# Relative gap between two groups' mean nats/bpb ratios above which they likely used different tokenizers.
RATIO_MISMATCH = 0.01


def optional_import(module: str, purpose: str, extra: str) -> ModuleType:
    """Import an optional dependency, or fail with a message that says what needs it and how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        raise ModuleNotFoundError(
            f"{purpose} needs {top}, which is not installed: pip install {top} (or pip install 'pgolf[{extra}]')"
        ) from None


@dataclass(frozen=True)
class RunScore:
    """A run's final score as written in its summary.json."""

    run_dir: str
    val_bpb: float
    val_loss: float

    @property
    def nats_per_bpb(self) -> float:
        return self.val_loss / self.val_bpb


def load_score(run_dir: str | Path) -> RunScore:
    """val_bpb and val_loss from RUN_DIR/summary.json (written by `pgolf run` or `pgolf report`)."""
    source = str(Path(run_dir) / SUMMARY_FILE)
    summary = read_run_json(run_dir, SUMMARY_FILE)
    bpb = number(summary, "val_bpb", source)
    loss = number(summary, "val_loss", source)
    if bpb <= 0 or loss <= 0:
        raise ValueError(f"{source}: val_bpb and val_loss must be positive, got {bpb!r} and {loss!r}")
    rundir.check_fresh(run_dir, ("summary",))  # made from the train/quant/eval files now in RUN_DIR
    return RunScore(str(run_dir), bpb, loss)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1 in the denominator; nan for a single value)."""
    if not values:
        raise ValueError("mean_std needs at least one value")
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return mean, std


@dataclass(frozen=True)
class RecordTest:
    """Outcome of the one-sided record test of the mean improvement (nats/token) against a threshold."""

    method: str
    improvement: float
    threshold: float
    alpha: float
    t: float
    p: float
    df: float

    @property
    def passed(self) -> bool:
        return self.improvement >= self.threshold and self.p < self.alpha

    def verdict(self) -> str:
        imp = f"improvement {self.improvement:.4f} nats"
        p = f"p = {self.p:.4g}"
        if self.passed:
            return f"PASS: {imp} ≥ {self.threshold:g}, {p} < {self.alpha:g}"
        if self.improvement < self.threshold:
            return f"FAIL: {imp} < {self.threshold:g} ({p})"
        return f"FAIL: {imp} ≥ {self.threshold:g} but {p} ≥ {self.alpha:g}"


def _check_spread(values: Sequence[object], what: str, minimum: int = 2) -> None:
    if len(values) < minimum:
        raise ValueError(f"the record test needs at least {minimum} {what}, got {len(values)}")


def compare_to_bpb(
    runs: Sequence[RunScore],
    baseline_bpb: float,
    threshold: float = RECORD_THRESHOLD_NATS,
    alpha: float = RECORD_ALPHA,
) -> RecordTest:
    """One-sample t-test of d_i = r_i·(baseline_bpb − val_bpb_i) (nats/token) against `threshold`."""
    if not baseline_bpb > 0:
        raise ValueError(f"--against: a baseline val_bpb must be positive, got {baseline_bpb!r}")
    _check_spread(runs, "runs")
    gains = [r.nats_per_bpb * (baseline_bpb - r.val_bpb) for r in runs]
    if statistics.pvariance(gains) == 0:
        raise ValueError("the runs' improvements are identical (zero variance): a t-test is undefined")
    scipy_stats = optional_import("scipy.stats", "the record t-test", "test")
    res = scipy_stats.ttest_1samp(gains, threshold, alternative="greater")
    return RecordTest(
        method=f"one-sample t-test vs {baseline_bpb:.5f} bpb (converted at each run's nats/bpb ratio)",
        improvement=statistics.fmean(gains),
        threshold=threshold,
        alpha=alpha,
        t=float(res.statistic),
        p=float(res.pvalue),
        df=float(res.df),
    )


def compare_to_runs(
    runs: Sequence[RunScore],
    baseline: Sequence[RunScore],
    threshold: float = RECORD_THRESHOLD_NATS,
    alpha: float = RECORD_ALPHA,
) -> RecordTest:
    """Welch t-test of mean(baseline nats) − mean(run nats) against `threshold` (one-sided)."""
    _check_spread(runs, "runs")
    _check_spread(baseline, "baseline runs")
    new = [r.val_loss for r in runs]
    old = [r.val_loss for r in baseline]
    if tokenizers_differ(runs, baseline):
        ratio = nats_per_bpb(runs, baseline)[1]
        new, old = [ratio * r.val_bpb for r in runs], [ratio * r.val_bpb for r in baseline]
    if statistics.pvariance(new) == 0 and statistics.pvariance(old) == 0:
        raise ValueError("both groups' val_loss values are constant (zero variance): a t-test is undefined")
    scipy_stats = optional_import("scipy.stats", "the record t-test", "test")
    # Shifting the baseline by the threshold turns H1 "old − new > threshold" into a plain one-sided test.
    res = scipy_stats.ttest_ind([v - threshold for v in old], new, equal_var=False, alternative="greater")
    return RecordTest(
        method=f"Welch two-sample t-test vs {len(baseline)} baseline runs",
        improvement=statistics.fmean(old) - statistics.fmean(new),
        threshold=threshold,
        alpha=alpha,
        t=float(res.statistic),
        p=float(res.pvalue),
        df=float(res.df),
    )


def nats_per_bpb(runs: Sequence[RunScore], baseline: Sequence[RunScore]) -> tuple[float, float]:
    """The two groups' mean nats/bpb ratios (new runs, baseline)."""
    return statistics.fmean(r.nats_per_bpb for r in runs), statistics.fmean(r.nats_per_bpb for r in baseline)


def tokenizers_differ(runs: Sequence[RunScore], baseline: Sequence[RunScore]) -> bool:
    """True when the groups' mean nats/bpb ratios differ by more than RATIO_MISMATCH (other tokenizers)."""
    ratio_new, ratio_old = nats_per_bpb(runs, baseline)
    return abs(ratio_new - ratio_old) > RATIO_MISMATCH * ratio_old


def _group_lines(title: str, runs: Sequence[RunScore]) -> list[str]:
    width = max(12, *(len(r.run_dir) for r in runs))
    lines = [f"{title} ({len(runs)})", f"  {'run':<{width}s}  {'val_bpb':>9s}  {'val_loss':>9s}"]
    lines += [f"  {r.run_dir:<{width}s}  {r.val_bpb:9.5f}  {r.val_loss:9.5f}" for r in runs]
    bpb_mean, bpb_std = mean_std([r.val_bpb for r in runs])
    loss_mean, loss_std = mean_std([r.val_loss for r in runs])
    lines.append(f"  {'mean':<{width}s}  {bpb_mean:9.5f}  {loss_mean:9.5f}")
    lines.append(f"  {'std (n-1)':<{width}s}  {bpb_std:9.5f}  {loss_std:9.5f}")
    return lines


def format_stats(
    runs: Sequence[RunScore],
    baseline: Sequence[RunScore] | None = None,
    test: RecordTest | None = None,
) -> str:
    """Per-run scores, mean and std per group, the test statistics and the verdict line."""
    lines = _group_lines("runs", runs)
    if baseline:
        lines += [""] + _group_lines("baseline", baseline)
        if tokenizers_differ(runs, baseline):
            ratio_new, ratio_old = nats_per_bpb(runs, baseline)
            lines.append(
                f"note: nats/bpb ratios differ ({ratio_new:.4f} vs {ratio_old:.4f}): the groups use different "
                f"tokenizers, so the test compares val_bpb converted at the baseline's {ratio_old:.4f} nats/bpb"
            )
    if test is not None:
        lines += [
            "",
            test.method,
            f"  H1: improvement > {test.threshold:g} nats/token;  t = {test.t:.4f}, df = {test.df:.2f}, "
            f"p = {test.p:.4g}",
            test.verdict(),
        ]
    return "\n".join(lines)
