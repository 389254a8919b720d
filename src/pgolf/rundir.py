"""The run directory: every file a stage writes into RUN_DIR, how it is read, and what it was made from.

RUN_DIR/
  config.toml         the resolved config (train writes it; every stage reads it)
  train.log           one line per log event (train)
  checkpoint.pt       resumable training state, tensors + plain data only (train)
  model.pt            trained weights, a plain state_dict (train)
  train.json          training summary (train)
  model.ptz           the quantized artifact; model.over_cap.ptz when it does not fit (quantize)
  quant.json          sizes and timings of quantization (quantize)
  eval.json           one result per eval mode, accumulated over `pgolf eval` calls (eval)
  summary.json        the one-screen result (run / report)
  fingerprints.json   what each stage output was made from (every stage, see `record_stage`)
  .lock               pid and host of the process writing the directory (train, run)

Stages import this module, never each other, to find their inputs. Fingerprints: each stage records the
sha256 of its config and of the upstream files it read, and of the files it wrote; rerunning a stage
removes what depends on it; `check_fresh` refuses a part whose recorded hashes no longer match the files.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pgolf.fileio import atomic_write_json, file_sha256

CONFIG = "config.toml"
TRAIN_LOG = "train.log"
CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"
TRAIN_JSON = "train.json"
ARTIFACT = "model.ptz"
OVER_CAP_ARTIFACT = "model.over_cap.ptz"
QUANT_JSON = "quant.json"
EVAL_JSON = "eval.json"
SUMMARY_JSON = "summary.json"
FINGERPRINTS = "fingerprints.json"
LOCK = ".lock"
REPORT_DIR = "report"

# The stages in pipeline order: the files each writes, and the stage outputs each reads.
STAGE_OUTPUTS = {
    "train": (MODEL, TRAIN_JSON),
    "quant": (ARTIFACT, OVER_CAP_ARTIFACT, QUANT_JSON),
    "eval": (EVAL_JSON,),
    "summary": (SUMMARY_JSON,),
}
STAGES = tuple(STAGE_OUTPUTS)
# Files shipped in a record folder as the run's logs.
LOG_FILES = (TRAIN_LOG, TRAIN_JSON, QUANT_JSON, EVAL_JSON, SUMMARY_JSON)


class StaleRunError(ValueError):
    """A stage output does not match what it claims to be made from (or has no record at all)."""


class RunDirLocked(ValueError):
    """Another live process holds the run directory's lock."""


def path(run_dir: str | Path, name: str) -> Path:
    return Path(run_dir) / name


def read_json(run_dir: str | Path, name: str) -> dict[str, Any]:
    """RUN_DIR/name parsed as a JSON object; a missing or malformed file is an error naming it."""
    file = path(run_dir, name)
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found (the run directory lacks the stage output '{name}')")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def load_plain(file: str | Path, what: str) -> Any:
    """torch.load of tensors and plain data only (weights_only=True): a file whose unpickling would run code
    is refused, a truncated or foreign one is an error; both name the file and `what` it should be."""
    import pickle

    import torch

    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{file}: refused: it holds Python objects other than tensors and plain data, and loading them "
            f"could run code ({str(err).splitlines()[0][:160]})"
        ) from None
    except Exception as err:  # truncated, not a torch file, ...
        raise ValueError(f"{file}: not a readable {what} ({type(err).__name__}: {err})") from None


def load_weights(file: str | Path) -> dict[str, Any]:
    """A plain state_dict from `file` (model.pt); errors name the file."""
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no trained weights (run `pgolf train` first)")
    state = load_plain(file, "weights file")
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ValueError(f"{file}: expected a state_dict (tensor name -> tensor)")
    return state


def looping_after_training(run_dir: str | Path, cfg: Any) -> bool:
    """Depth recurrence of the exported model: on when the config loops and training switched it on
    (train.json). The one rule calibration (quant) and evaluation both follow."""
    if cfg.model.num_loops <= 0:
        return False
    file = path(run_dir, TRAIN_JSON)
    if file.is_file():
        return json.loads(file.read_text(encoding="utf-8")).get("looping_enabled_at_step") is not None
    return True


