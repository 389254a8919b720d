"""Entry point of a bundled `train_gpt.py`: the embedded config, the record env vars, then the pipeline.

Run as the record scripts are: `torchrun --standalone --nproc_per_node=8 train_gpt.py` with DATA_DIR (the
records' data root), SEED, RUN_ID and any knob of SPEC §7 in the environment. Code bytes are the size of the
executed file itself (SPEC §4.7), so the printed total is exactly what the submission weighs.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import sys
import uuid
from pathlib import Path

from pgolf.config import ConfigError, RunConfig, from_dict, validate
from pgolf.config.env import apply_env
from pgolf.config.overrides import tomllib
from pgolf.runtime import keep_freed_memory, shutdown_distributed
from pgolf.submit.pipeline import run_pipeline

# Modules only one eval mode runs: a bundle leaves them out when its config's plan does not name the mode.
FEATURE_MODULES = {
    "pgolf.eval.ttt": "ttt",
    "pgolf.eval.lora_ttt": "lora_ttt",
    "pgolf.eval.ngram_tilt": "ngram",
    "pgolf.eval.ngram_hints": "ngram",
}


def check_plan_is_bundled(plan: list[str]) -> None:
    """Refuse a plan (after the env vars) that needs a mode this train_gpt.py was bundled without."""
    for module, mode in FEATURE_MODULES.items():
        if mode in plan:
            try:
                importlib.util.find_spec(module)
            except ModuleNotFoundError:
                raise ConfigError(
                    f"eval.plan runs '{mode}' but this train_gpt.py was bundled without it; bundle a config "
                    f"whose eval.plan has '{mode}'"
                ) from None


def check_fixed_fields(cfg: RunConfig, bundled: RunConfig, fixed: tuple[str, ...]) -> None:
    """Refuse an env var that changes a field whose value the bundled code was folded with (pgolf.fold)."""
    for key in fixed:
        now, then = cfg, bundled
        for part in key.split("."):
            now, then = getattr(now, part), getattr(then, part)
        if now != then:
            raise ConfigError(f"{key}={now!r}: this train_gpt.py was built for {key}={then!r}; bundle a config with it")


def _script_bytes() -> int:
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None) or sys.argv[0]
    return Path(path).stat().st_size


def main(config_toml: str, fixed: tuple[str, ...] = ()) -> int:
    keep_freed_memory()
    try:
        bundled = from_dict(tomllib.loads(config_toml), "embedded config")
        cfg = copy.deepcopy(bundled)
        apply_env(cfg, os.environ)
        validate(cfg)
        check_plan_is_bundled(cfg.eval.plan)
        check_fixed_fields(cfg, bundled, fixed)
    except ConfigError as err:  # a bad env var: one line, before any work
        print(f"train_gpt.py: {err}", file=sys.stderr)
        return 2
    run_id = os.environ.get("RUN_ID") or uuid.uuid4().hex[:8]
    run_dir = Path(os.environ.get("RUN_DIR") or Path("runs") / run_id)
    summary = run_pipeline(cfg, run_dir, code_bytes=_script_bytes())
    if summary:
        print(f"final val_loss:{summary['val_loss']:.8f} val_bpb:{summary['val_bpb']:.8f}")
        print(
            f"Total submission size: {summary['total_bytes']} bytes "
            f"(artifact {summary['artifact_bytes']} + code {summary['code_bytes']}; cap {summary['cap_bytes']})"
        )
    shutdown_distributed()
    return 0
