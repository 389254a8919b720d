"""RunConfig, presets and the override chain: preset < TOML < record env vars < --set."""

from __future__ import annotations

import json

import pytest

from pgolf.cli import main
from pgolf.config import ConfigError, from_dict, preset, resolve, to_dict, to_toml
from pgolf.config.env import ENV_KEYS
from pgolf.config.overrides import tomllib
from pgolf.config.presets import PRESETS

EXPECTED_PRESETS = {"pr1394", "pr1541", "pr1557", "baseline", "baseline-cpu", "cpu-golf", "smoke"}


def test_all_presets_registered_and_valid():
    assert EXPECTED_PRESETS <= set(PRESETS)
    for name in PRESETS:
        cfg = resolve(name, env={})
        assert cfg.preset == name


def test_pr1394_values_match_spec_section_7():
    c = preset("pr1394")
    assert (c.model.vocab_size, c.model.num_layers, c.model.model_dim) == (8192, 11, 512)
    assert (c.model.num_heads, c.model.num_kv_heads, c.model.mlp_mult) == (8, 4, 4.0)
    assert (c.model.qk_gain_init, c.model.rope_dims, c.model.xsa_last_n, c.model.logit_softcap) == (4.0, 16, 11, 30.0)
    assert (c.model.num_loops, c.model.loop_start, c.model.loop_end, c.model.enable_looping_at) == (2, 4, 5, 0.5)
    assert c.model.parallel_mode == "none"
    o = c.optim
    assert (o.matrix_lr, o.scalar_lr, o.tied_embed_lr, o.muon_momentum) == (0.02, 0.02, 0.03, 0.99)
    assert (o.muon_wd, o.embed_wd, o.adam_wd, o.grad_clip_norm) == (0.085, 0.085, 0.02, 0.3)
    assert (o.ema_decay, o.warmdown_frac, o.muon_momentum_warmup_start, o.muon_momentum_warmup_steps) == (
        0.997, 0.667, 0.92, 1500,
    )
    assert (c.data.train_batch_tokens, c.data.train_seq_len) == (786_432, 2048)
    q = c.quant
    assert (q.matrix_bits, q.matrix_clip_sigmas, q.embed_bits, q.embed_clip_sigmas) == (6, 12.85, 8, 20.0)
    assert (q.calibration_batches, q.cap_bytes, q.compressor) == (64, 16_000_000, "brotli")
    assert (c.eval.seq_len, c.eval.stride) == (2048, 64)


def test_pr1541_and_pr1557_logged_values():
    a = preset("pr1541")
    assert (a.model.qk_gain_init, a.model.loop_start, a.model.enable_looping_at) == (5.25, 3, 0.35)
    assert (a.model.parallel_mode, a.model.parallel_start, a.model.parallel_final_lane) == ("lanes1541", 7, "mlp")
    assert (a.optim.matrix_lr, a.optim.muon_momentum, a.optim.muon_wd, a.optim.embed_wd) == (0.03, 0.97, 0.095, 0.085)
    assert (a.optim.ema_decay, a.optim.warmdown_frac, a.eval.ttt_epochs) == (0.9965, 0.72, 3)
    assert "ttt" in a.eval.plan
    b = preset("pr1557")
    assert (b.model.num_loops, b.model.qk_gain_init, b.model.parallel_mode) == (3, 5.0, "lanes1529")
    assert b.model.parallel_final_lane == "mean"
    assert (b.quant.hessian_clip_lambda, b.eval.ttt_epochs, b.optim.embed_wd, b.optim.ema_decay) == (0.175, 5, 0.095, 0.997)
    assert b.eval.plan[-2:] == ["ttt", "ngram"]


def test_cpu_track_presets_use_the_track_budget():
    for name in ("cpu-golf", "baseline-cpu"):
        c = preset(name)
        assert c.model.vocab_size == 1024 and c.data.train_seq_len == 512
        assert (c.quant.cap_bytes, c.train.max_wallclock_seconds, c.eval.time_budget_seconds) == (2_000_000, 600.0, 600.0)
    b = preset("baseline-cpu")  # the SPEC §11 starting shape with the §8 recipe
    assert (b.model.num_layers, b.model.model_dim, b.data.train_batch_tokens, b.model.mlp_activation) == (6, 256, 16_384, "relu2")
    g = preset("cpu-golf")  # reshaped by measurement (see its docstring)
    assert (g.model.num_layers, g.model.model_dim, g.model.parallel_mode, g.model.num_loops) == (4, 96, "lanes1541", 0)
    assert (g.quant.matrix_bits, g.quant.embed_bits, g.quant.calibration_batches) == (16, 16, 0)  # fp16 fits
    assert (g.eval.plan, g.eval.stride) == (["quant", "sliding"], 64)


