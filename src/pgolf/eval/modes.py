"""The eval modes: one registry line per mode (torch-free, so config validation and the summary read it).

A scoring mode names its entry point, `fn(model, tokens, tables, cfg: EvalConfig, opts: ScoreOptions)
-> (plain BpbResult, tilted BpbResult | None)`, and the weights it scores (`prequant`: RUN_DIR/model.pt,
`quant`: the artifact). A transform mode (the n-gram tilt) names a builder
`fn(tokens, cfg: EvalConfig, tables) -> (NllTransform, seconds)` instead and rides on the last mode of
the plan that takes a transform, or on its `carrier` when the plan has none; the tilt never changes what
that pass trains on, so one pass measures both modes. Adding a mode: write its function, add its line.
Entry points are "module:function" strings so that importing this registry imports no torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class EvalMode:
    name: str  # eval.plan entry, eval.json "mode", `pgolf eval --NAME`
    summary_key: str  # its bpb in summary.json
    label: str  # in the summary, the report and the waterfall
    weights: str = "quant"  # prequant | quant
    score: str = ""  # "module:function" of a scoring mode
    takes_transform: bool = False  # its pass can carry a transform mode
    transform: str = ""  # "module:function" of a transform mode's builder
    carrier: str = ""  # the pass a transform mode rides on when the plan has no transform-taking mode
    pass_order: str = ""  # "module:function" (tokens, EvalConfig) -> target positions in the order scored,
    # for a mode that does not score left to right (the legality check C1 is stated in that order)


# In plan order: the summary's score is the last mode of this order that ran.
MODES: dict[str, EvalMode] = {
    m.name: m
    for m in (
        EvalMode("prequant", "pre_quant_bpb", "pre-quant", "prequant", "pgolf.eval.score:nonoverlap_mode"),
        EvalMode("quant", "quant_bpb", "quantized", "quant", "pgolf.eval.score:nonoverlap_mode"),
        EvalMode("sliding", "sliding_bpb", "sliding", "quant", "pgolf.eval.score:sliding_mode", True),
        EvalMode("ttt", "ttt_bpb", "TTT", "quant", "pgolf.eval.ttt:eval_ttt", True),
        EvalMode(
            "lora_ttt",
            "lora_ttt_bpb",
            "phased LoRA TTT",
            "quant",
            "pgolf.eval.lora_ttt:eval_lora_ttt",
            pass_order="pgolf.eval.lora_ttt:pass_order",
        ),
        EvalMode(
            "ngram",
            "ngram_bpb",
            "n-gram tilt",
            transform="pgolf.eval.ngram_tilt:build_tilt",
            carrier="sliding",
        ),
    )
}
EVAL_MODES = tuple(MODES)


def entry_point(path: str) -> Callable:
    """The function a "module:function" string names."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)