# ----------------------------------------------------------------------------------- fingerprints
def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _ledger(run_dir: str | Path) -> dict[str, Any]:
    file = path(run_dir, FINGERPRINTS)
    return read_json(run_dir, FINGERPRINTS) if file.is_file() else {}


def invalidate_from(run_dir: str | Path, stage: str) -> list[str]:
    """Remove the outputs (and fingerprints) of `stage` and of every stage after it; returns the names removed.
    Called when a stage starts over, so no earlier result can be read as this run's."""
    run_dir = Path(run_dir)
    later = STAGES[STAGES.index(stage) :]
    removed = []
    for st in later:
        for name in STAGE_OUTPUTS[st]:
            if path(run_dir, name).is_file():
                path(run_dir, name).unlink()
                removed.append(name)
    ledger = _ledger(run_dir)
    if any(st in ledger for st in later):
        atomic_write_json(path(run_dir, FINGERPRINTS), {k: v for k, v in ledger.items() if k not in later})
    return removed


def record_stage(
    run_dir: str | Path, stage: str, config_toml: str | None, inputs: Iterable[str], extra: Any = None
) -> dict[str, Any]:
    """Record in fingerprints.json what `stage` was made from (its config, the sha256 of the upstream files
    `inputs`) and the sha256 of the outputs it wrote (those of STAGE_OUTPUTS present now)."""
    run_dir = Path(run_dir)
    entry: dict[str, Any] = {
        "config": None if config_toml is None else text_sha256(config_toml),
        "inputs": {name: file_sha256(path(run_dir, name)) for name in inputs},
        "outputs": {
            name: file_sha256(path(run_dir, name))
            for name in STAGE_OUTPUTS[stage]
            if path(run_dir, name).is_file()
        },
    }
    if extra is not None:
        entry["extra"] = extra
    ledger = _ledger(run_dir)
    ledger[stage] = entry
    atomic_write_json(path(run_dir, FINGERPRINTS), ledger)
    return entry


def stage_record(run_dir: str | Path, stage: str) -> dict[str, Any]:
    """The fingerprint entry of `stage`; StaleRunError naming the output when there is none."""
    entry = _ledger(run_dir).get(stage)
    if entry is None:
        names = ", ".join(n for n in STAGE_OUTPUTS[stage] if path(run_dir, n).is_file())
        if not names:
            raise StaleRunError(f"{path(run_dir, STAGE_OUTPUTS[stage][-1])} not found: run the {stage} stage")
        raise StaleRunError(
            f"{path(run_dir, FINGERPRINTS)}: no record of what {names} was made from "
            f"(written by an older pgolf, by hand, or interrupted): rerun that stage"
        )
    return entry


def check_fresh(run_dir: str | Path, stages: Iterable[str] = STAGES, same_config: bool = False) -> None:
    """Refuse (StaleRunError naming the file) when an output of `stages` changed since its stage recorded it,
    or when an input changed since a later stage read it: the parts would describe different models.
    `same_config`: also refuse a stage made with a config other than config.toml (`quantize --set`), as a
    record folder ships config.toml and must reproduce its artifact."""
    run_dir = Path(run_dir)
    config_sha = file_sha256(path(run_dir, CONFIG)) if path(run_dir, CONFIG).is_file() else None
    for stage in stages:
        entry = stage_record(run_dir, stage)
        rerun = "`pgolf report`" if stage == "summary" else f"the {stage} stage"
        first = next(iter(entry["outputs"]), stage)
        for name, sha in entry["outputs"].items():
            file = path(run_dir, name)
            if not file.is_file():
                raise StaleRunError(
                    f"{file} not found (removed after the {stage} stage wrote it); rerun {rerun}"
                )
            if file_sha256(file) != sha:
                raise StaleRunError(f"{file}: changed since the {stage} stage wrote it; rerun {rerun}")
        for name, sha in entry["inputs"].items():
            file = path(run_dir, name)
            if not file.is_file() or file_sha256(file) != sha:
                raise StaleRunError(
                    f"{path(run_dir, first)}: stale: made from another {name} than the one now in {run_dir}; "
                    f"rerun {rerun}"
                )
        if entry["config"] is None or entry["config"] == config_sha:
            continue
        if stage == "train":
            raise StaleRunError(f"{path(run_dir, CONFIG)}: changed since the model was trained")
        if same_config:
            raise StaleRunError(
                f"{path(run_dir, first)}: made with a config other than {path(run_dir, CONFIG)} "
                f"(`--set` overrides): rerun {rerun} without them"
            )


