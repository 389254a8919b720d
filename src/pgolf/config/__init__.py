"""Run configuration: the RunConfig tree, named presets, and the override chain.

Resolution order (later wins): preset < TOML config file < record env vars < CLI `--set a.b=v`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pgolf.config.env import ENV_KEYS, apply_env, unused_record_vars
from pgolf.config.overrides import (
    ConfigError,
    apply_mapping,
    apply_sets,
    check_fields,
    from_dict,
    load_toml,
    set_value,
    to_dict,
    to_toml,
)
from pgolf.config.presets import PRESETS
from pgolf.config.schema import (
    DataConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    QuantConfig,
    RunConfig,
    TrainConfig,
)
from pgolf.rundir import CONFIG

__all__ = [
    "ConfigError",
    "DataConfig",
    "ENV_KEYS",
    "EvalConfig",
    "ModelConfig",
    "OptimConfig",
    "PRESETS",
    "QuantConfig",
    "RunConfig",
    "TrainConfig",
    "from_dict",
    "load_run_config",
    "preset",
    "resolve",
    "set_value",
    "to_dict",
    "to_toml",
    "unused_record_vars",
    "validate",
]


def preset(name: str) -> RunConfig:
    """A fresh RunConfig for a registered preset name."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}'; expected one of {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()


def validate(cfg: RunConfig) -> RunConfig:
    """Every field against its declared choices/range, then the cross-field checks; errors name the keys."""
    check_fields(cfg)
    m, d, e = cfg.model, cfg.data, cfg.eval
    if m.model_dim % m.num_heads:
        raise ConfigError(f"model.model_dim={m.model_dim} must be divisible by model.num_heads={m.num_heads}")
    if m.num_heads % m.num_kv_heads:
        raise ConfigError(
            f"model.num_heads={m.num_heads} must be a multiple of model.num_kv_heads={m.num_kv_heads}"
        )
    head_dim = m.model_dim // m.num_heads
    if m.rope_dims % 2 or m.rope_dims > head_dim:
        raise ConfigError(f"model.rope_dims={m.rope_dims} must be even and <= head_dim={head_dim}")
    if m.num_loops and not 0 <= m.loop_start <= m.loop_end < m.num_layers:
        raise ConfigError(
            f"model.loop_start={m.loop_start}, model.loop_end={m.loop_end} must satisfy "
            f"0 <= loop_start <= loop_end < model.num_layers={m.num_layers}"
        )
    if m.parallel_mode != "none" and not 0 <= m.parallel_start < m.num_layers:
        raise ConfigError(f"model.parallel_start={m.parallel_start} must be in [0, {m.num_layers})")
    if d.train_batch_tokens % d.train_seq_len:
        raise ConfigError(
            f"data.train_batch_tokens={d.train_batch_tokens} must be a multiple of data.train_seq_len={d.train_seq_len}"
        )
    if e.stride > e.seq_len:
        raise ConfigError(f"eval.stride={e.stride} must be <= eval.seq_len={e.seq_len}")
    return cfg


def resolve(
    preset_name: str,
    config_file: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    sets: list[str] | None = None,
) -> RunConfig:
    """preset < TOML file < record env vars (os.environ unless given) < `--set` strings; validated."""
    cfg = preset(preset_name)
    if config_file:
        apply_mapping(cfg, load_toml(config_file), str(config_file))
    apply_env(cfg, os.environ if env is None else env)
    apply_sets(cfg, sets or [])
    return validate(cfg)


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The resolved config a run directory was produced with (RUN_DIR/config.toml)."""
    path = Path(run_dir) / CONFIG
    return validate(from_dict(load_toml(path), str(path)))
