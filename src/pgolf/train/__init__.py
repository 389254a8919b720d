"""pgolf.train: the training loop of SPEC §3.3–3.4 and its parts.

`train(cfg, run_dir, resume=False, quant_reserve_seconds=None, fresh=False) -> dict` runs a `Trainer` into
RUN_DIR/{config.toml, train.log, checkpoint.pt, model.pt, train.json} (names: pgolf.rundir); `EMA`;
`save_checkpoint`/`load_checkpoint`; `parse_log_line` for train.log; `pgolf train` lives in `pgolf.train.cli`.
"""

from pgolf.train.checkpoint import load_checkpoint, save_checkpoint
from pgolf.train.ema import EMA
from pgolf.train.log import format_train_line, format_val_line, parse_log_line
from pgolf.train.loop import StepEvent, Trainer, TrainingDiverged, grad_accum_steps, train
from pgolf.train.step import TrainStep

__all__ = [
    "EMA",
    "StepEvent",
    "TrainStep",
    "Trainer",
    "TrainingDiverged",
    "format_train_line",
    "format_val_line",
    "grad_accum_steps",
    "load_checkpoint",
    "parse_log_line",
    "save_checkpoint",
    "train",
]
