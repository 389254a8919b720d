"""train.log in the records' line format, a tqdm bar on rank 0, and a parser for the lines.

Lines (one event each, `key:value` fields separated by spaces):
  step:S/ITERS train_loss:L train_time:Tms tok/s:N
  step:S val_loss:L val_bpb:B           (val_bpb:na without a tokenizer)
  loop_enabled step:N frac:F
  stopped reason:R step:S ...
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


def format_train_line(step: int, iterations: int, loss: float, train_ms: float, tokens_per_s: float) -> str:
    return (
        f"step:{step}/{iterations} train_loss:{loss:.4f} train_time:{train_ms:.0f}ms tok/s:{tokens_per_s:.0f}"
    )


def format_val_line(step: int, loss: float, bpb: float | None) -> str:
    bpb_text = "na" if bpb is None else f"{bpb:.4f}"
    return f"step:{step} val_loss:{loss:.4f} val_bpb:{bpb_text}"


def _number(text: str) -> int | float | str:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_log_line(line: str) -> dict[str, Any]:
    """Fields of one log line: {'event': 'train'|'val'|'loop_enabled'|..., key: number|str, ...}.

    `step:S/ITERS` gives step and iterations; `train_time:123ms` gives train_time_ms.
    """
    parts = line.split()
    out: dict[str, Any] = {}
    event = None
    for part in parts:
        if ":" not in part:
            event = event or part
            continue
        key, value = part.split(":", 1)
        if key == "step" and "/" in value:
            step, iters = value.split("/", 1)
            out["step"], out["iterations"] = int(step), int(iters)
        elif key == "train_time" and value.endswith("ms"):
            out["train_time_ms"] = _number(value[:-2])
        else:
            out[key.replace("/", "_per_")] = _number(value)
    if event is None:
        event = "val" if "val_loss" in out else "train" if "train_loss" in out else "other"
    out["event"] = event
    return out


class TrainLogger:
    """Writes log lines to RUN_DIR/train.log (appending, so a resumed run continues the file) and stdout.

    Only rank 0 writes; other ranks' calls are no-ops. A tqdm bar is shown on an interactive terminal.
    """

    def __init__(self, path: Path, is_main: bool, total_steps: int, initial_step: int = 0) -> None:
        self.is_main = is_main
        self.fh = open(path, "a", encoding="utf-8") if is_main else None
        self.bar = None
        if is_main and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)

    def log(self, line: str) -> None:
        if not self.is_main:
            return
        assert self.fh is not None
        self.fh.write(line + "\n")
        self.fh.flush()
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def advance(self, loss: float | None = None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.fh is not None:
            self.fh.close()
