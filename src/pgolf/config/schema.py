"""The RunConfig dataclass tree: every knob of a pgolf run, one section per pipeline stage.

Field defaults are the #1394 record script's defaults (SPEC §7); presets change what a recipe changes.
Each field's comment names the record scripts' environment variable when one exists (see env.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pgolf.eval.modes import EVAL_MODES  # noqa: F401  (re-exported: the eval-mode registry owns the names)


@dataclass
class DataConfig:
    dir: str = "data/datasets/fineweb10B_sp8192"  # DATA_DIR: folder with fineweb_{train,val}_*.bin
    tokenizer: str = ""  # SentencePiece model; "" = DIR/tokenizer.model
    train_seq_len: int = 2048  # TRAIN_SEQ_LEN
    train_batch_tokens: int = 786_432  # TRAIN_BATCH_TOKENS (global, per optimizer step)
    grad_accum: int = 0  # micro-steps per step on each rank; 0 = 8 // world_size as the records
    shuffle_seed: int = 0  # loader RNG = PCG64(rank) when 0 (records); PCG64([seed, rank]) otherwise
    max_val_tokens: int = 0  # 0 = the whole val stream; >0 truncates it (quick checks only)


@dataclass
class ModelConfig:
    vocab_size: int = 8192  # VOCAB_SIZE
    num_layers: int = 11  # NUM_LAYERS (physical blocks)
    model_dim: int = 512  # MODEL_DIM
    num_heads: int = 8  # NUM_HEADS
    num_kv_heads: int = 4  # NUM_KV_HEADS
    mlp_mult: float = 4.0  # MLP_MULT
    mlp_activation: str = "leaky_relu2"  # leaky_relu2 (records) | relu2 (baseline)
    tie_embeddings: bool = True  # TIE_EMBEDDINGS
    tied_embed_init_std: float = 0.005  # TIED_EMBED_INIT_STD
    logit_softcap: float = 30.0  # LOGIT_SOFTCAP (0 = off)
    rope_base: float = 10000.0  # ROPE_BASE
    rope_dims: int = 16  # ROPE_DIMS (0 = rotate all head dims)
    qk_norm: bool = True  # RMS-normalise q and k per head
    qk_gain_init: float = 4.0  # QK_GAIN_INIT
    ln_scale: bool = True  # LN_SCALE: layerwise 1/sqrt(l+1)
    xsa_last_n: int = 11  # XSA_LAST_N (0 = off)
    resid_mix: bool = True  # learnable mix with x0 in every block
    unet_skips: bool = True  # encoder/decoder skip connections
    skip_gates: bool = True  # SKIP_GATES_ENABLED
    num_loops: int = 2  # NUM_LOOPS (0 = no depth recurrence)
    loop_start: int = 4  # LOOP_START
    loop_end: int = 5  # LOOP_END
    enable_looping_at: float = 0.5  # ENABLE_LOOPING_AT (training fraction)
    parallel_mode: str = "none"  # none | gptj (#1493) | lanes1541 | lanes1529
    parallel_start: int = 7  # PARALLEL_RESIDUAL_START (physical layer index)
    parallel_final_lane: str = "mlp"  # PARALLEL_FINAL_LANE: mlp | mean | attn (lanes modes)
    attention_backend: str = "auto"  # auto (FA3 on CUDA when importable, else SDPA) | flash | sdpa
    rope_ntk_len: int = 2048  # RoPE base rescaled NTK-style for calls longer than this; 0 = never (#1855 ROPE_YARN=0)
    smear_gate: bool = False  # SMEAR_GATE_ENABLED (#1855): gated smear of the previous embedding, never into a BOS
    sparse_attn_gate: bool = False  # SPARSE_ATTN_GATE_ENABLED (#1855): per-head sigmoid gate on attention outputs
    sparse_attn_gate_scale: float = 1.0  # SPARSE_ATTN_GATE_SCALE (#1855 ran 0.5)
    gate_window: int = 12  # GATE_WINDOW: leading input dims read by the smear and sparse attention gates
    doc_attention: bool = False  # per-document attention: no position attends across a BOS (#1855 varlen)
    fused_ce: bool = False  # FUSED_CE_ENABLED (#1855): training loss = fused softcapped CE on the raw logits


@dataclass
class OptimConfig:
    matrix_lr: float = 0.02  # MATRIX_LR (Muon)
    scalar_lr: float = 0.02  # SCALAR_LR
    tied_embed_lr: float = 0.03  # TIED_EMBED_LR
    embed_lr: float = 0.6  # EMBED_LR (untied only)
    head_lr: float = 0.008  # HEAD_LR (untied only)
    muon_momentum: float = 0.99  # MUON_MOMENTUM
    muon_momentum_warmup_start: float = 0.92  # MUON_MOMENTUM_WARMUP_START
    muon_momentum_warmup_steps: int = 1500  # MUON_MOMENTUM_WARMUP_STEPS
    muon_momentum_warmup_frac: float = 0.0  # >0: warm up over this training fraction instead of steps
    muon_backend_steps: int = 5  # MUON_BACKEND_STEPS
    muon_row_normalize: bool = True  # MUON_ROW_NORMALIZE (MuonEq-R)
    muon_ns_dtype: str = "auto"  # Newton–Schulz precision: auto (bf16 where fast, as train.autocast) | bf16 | fp32
    muon_ns_coeffs: str = "quintic"  # quintic: (3.4445, −4.775, 2.0315) every step | polar_express (#1855, <= 5 steps)
    muon_momentum_dtype: str = "fp32"  # Muon momentum buffer: fp32 | bf16 (#1529/#1557 parallel Muon keep it in bf16)
    muon_nesterov: bool = True
    muon_wd: float = 0.085  # MUON_WD
    beta1: float = 0.9  # BETA1
    beta2: float = 0.95  # BETA2
    adam_eps: float = 1e-8  # ADAM_EPS
    adam_wd: float = 0.02  # ADAM_WD
    embed_wd: float = 0.085  # EMBED_WD
    grad_clip_norm: float = 0.3  # GRAD_CLIP_NORM (0 = off)
    warmdown_frac: float = 0.667  # WARMDOWN_FRAC
    warmdown_iters: int = 0  # >0: warmdown spans this many steps at the measured mean step time (baseline)
    min_lr: float = 0.0  # MIN_LR: floor on the warmdown factor, lr = base·max((1 − frac)/W, MIN_LR)
    ema_decay: float = 0.997  # EMA_DECAY (0 = no EMA: export the live weights)
    ema_start_frac: float = 0.0  # EMA tracks the live weights until this training fraction


@dataclass
class TrainConfig:
    seed: int = 1337  # SEED
    iterations: int = 20_000  # ITERATIONS
    max_wallclock_seconds: float = 600.0  # MAX_WALLCLOCK_SECONDS (0 = unlimited: frac = step/ITERATIONS)
    quant_reserve_seconds: float = -1.0  # GPTQ_RESERVE_SECONDS; <0 = estimate from the model's shapes
    warmup_steps: int = 20  # WARMUP_STEPS: compile warm-up steps, state restored afterwards
    log_every: int = 500  # TRAIN_LOG_EVERY
    val_every: int = 4000  # VAL_LOSS_EVERY (0 = only at the end)
    val_max_tokens: int = 0  # periodic val on the first N val tokens (0 = all)
    checkpoint_every: int = 0  # steps between resumable checkpoints (0 = only on SIGTERM/end)
    compile: str = "auto"  # auto (CUDA yes, CPU no) | on | off
    autocast: str = "auto"  # auto (bf16 on CUDA and AMX/AVX512-BF16 CPUs, else fp32) | bf16 | off
    device: str = "auto"  # auto | cpu | cuda
    checkpoint_seconds: float = 60.0  # also checkpoint every N training seconds (0 = off); counts as training time


@dataclass
class QuantConfig:
    method: str = "gptq"  # gptq | rtn (round to nearest with the same scales; the baseline's int8)
    # the tied embedding / head: "" = quant.method. GPTQ fits the tied table to its head Hessian only and
    # can raise its token-lookup error (docs/quantization.md), so it may be rounded to nearest instead.
    embed_method: str = ""
    clip_percentile: float = (
        0.0  # >0: per-row clip at this |w| percentile instead of SDClip (baseline 99.99984)
    )
    calibration_batches: int = 64  # GPTQ_CALIBRATION_BATCHES
    calibration_batch_tokens: int = 0  # tokens per calibration batch per rank; 0 = a training micro-batch
    matrix_bits: int = 6  # MATRIX_BITS; 2-8, or 16 = fp16 (no quantization)
    embed_bits: int = 8  # EMBED_BITS; 2-8, or 16 = fp16
    matrix_clip_sigmas: float = 12.85  # MATRIX_CLIP_SIGMAS
    embed_clip_sigmas: float = 20.0  # EMBED_CLIP_SIGMAS
    hessian_clip_lambda: float = 0.0  # HESSIAN_CLIP_LAMBDA (0 = plain SDClip)
    hessian_clip_embed: bool = False  # apply the Hessian-aware clip to the embedding too (#1557)
    gptq_damp: float = 0.01  # GPTQ_DAMP
    gptq_block_size: int = 128
    passthrough: str = "role"  # role (control/scalar tensors stay fp16) | size (<= 65,536 elements, records)
    average_hessians: bool = True  # all-reduce Hessians across ranks (records: per-rank)
    compressor: str = "brotli"  # COMPRESSOR: brotli | lzma | zstd | zlib
    shuffle: str = "bshf2"  # byte shuffle before compression: bshf2 (records) | planes (fp16 arrays) | none
    cap_bytes: int = 16_000_000  # code + artifact must fit (decimal bytes)
    packed_code: bool = True  # count (and bundle) train_gpt.py in the lzma+base85 self-extracting form
    # compressor=pergroup (SPEC-1855 §5): the codecs tried per group (pgolf.quant.codecs) and the code
    # groups whose rows are similarity-sorted when that pays for the permutation
    codecs: list[str] = field(
        default_factory=lambda: [
            "raw", "brotli", "lzma", "lzma_raw", "zstd", "ppmd2", "ppmd4", "ppmd8", "ppmd16", "ans"
        ]
    )
    reorder_groups: list[str] = field(default_factory=lambda: ["embed", "attn.c_q", "mlp.fc"])
    fit_to_cap: bool = False  # over the cap: coarsen the cheapest code groups until it fits (quant/fit.py)
    cap_counts_code: bool = True  # False: the cap bounds model.ptz alone (cpu-golf v2, SPEC §11.0)
    # Per-tensor rules (pgolf.quant.rules): 0 = the class default, i.e. the plan of the record presets.
    attn_clip_sigmas: float = 0.0  # ATTN_CLIP_SIGMAS; 0 = matrix_clip_sigmas
    mlp_clip_sigmas: float = 0.0  # MLP_CLIP_SIGMAS; 0 = matrix_clip_sigmas
    head_bits: int = 0  # untied lm_head bits; 0 = embed_bits
    head_clip_sigmas: float = 0.0  # untied lm_head clip; 0 = embed_clip_sigmas
    clip_mode: str = "sigma"  # sigma (k as given) | step (k scaled with the width) | search (k per tensor)
    gate_int8: bool = False  # GATED_ATTN_QUANT_GATE: .attn_gate_w int8 per row (SPEC-1855 §4.3)
    lqer_top_k: int = 0  # LQER_TOP_K; 0 = no LQER correction (SPEC-1855 §4.4)
    lqer_rank: int = 4  # LQER_RANK
    lqer_group: int = 64  # LQER_ASYM_GROUP


@dataclass
class EvalConfig:
    seq_len: int = 2048  # EVAL_SEQ_LEN
    stride: int = 64  # EVAL_STRIDE
    batch_seqs: int = 32  # windows per forward batch
    plan: list[str] = field(default_factory=lambda: ["prequant", "quant", "sliding"])
    time_budget_seconds: float = 600.0  # all eval modes together
    ttt_lr: float = 0.005  # TTT_LR
    ttt_epochs: int = 3  # TTT_EPOCHS
    ttt_momentum: float = 0.9  # TTT_MOMENTUM
    ttt_chunk_tokens: int = 32_768  # TTT_CHUNK_TOKENS
    ttt_freeze_blocks: int = 0  # TTT_FREEZE_BLOCKS (first N blocks frozen)
    ttt_batch_seqs: int = 32  # TTT_BATCH_SEQS
    ttt_grad_clip: float = 1.0  # TTT_GRAD_CLIP
    ngram_base_beta: float = 2.0  # NGRAM_BASE_BETA
    ngram_agree_bonus: float = 0.1  # NGRAM_AGREE_BONUS
    ngram_min_order: int = 8
    ngram_max_order: int = 16
    ngram_order_stride: int = 2  # NGRAM_ORDER_STRIDE
    ngram_token_threshold_scale: float = 1.0  # NGRAM_TOKEN_THRESHOLD_SCALE
    ngram_table_bits: int = 26  # NGRAM_OPEN_TABLE_BITS
    ngram_experts: bool = False  # #1557's within-word and word experts (at β 0 they feed the agree bonus)
    ngram_within_threshold: float = 0.25  # NGRAM_WITHIN_THRESHOLD
    ngram_within_beta: float = 0.0  # NGRAM_WITHIN_BETA
    ngram_word_threshold: float = 0.8  # NGRAM_WORD_THRESHOLD
    ngram_word_beta: float = 0.0  # NGRAM_WORD_BETA
    ngram_expert_table_bits: int = 20  # slots per expert table (2^20 in #1557)
    # Phased score-first TTT with per-document LoRA (mode lora_ttt; SPEC-1855 part B §3.3-3.6 run values)
    lora_ttt_rank: int = 80  # TTT_LORA_RANK
    lora_ttt_alpha: float = 144.0  # TTT_LORA_ALPHA
    lora_ttt_lr: float = 1e-4  # TTT_LORA_LR
    lora_ttt_beta1: float = 0.0  # TTT_BETA1
    lora_ttt_beta2: float = 0.99  # TTT_BETA2
    lora_ttt_eps: float = 1e-10
    lora_ttt_weight_decay: float = 0.5  # TTT_WEIGHT_DECAY
    lora_ttt_chunk: int = 48  # TTT_CHUNK_SIZE: targets scored per chunk (then one AdamW step)
    lora_ttt_context: int = 2048  # TTT_EVAL_SEQ_LEN: most tokens of its own document a chunk sees
    lora_ttt_batch_docs: int = 64  # TTT_BATCH_SIZE: documents per batch (one adapter each)
    lora_ttt_seed: int = 0  # the adapters' A initialisation
    phased_num_phases: int = 3  # PHASED_TTT_NUM_PHASES (0 = no global SGD)
    phased_prefix_docs: int = 2500  # PHASED_TTT_PREFIX_DOCS
    phased_prefix_frac: float = 0.05  # and at most this fraction of the val documents (0 = no limit)
    phased_lr: float = 1e-3  # GLOBAL_TTT_LR
    phased_momentum: float = 0.9  # GLOBAL_TTT_MOMENTUM
    phased_chunk_tokens: int = 32_768  # GLOBAL_TTT_CHUNK_TOKENS
    phased_batch_seqs: int = 32  # GLOBAL_TTT_BATCH_SEQS
    phased_grad_clip: float = 1.0  # GLOBAL_TTT_GRAD_CLIP


@dataclass
class RunConfig:
    preset: str = "pr1394"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


SECTIONS = ("data", "model", "optim", "train", "quant", "eval")

# The allowed values of every closed or bounded field, declared once: set_value() checks a key as it is set,
# validate() checks a whole RunConfig (presets, TOML, env, --set alike), and `pgolf config keys` prints them.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.mlp_activation": ("leaky_relu2", "relu2"),
    "model.parallel_mode": ("none", "gptj", "lanes1541", "lanes1529"),
    "model.parallel_final_lane": ("mlp", "mean", "attn"),
    "model.attention_backend": ("auto", "flash", "sdpa"),
    "optim.muon_ns_dtype": ("auto", "bf16", "fp32"),
    "optim.muon_ns_coeffs": ("quintic", "polar_express"),
    "optim.muon_momentum_dtype": ("fp32", "bf16"),
    "train.compile": ("auto", "on", "off"),
    "train.autocast": ("auto", "bf16", "off"),
    "train.device": ("auto", "cpu", "cuda"),
    "quant.passthrough": ("role", "size"),
    "quant.compressor": ("brotli", "lzma", "zstd", "zlib", "pergroup"),
    "quant.shuffle": ("none", "bshf2", "planes"),
    "quant.method": ("gptq", "rtn"),
    "quant.embed_method": ("", "gptq", "rtn"),
    "quant.clip_mode": ("sigma", "step", "search"),
}
@dataclass(frozen=True)
class Range:
    """An interval of allowed numbers; `low`/`high` None = unbounded, `*_open` = the bound itself is excluded."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def __str__(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return " and ".join(parts)


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1)  # [0, 1]
DECAY = Range(0, 1, high_open=True)  # [0, 1): momenta, betas, EMA decays

