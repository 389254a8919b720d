"""The record scripts' environment variables (SPEC §7), same names and meaning, mapped onto RunConfig keys.

Only knobs pgolf implements are listed; dead or unused knobs of the originals (SPEC §9.2: MUON_BETA2,
ROPE_TRAIN_SEQ_LEN, TTT_HASH_EMBED, ETLB_*) are deliberately absent so that setting them changes nothing
silently: `unused_record_vars` reports them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from pgolf.config.overrides import ConfigError, set_value
from pgolf.config.schema import RunConfig

ENV_KEYS: dict[str, str] = {
    # run & data (DATA_DIR is handled by _data_dir: it names the records' data root, not a shard folder)
    "SEED": "train.seed",
    "ITERATIONS": "train.iterations",
    "MAX_WALLCLOCK_SECONDS": "train.max_wallclock_seconds",
    "TRAIN_BATCH_TOKENS": "data.train_batch_tokens",
    "TRAIN_SEQ_LEN": "data.train_seq_len",
    "TRAIN_LOG_EVERY": "train.log_every",
    "VAL_LOSS_EVERY": "train.val_every",
    "EVAL_SEQ_LEN": "eval.seq_len",
    "EVAL_STRIDE": "eval.stride",
    # architecture
    "VOCAB_SIZE": "model.vocab_size",
    "NUM_LAYERS": "model.num_layers",
    "MODEL_DIM": "model.model_dim",
    "NUM_HEADS": "model.num_heads",
    "NUM_KV_HEADS": "model.num_kv_heads",
    "MLP_MULT": "model.mlp_mult",
    "TIE_EMBEDDINGS": "model.tie_embeddings",
    "LOGIT_SOFTCAP": "model.logit_softcap",
    "ROPE_BASE": "model.rope_base",
    "ROPE_DIMS": "model.rope_dims",
    "LN_SCALE": "model.ln_scale",
    "XSA_LAST_N": "model.xsa_last_n",
    "SKIP_GATES_ENABLED": "model.skip_gates",
    "QK_GAIN_INIT": "model.qk_gain_init",
    "TIED_EMBED_INIT_STD": "model.tied_embed_init_std",
    "NUM_LOOPS": "model.num_loops",
    "LOOP_START": "model.loop_start",
    "LOOP_END": "model.loop_end",
    "ENABLE_LOOPING_AT": "model.enable_looping_at",
    "PARALLEL_FINAL_LANE": "model.parallel_final_lane",
    "SMEAR_GATE_ENABLED": "model.smear_gate",
    "SPARSE_ATTN_GATE_ENABLED": "model.sparse_attn_gate",
    "SPARSE_ATTN_GATE_SCALE": "model.sparse_attn_gate_scale",
    "GATE_WINDOW": "model.gate_window",
    "FUSED_CE_ENABLED": "model.fused_ce",
    # optimizer & schedule
    "MATRIX_LR": "optim.matrix_lr",
    "SCALAR_LR": "optim.scalar_lr",
    "TIED_EMBED_LR": "optim.tied_embed_lr",
    "EMBED_LR": "optim.embed_lr",
    "HEAD_LR": "optim.head_lr",
    "MUON_MOMENTUM": "optim.muon_momentum",
    "MUON_MOMENTUM_WARMUP_START": "optim.muon_momentum_warmup_start",
    "MUON_MOMENTUM_WARMUP_STEPS": "optim.muon_momentum_warmup_steps",
    "MUON_BACKEND_STEPS": "optim.muon_backend_steps",
    "MUON_ROW_NORMALIZE": "optim.muon_row_normalize",
    "BETA1": "optim.beta1",
    "BETA2": "optim.beta2",
    "ADAM_EPS": "optim.adam_eps",
    "ADAM_WD": "optim.adam_wd",
    "MUON_WD": "optim.muon_wd",
    "EMBED_WD": "optim.embed_wd",
    "GRAD_CLIP_NORM": "optim.grad_clip_norm",
    "EMA_DECAY": "optim.ema_decay",
    "WARMUP_STEPS": "train.warmup_steps",
    "WARMDOWN_FRAC": "optim.warmdown_frac",
    "MIN_LR": "optim.min_lr",
    # quantization
    "COMPRESSOR": "quant.compressor",
    "GPTQ_CALIBRATION_BATCHES": "quant.calibration_batches",
    "GPTQ_RESERVE_SECONDS": "train.quant_reserve_seconds",
    "MATRIX_BITS": "quant.matrix_bits",
    "EMBED_BITS": "quant.embed_bits",
    "MATRIX_CLIP_SIGMAS": "quant.matrix_clip_sigmas",
    "EMBED_CLIP_SIGMAS": "quant.embed_clip_sigmas",
    "HESSIAN_CLIP_LAMBDA": "quant.hessian_clip_lambda",
    "GPTQ_DAMP": "quant.gptq_damp",
    "ATTN_CLIP_SIGMAS": "quant.attn_clip_sigmas",
    "MLP_CLIP_SIGMAS": "quant.mlp_clip_sigmas",
    "GATED_ATTN_QUANT_GATE": "quant.gate_int8",
    "LQER_TOP_K": "quant.lqer_top_k",
    "LQER_RANK": "quant.lqer_rank",
    "LQER_ASYM_GROUP": "quant.lqer_group",
    # test-time training and n-gram tilt
    "TTT_LR": "eval.ttt_lr",
    "TTT_EPOCHS": "eval.ttt_epochs",
    "TTT_MOMENTUM": "eval.ttt_momentum",
    "TTT_CHUNK_TOKENS": "eval.ttt_chunk_tokens",
    "TTT_FREEZE_BLOCKS": "eval.ttt_freeze_blocks",
    "TTT_BATCH_SEQS": "eval.ttt_batch_seqs",
    "TTT_GRAD_CLIP": "eval.ttt_grad_clip",
    # phased LoRA TTT (#1855, eval mode lora_ttt)
    "TTT_LORA_RANK": "eval.lora_ttt_rank",
    "TTT_LORA_ALPHA": "eval.lora_ttt_alpha",
    "TTT_LORA_LR": "eval.lora_ttt_lr",
    "TTT_BETA1": "eval.lora_ttt_beta1",
    "TTT_BETA2": "eval.lora_ttt_beta2",
    "TTT_WEIGHT_DECAY": "eval.lora_ttt_weight_decay",
    "TTT_CHUNK_SIZE": "eval.lora_ttt_chunk",
    "TTT_EVAL_SEQ_LEN": "eval.lora_ttt_context",
    "TTT_BATCH_SIZE": "eval.lora_ttt_batch_docs",
    "PHASED_TTT_PREFIX_DOCS": "eval.phased_prefix_docs",
    "PHASED_TTT_NUM_PHASES": "eval.phased_num_phases",
    "GLOBAL_TTT_LR": "eval.phased_lr",
    "GLOBAL_TTT_MOMENTUM": "eval.phased_momentum",
    "GLOBAL_TTT_CHUNK_TOKENS": "eval.phased_chunk_tokens",
    "GLOBAL_TTT_BATCH_SEQS": "eval.phased_batch_seqs",
    "GLOBAL_TTT_GRAD_CLIP": "eval.phased_grad_clip",
    "NGRAM_BASE_BETA": "eval.ngram_base_beta",
    "NGRAM_AGREE_BONUS": "eval.ngram_agree_bonus",
    "NGRAM_OPEN_TABLE_BITS": "eval.ngram_table_bits",
    "NGRAM_ORDER_STRIDE": "eval.ngram_order_stride",
    "NGRAM_TOKEN_THRESHOLD_SCALE": "eval.ngram_token_threshold_scale",
    "NGRAM_WITHIN_THRESHOLD": "eval.ngram_within_threshold",
    "NGRAM_WITHIN_BETA": "eval.ngram_within_beta",
    "NGRAM_WORD_THRESHOLD": "eval.ngram_word_threshold",
    "NGRAM_WORD_BETA": "eval.ngram_word_beta",
}

# Switches that toggle one mode of the eval plan (1 adds it, 0 removes it).
PLAN_SWITCHES: dict[str, str] = {
    "SLIDING_WINDOW_ENABLED": "sliding",
    "TTT_ENABLED": "ttt",
    "NGRAM_TILT_ENABLED": "ngram",
}

# Knobs of the originals that pgolf deliberately does not implement (dead, unused or out of scope).
IGNORED_RECORD_VARS = (
    "MUON_BETA2",
    "ROPE_TRAIN_SEQ_LEN",
    "TTT_HASH_EMBED",
    "TTT_HASH_BUCKETS",
    "ETLB_ENABLED",
    "EMBEDDING_DIM",
)


def _parallel_start(cfg: RunConfig, raw: str, name: str) -> None:
    """PARALLEL_RESIDUAL_START / PARALLEL_START_LAYER: a layer index; negative switches lanes off."""
    try:
        start = int(raw)
    except ValueError:
        raise ConfigError(f"env {name}: expected int, got {raw!r}") from None
    if start < 0:
        cfg.model.parallel_mode = "none"
    else:
        if cfg.model.parallel_mode == "none":
            cfg.model.parallel_mode = "gptj"
        cfg.model.parallel_start = start


def _data_dir(cfg: RunConfig, root: str) -> None:
    """DATA_DIR keeps the records' meaning: a root holding datasets/fineweb10B_sp{V}/ and
    tokenizers/fineweb_{V}_bpe.model (the layout `pgolf data fineweb` also writes)."""
    vocab = cfg.model.vocab_size
    cfg.data.dir = str(Path(root) / "datasets" / f"fineweb10B_sp{vocab}")
    cfg.data.tokenizer = str(Path(root) / "tokenizers" / f"fineweb_{vocab}_bpe.model")


def apply_env(cfg: RunConfig, env: Mapping[str, str]) -> list[str]:
    """Apply record env vars present in `env`; returns the names applied (for the log)."""
    applied = []
    for name, key in ENV_KEYS.items():
        if name in env:
            try:
                set_value(cfg, key, env[name])
            except ConfigError as err:
                raise ConfigError(f"env {name}: {err}") from None
            applied.append(name)
    for name in ("PARALLEL_RESIDUAL_START", "PARALLEL_START_LAYER"):
        if name in env:
            _parallel_start(cfg, env[name], name)
            applied.append(name)
    if "DATA_DIR" in env:
        _data_dir(cfg, env["DATA_DIR"])
        applied.append("DATA_DIR")
    for name, mode in PLAN_SWITCHES.items():
        if name in env:
            value = env[name].strip().lower() in ("1", "true", "yes", "on")
            plan = [m for m in cfg.eval.plan if m != mode]
            cfg.eval.plan = plan + [mode] if value else plan
            applied.append(name)
    return applied


def unused_record_vars(env: Mapping[str, str]) -> list[str]:
    return [name for name in IGNORED_RECORD_VARS if name in env]