def test_override_order_preset_toml_env_set(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[optim]\nmatrix_lr = 0.05\nscalar_lr = 0.07\n[model]\nnum_layers = 5\n")
    cfg = resolve("pr1394", f, env={"MATRIX_LR": "0.03", "NUM_LAYERS": "7"}, sets=["model.num_layers=9"])
    assert cfg.optim.scalar_lr == 0.07  # TOML over preset
    assert cfg.optim.matrix_lr == 0.03  # env over TOML
    assert cfg.model.num_layers == 9  # --set over env


def test_env_plan_switches_and_parallel_start():
    cfg = resolve("pr1394", env={"TTT_ENABLED": "1", "SLIDING_WINDOW_ENABLED": "0", "PARALLEL_RESIDUAL_START": "7"})
    assert "ttt" in cfg.eval.plan and "sliding" not in cfg.eval.plan
    assert (cfg.model.parallel_mode, cfg.model.parallel_start) == ("gptj", 7)
    assert resolve("pr1541", env={"PARALLEL_RESIDUAL_START": "-1"}).model.parallel_mode == "none"


def test_data_dir_env_keeps_the_record_layout():
    cfg = resolve("pr1394", env={"DATA_DIR": "/d", "VOCAB_SIZE": "8192"})
    assert cfg.data.dir == "/d/datasets/fineweb10B_sp8192"
    assert cfg.data.tokenizer == "/d/tokenizers/fineweb_8192_bpe.model"


def test_every_env_key_maps_to_a_real_field():
    cfg = preset("pr1394")
    for name, key in ENV_KEYS.items():
        section, field = key.split(".")
        assert hasattr(getattr(cfg, section), field), name


@pytest.mark.parametrize(
    "sets, fragment",
    [
        (["model.num_layers=x"], "'model.num_layers': expected int"),
        (["model.nope=1"], "unknown config key 'model.nope'"),
        (["foo.bar=1"], "unknown config key 'foo.bar'"),
        (["optim.matrix_lr=fast"], "'optim.matrix_lr': expected float"),
        (["model.tie_embeddings=maybe"], "'model.tie_embeddings': expected bool"),
        (["model.parallel_mode=sideways"], "expected one of none, gptj"),
        (["eval.plan=sliding,magic"], "unknown modes ['magic']"),
        (["model.num_heads=3"], "model.model_dim=512 must be divisible by model.num_heads=3"),
        (["no_equals"], "--set expects KEY=VALUE"),
    ],
)
def test_bad_overrides_name_the_key(sets, fragment):
    with pytest.raises(ConfigError) as err:
        resolve("pr1394", env={}, sets=sets)
    assert fragment in str(err.value)


def test_bad_env_and_toml_name_the_source(tmp_path):
    with pytest.raises(ConfigError, match="env MATRIX_LR"):
        resolve("pr1394", env={"MATRIX_LR": "abc"})
    f = tmp_path / "bad.toml"
    f.write_text("[model]\nnum_layerz = 3\n")
    with pytest.raises(ConfigError, match="bad.toml: unknown config key 'model.num_layerz'"):
        resolve("pr1394", f, env={})
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        preset("nope")


def test_toml_round_trip_every_preset():
    for name in PRESETS:
        cfg = preset(name)
        again = from_dict(tomllib.loads(to_toml(cfg)))
        assert to_dict(again) == to_dict(cfg)


def test_cli_config_show(capsys, monkeypatch):
    monkeypatch.delenv("MATRIX_LR", raising=False)
    assert main(["config", "show", "pr1394", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["optim"]["matrix_lr"] == 0.02 and shown["model"]["qk_gain_init"] == 4.0
    monkeypatch.setenv("MATRIX_LR", "0.03")
    assert main(["config", "show", "pr1394"]) == 0
    assert "matrix_lr = 0.03" in capsys.readouterr().out
    assert main(["config", "show", "pr1394", "--set", "model.num_layers=x"]) == 2
    assert "model.num_layers" in capsys.readouterr().err