RANGES: dict[str, Range] = {
    "data.train_seq_len": POSITIVE,
    "data.train_batch_tokens": POSITIVE,
    "data.grad_accum": NON_NEGATIVE,
    "data.shuffle_seed": NON_NEGATIVE,
    "data.max_val_tokens": NON_NEGATIVE,
    "model.vocab_size": Range(1, 65536),  # uint16 shards
    "model.num_layers": POSITIVE,
    "model.model_dim": POSITIVE,
    "model.num_heads": POSITIVE,
    "model.num_kv_heads": POSITIVE,
    "model.mlp_mult": POSITIVE,
    "model.tied_embed_init_std": NON_NEGATIVE,
    "model.logit_softcap": NON_NEGATIVE,
    "model.rope_base": POSITIVE,
    "model.rope_dims": NON_NEGATIVE,
    "model.xsa_last_n": NON_NEGATIVE,
    "model.num_loops": NON_NEGATIVE,
    "model.loop_start": NON_NEGATIVE,
    "model.loop_end": NON_NEGATIVE,
    "model.enable_looping_at": FRACTION,
    "model.parallel_start": NON_NEGATIVE,
    "optim.matrix_lr": NON_NEGATIVE,
    "optim.scalar_lr": NON_NEGATIVE,
    "optim.tied_embed_lr": NON_NEGATIVE,
    "optim.embed_lr": NON_NEGATIVE,
    "optim.head_lr": NON_NEGATIVE,
    "optim.muon_momentum": DECAY,
    "optim.muon_momentum_warmup_start": DECAY,
    "optim.muon_momentum_warmup_steps": NON_NEGATIVE,
    "optim.muon_momentum_warmup_frac": FRACTION,
    "optim.muon_backend_steps": Range(1),
    "optim.muon_wd": NON_NEGATIVE,
    "optim.beta1": DECAY,
    "optim.beta2": DECAY,
    "optim.adam_eps": POSITIVE,
    "optim.adam_wd": NON_NEGATIVE,
    "optim.embed_wd": NON_NEGATIVE,
    "optim.grad_clip_norm": NON_NEGATIVE,
    "optim.warmdown_frac": FRACTION,
    "optim.warmdown_iters": NON_NEGATIVE,
    "optim.min_lr": FRACTION,
    "optim.ema_decay": DECAY,
    "optim.ema_start_frac": FRACTION,
    "train.iterations": NON_NEGATIVE,
    "train.max_wallclock_seconds": NON_NEGATIVE,
    "train.warmup_steps": NON_NEGATIVE,
    "train.log_every": NON_NEGATIVE,
    "train.val_every": NON_NEGATIVE,
    "train.val_max_tokens": NON_NEGATIVE,
    "train.checkpoint_every": NON_NEGATIVE,
    "train.checkpoint_seconds": NON_NEGATIVE,
    "quant.clip_percentile": Range(0, 100),
    "quant.calibration_batches": NON_NEGATIVE,
    "quant.calibration_batch_tokens": NON_NEGATIVE,
    "quant.matrix_clip_sigmas": POSITIVE,
    "quant.embed_clip_sigmas": POSITIVE,
    "quant.hessian_clip_lambda": NON_NEGATIVE,
    "quant.gptq_damp": NON_NEGATIVE,
    "quant.gptq_block_size": POSITIVE,
    "quant.cap_bytes": POSITIVE,
    "eval.seq_len": POSITIVE,
    "eval.stride": POSITIVE,
    "eval.batch_seqs": POSITIVE,
    "eval.time_budget_seconds": NON_NEGATIVE,
    "eval.ttt_lr": NON_NEGATIVE,
    "eval.ttt_epochs": NON_NEGATIVE,
    "eval.ttt_momentum": DECAY,
    "eval.ttt_chunk_tokens": POSITIVE,
    "eval.ttt_freeze_blocks": NON_NEGATIVE,
    "eval.ttt_batch_seqs": POSITIVE,
    "eval.ttt_grad_clip": NON_NEGATIVE,
    "eval.lora_ttt_rank": POSITIVE,
    "eval.lora_ttt_alpha": NON_NEGATIVE,
    "eval.lora_ttt_lr": NON_NEGATIVE,
    "eval.lora_ttt_beta1": DECAY,
    "eval.lora_ttt_beta2": DECAY,
    "eval.lora_ttt_eps": POSITIVE,
    "eval.lora_ttt_weight_decay": NON_NEGATIVE,
    "eval.lora_ttt_chunk": POSITIVE,
    "eval.lora_ttt_context": POSITIVE,
    "eval.lora_ttt_batch_docs": POSITIVE,
    "eval.lora_ttt_seed": NON_NEGATIVE,
    "eval.phased_num_phases": NON_NEGATIVE,
    "eval.phased_prefix_docs": NON_NEGATIVE,
    "eval.phased_prefix_frac": FRACTION,
    "eval.phased_lr": NON_NEGATIVE,
    "eval.phased_momentum": DECAY,
    "eval.phased_chunk_tokens": POSITIVE,
    "eval.phased_batch_seqs": POSITIVE,
    "eval.phased_grad_clip": NON_NEGATIVE,
    "eval.ngram_base_beta": NON_NEGATIVE,
    "eval.ngram_agree_bonus": NON_NEGATIVE,
    "eval.ngram_min_order": POSITIVE,
    "eval.ngram_max_order": POSITIVE,
    "eval.ngram_order_stride": POSITIVE,
    "eval.ngram_token_threshold_scale": NON_NEGATIVE,
    "eval.ngram_table_bits": Range(1, 32),
    "eval.ngram_within_threshold": FRACTION,
    "eval.ngram_within_beta": NON_NEGATIVE,
    "eval.ngram_word_threshold": FRACTION,
    "eval.ngram_word_beta": NON_NEGATIVE,
    "eval.ngram_expert_table_bits": Range(4, 32),
}
