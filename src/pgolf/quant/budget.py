"""Size accounting against the cap (SPEC §4.7) and the time reserved for quantization inside training.

Code bytes are an input here: the caller knows what code ships with the artifact (a bundled train_gpt.py
passes its own size; `pgolf run` / `pgolf quantize` pass pgolf.singlefile.bundle_code_bytes(cfg)).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from pgolf.config.schema import RunConfig

# What the reserve covers: calibration and GPTQ, the work the records' GPTQ_RESERVE_SECONDS stands for.
# Serialising and compressing the artifact comes after the training clock, as in the records (SPEC §9.9),
# except where the track counts it (see quant_reserve_seconds). The GPTQ cost model is calibrated on a
# 2-core CPU at about twice the measured time (docs/performance.md), with RESERVE_SAFETY on top; the CUDA
# numbers are deliberately conservative (the column sweep is launch-bound there).
GPTQ_FLOPS_PER_SECOND = {"cpu": 30e9, "cuda": 2e12}
GPTQ_SECONDS_PER_COLUMN = {"cpu": 1e-3, "cuda": 1e-3}
RESERVE_SAFETY = 1.5
MAX_TIMED_TOKENS = 16_384  # the timed calibration batch is capped so the estimate itself stays ~1 s
RESERVE_FIXED_SECONDS = 2.0
# cpu-golf v2 (SPEC §11.0) puts the per-group encode and the cap fit inside the training budget too, so with
# quant.compressor = "pergroup" or quant.fit_to_cap the estimate adds them: one encode is timed on the
# freshly initialised model quantized by round-to-nearest (same shapes, bits and codecs; the codec time
# depends on the stream's length far more than on its values), and the fit (quant/fit.py) is modelled as
# FIT_ENCODES more encodes (its own first one, the reachability floor, the real-size checks) plus
# FIT_GPTQ_PASSES GPTQ passes (every group's two candidates once, then the requantized groups). The
# measured seconds against this model: docs/cpu-golf.md.
FIT_ENCODES = 4
FIT_GPTQ_PASSES = 4
# Floor of the estimated reserve on CUDA: calibration reads training data, so it must end inside the training
# budget; #1855's 0.5 s let it run to ~604 s, and its compliance rerun (#1851) used 8 s (SPEC-1855 §7.3).
CUDA_MIN_RESERVE_SECONDS = 8.0


@dataclass(frozen=True)
class SizeReport:
    """Artifact + code against the cap; every number is given by the caller."""

    artifact_bytes: int
    code_bytes: int
    cap_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.artifact_bytes + self.code_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.cap_bytes


# ----------------------------------------------------------------------------------- time reserve
@dataclass(frozen=True)
class ReserveEstimate:
    calibration_seconds: float
    gptq_seconds: float
    compress_seconds: float = 0.0  # encode + fit; estimated only for pergroup / fit_to_cap (see above)

    @property
    def total(self) -> float:
        work = self.calibration_seconds + self.gptq_seconds + self.compress_seconds
        return RESERVE_SAFETY * work + RESERVE_FIXED_SECONDS


def gptq_cost_seconds(
    shapes: list[tuple[int, int]], device_type: str = "cpu", block_size: int = 128
) -> float:
    """Modelled GPTQ time for matrices [rows, cols]: factorizations ~cols³, error propagation ~rows·cols²,
    the in-block updates ~rows·cols·block, plus a per-column cost of the sweep (one sweep per shape group)."""
    flops = sum(2 * c**3 + 2 * r * c * c + 2 * r * c * block_size for r, c in shapes)
    columns = sum(c for _, c in set(shapes))
    kind = "cuda" if device_type == "cuda" else "cpu"
    return flops / GPTQ_FLOPS_PER_SECOND[kind] + columns * GPTQ_SECONDS_PER_COLUMN[kind]


def measure_calibration_seconds_per_token(
    cfg: RunConfig, model: torch.nn.Module, device: torch.device
) -> float:
    """Time collect_hessians (forward + hooks, looping on) on one batch of the shape calibration really uses,
    after a warm-up call on that same batch: a single sequence runs several times slower per token on CPU,
    and timing it made the reserve 3x the 24 s the cpu-golf quantization really takes."""
    from pgolf.quant.hessian import collect_hessians

    seq = cfg.data.train_seq_len
    seqs = max(1, min(calibration_batch_tokens(cfg), MAX_TIMED_TOKENS) // seq)
    ids = torch.randint(0, cfg.model.vocab_size, (seqs, seq))
    # The warm-up has the timed batch's shape: a first call at a new shape pays one-time costs (kernel and
    # allocator set-up) that made a cpu-golf v2 estimate 4x the warm time, i.e. ~80 s of a 600 s run.
    collect_hessians(model, [ids], device, cfg.train.autocast, average_across_ranks=False)
    t0 = time.perf_counter()
    collect_hessians(model, [ids], device, cfg.train.autocast, average_across_ranks=False)
    return (time.perf_counter() - t0) / ids.numel()


def measure_encode_seconds(cfg: RunConfig, state: dict[str, torch.Tensor]) -> float:
    """Seconds of one artifact encode (quant.compressor, codecs, reordering) of `state` quantized by
    round-to-nearest with the configured plan."""
    import dataclasses

    from pgolf.model import param_role
    from pgolf.quant.artifact import encode_configured
    from pgolf.quant.scheme import quantize_state_dict

    q = dataclasses.replace(cfg.quant, method="rtn")
    qtensors = quantize_state_dict(state, {}, q, param_role)
    t0 = time.perf_counter()
    encode_configured(qtensors, q)
    return time.perf_counter() - t0


def compress_cost_seconds(encode_seconds: float, gptq_seconds: float, fit_to_cap: bool) -> float:
    """The encode, plus with quant.fit_to_cap the modelled fit (FIT_ENCODES encodes, FIT_GPTQ_PASSES GPTQs)."""
    if not fit_to_cap:
        return encode_seconds
    return (1 + FIT_ENCODES) * encode_seconds + FIT_GPTQ_PASSES * gptq_seconds


def calibration_batch_tokens(cfg: RunConfig) -> int:
    """Tokens in one calibration batch on one rank (whole sequences of training length)."""
    from pgolf.quant.hessian import calibration_seqs_per_batch
    from pgolf.runtime import dist_info

    return calibration_seqs_per_batch(cfg, dist_info().world_size) * cfg.data.train_seq_len


def calibration_tokens(cfg: RunConfig) -> int:
    """Tokens one rank runs through the model during calibration."""
    return calibration_batch_tokens(cfg) * max(cfg.quant.calibration_batches, 0)


def estimate_quant_seconds(
    cfg: RunConfig, device: torch.device | str = "cpu", seconds_per_token: float | None = None
) -> ReserveEstimate:
    """Calibration tokens × seconds per token (measured on `device` unless given) and modelled GPTQ, for the
    model and quantization plan of `cfg`; the encode and fit only for pergroup / fit_to_cap (see the top)."""
    from pgolf.model import GPT, param_role
    from pgolf.quant.scheme import plan_tensors

    device = torch.device(device)
    model = GPT(cfg.model).to(device)
    state = model.state_dict()
    plans = plan_tensors(state, cfg.quant, param_role)
    # only the tensors whose rule quantizes them by GPTQ (quant.embed_method may round the embedding)
    shapes = [tuple(state[p.name].shape) for p in plans if p.scheme.startswith("int") and p.rule.method == "gptq"]
    gptq_on = bool(shapes) and cfg.quant.calibration_batches > 0
    gptq = gptq_cost_seconds(shapes, device.type, cfg.quant.gptq_block_size) if gptq_on else 0.0
    tokens = calibration_tokens(cfg)
    if tokens and seconds_per_token is None:
        seconds_per_token = measure_calibration_seconds_per_token(cfg, model, device)
    compress = 0.0
    if cfg.quant.compressor == "pergroup" or cfg.quant.fit_to_cap:
        encode = measure_encode_seconds(cfg, state)
        compress = compress_cost_seconds(encode, gptq, cfg.quant.fit_to_cap)
    return ReserveEstimate(tokens * (seconds_per_token or 0.0), gptq, compress)


def quant_reserve_seconds(cfg: RunConfig, device: torch.device | str = "cpu") -> float:
    """train.quant_reserve_seconds when >= 0, else the estimate above (with its safety factor; on CUDA at
    least CUDA_MIN_RESERVE_SECONDS)."""
    if cfg.train.quant_reserve_seconds >= 0:
        return float(cfg.train.quant_reserve_seconds)
    estimate = estimate_quant_seconds(cfg, device).total
    return max(estimate, CUDA_MIN_RESERVE_SECONDS) if torch.device(device).type == "cuda" else estimate