# ----------------------------------------------------------------------------------- eval results
def mode_input(mode: str) -> str:
    """The model file an eval mode scores: the trained weights for prequant, the artifact otherwise."""
    return MODEL if mode == "prequant" else ARTIFACT


def write_eval_results(run_dir: str | Path, out: dict[str, Any]) -> dict[str, Any]:
    """Write eval.json, keeping the earlier results of modes this call did not measure when they scored the
    same model files as now (per-mode fingerprints); returns what was written."""
    run_dir = Path(run_dir)
    shas = {
        name: file_sha256(path(run_dir, name)) for name in (MODEL, ARTIFACT) if path(run_dir, name).is_file()
    }
    new_modes = {r["mode"] for r in out["results"]}
    kept: list[dict[str, Any]] = []
    old_modes: dict[str, Any] = {}
    if path(run_dir, EVAL_JSON).is_file() and "eval" in _ledger(run_dir):
        old_modes = _ledger(run_dir)["eval"].get("extra", {}).get("modes", {})
        previous = read_json(run_dir, EVAL_JSON)
        kept = [
            r
            for r in previous.get("results", [])
            if r.get("mode") not in new_modes
            and old_modes.get(r.get("mode")) == shas.get(mode_input(r.get("mode", "")))
        ]
    if kept:
        out = dict(
            out,
            results=kept + list(out["results"]),
            eval_seconds=round(previous.get("eval_seconds", 0.0) + out["eval_seconds"], 3),
            stopped_early=bool(previous.get("stopped_early")) or out["stopped_early"],
        )
    modes = {r["mode"]: shas.get(mode_input(r["mode"])) for r in out["results"]}
    inputs = sorted({mode_input(m) for m in modes if mode_input(m) in shas})
    atomic_write_json(path(run_dir, EVAL_JSON), out)
    invalidate_from(run_dir, "summary")
    record_stage(run_dir, "eval", None, inputs, extra={"modes": modes})
    return out


# ----------------------------------------------------------------------------------- lock
_HELD: dict[Path, int] = {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """Exclusive use of a run directory by one process (re-entrant within it): RUN_DIR/.lock holds pid and
    host; a lock whose process is gone (same host) is stale and taken over; a live one is RunDirLocked."""

    def __init__(self, run_dir: str | Path, enabled: bool = True) -> None:
        self.file = path(run_dir, LOCK).resolve() if enabled else None

    def __enter__(self) -> RunLock:
        if self.file is None:
            return self
        if _HELD.get(self.file):
            _HELD[self.file] += 1
            return self
        self.file.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and not self._stale(holder):
                    raise RunDirLocked(
                        f"{self.file.parent}: in use by pid {holder['pid']} on {holder['host']} "
                        f"({self.file}); wait for it to finish, or pick another run directory"
                    ) from None
                self.file.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            _HELD[self.file] = 1
            return self
        raise RunDirLocked(f"{self.file}: could not take the lock (another process keeps taking it)")

    def _holder(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.file.read_text())
            return holder if isinstance(holder, dict) and "pid" in holder else None
        except (OSError, ValueError):
            return None  # half-written or unreadable: treat as stale

    @staticmethod
    def _stale(holder: dict[str, Any]) -> bool:
        return holder.get("host") == socket.gethostname() and not _pid_alive(int(holder["pid"]))

    def __exit__(self, *exc: Any) -> None:
        if self.file is None:
            return
        _HELD[self.file] -= 1
        if not _HELD[self.file]:
            del _HELD[self.file]
            self.file.unlink(missing_ok=True)
