"""RUN_DIR/model.pt -> RUN_DIR/model.ptz + quant.json (calibrate, quantize, write, account), and back.

`quantize_run(run_dir, code_bytes=N)` loads config.toml and the EMA weights, collects Hessians on training data,
quantizes per the config, writes the artifact atomically, and checks artifact + code bytes against the
cap. Over the cap the file is kept as model.over_cap.ptz (a stale model.ptz is removed), quant.json still
records the numbers, and OverCapError is raised (the CLI exits non-zero).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from pgolf import rundir
from pgolf.config import RunConfig, load_run_config, to_toml, validate
from pgolf.config.overrides import apply_sets
from pgolf.fileio import atomic_write_bytes, atomic_write_json
from pgolf.quant.artifact import ArtifactError, encode_configured, read_artifact
from pgolf.quant.budget import SizeReport
from pgolf.quant.codecs import check_codec_names
from pgolf.quant.fit import FitError, fit_to_cap
from pgolf.quant.hessian import collect_run_hessians
from pgolf.quant.pergroup import check_reorder_groups
from pgolf.quant.rules import rules_from_config
from pgolf.quant.scheme import QuantizedTensor, dequantize_state_dict, lqer_tensors, quantize_state_dict

ARTIFACT_NAME = rundir.ARTIFACT
OVER_CAP_NAME = rundir.OVER_CAP_ARTIFACT


class OverCapError(ValueError):
    """Artifact + code bytes exceed quant.cap_bytes; `report` holds the quant.json numbers."""

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report


def load_trained_model(
    run_dir: str | Path, cfg: RunConfig, device: torch.device | str = "cpu"
) -> torch.nn.Module:
    """GPT with RUN_DIR/model.pt loaded (a plain state_dict; read with weights_only, never unpickling code)."""
    from pgolf.model import GPT

    path = rundir.path(run_dir, rundir.MODEL)
    state = rundir.load_weights(path)
    model = GPT(cfg.model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not match the model of config.toml: {err}") from None
    return model.to(device)


def class_table(
    qtensors: dict[str, QuantizedTensor],
    frame_bytes: dict[str, int],
    groups: dict[str, dict[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """{class: {params, bits, bytes, bits_per_weight}}: bytes = the class's compressed frame. A per-group
    artifact (`groups`: encode_pergroup's report) has a row per group instead, with its coding report."""
    from pgolf.quant.pergroup import group_of

    table = {}
    for cls, nbytes in frame_bytes.items():
        if cls == "header":
            continue
        key = group_of if groups is not None else (lambda qt: qt.cls)
        members = [qt for qt in qtensors.values() if key(qt) == cls]
        params = sum(qt.data.numel() for qt in members)
        table[cls] = {
            "params": params,
            "bits": max((qt.bits for qt in members), default=0),
            "bytes": nbytes,
            "bits_per_weight": round(8.0 * nbytes / max(params, 1), 4),
        }
        if groups is not None:
            table[cls].update(groups[cls])
    return table


def quantize_run(
    run_dir: str | Path,
    sets: list[str] | None = None,
    verbose: bool = True,
    *,
    code_bytes: int,
) -> dict[str, Any]:
    """Quantize a trained run directory; returns the quant.json dict (see the module docstring).

    `code_bytes`: the size of the code that ships with the artifact, supplied by the caller (a bundled
    train_gpt.py passes its own size, `pgolf run` / `pgolf quantize` pgolf.singlefile.bundle_code_bytes)."""
    from pgolf.model import param_role
    from pgolf.runtime import init_distributed

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    if sets:
        apply_sets(cfg, sets)
        validate(cfg)
    if cfg.quant.compressor == "pergroup":
        check_codec_names(cfg.quant.codecs)
    rules_from_config(cfg.quant)  # a bad rule field fails here, before calibration
    dist = init_distributed(cfg.train.device)
    model = load_trained_model(run_dir, cfg, dist.device)
    if cfg.quant.compressor == "pergroup":
        check_reorder_groups(model.state_dict(), param_role, cfg.quant.reorder_groups)

    looping = rundir.looping_after_training(run_dir, cfg)  # the looping state eval will use too
    hessians, hessian_seconds = collect_run_hessians(model, cfg, dist, looping)
    t0 = time.perf_counter()
    qtensors = quantize_state_dict(model.state_dict(), hessians, cfg.quant, param_role, dist.device)
    gptq_seconds = time.perf_counter() - t0

    q = cfg.quant
    meta = {
        "preset": cfg.preset,
        "method": q.method,
        "matrix_bits": q.matrix_bits,
        "embed_bits": q.embed_bits,
    }
    t0 = time.perf_counter()
    encoded = encode_configured(qtensors, q, meta)
    fit = None
    budget = q.cap_bytes - (code_bytes if q.cap_counts_code else 0)
    if q.fit_to_cap and len(encoded[0]) > budget:  # FitError (before eval) when it cannot fit
        log = print if verbose and dist.is_main else (lambda _: None)
        encode = lambda qts: encode_configured(qts, q, meta)
        try:
            qtensors, encoded, fit = fit_to_cap(
                model.state_dict(), hessians, qtensors, q, budget, encode, param_role, dist.device, log
            )
        except FitError:
            if dist.is_main:
                (run_dir / ARTIFACT_NAME).unlink(missing_ok=True)  # never leave a stale artifact
            raise
    blob, frame_bytes, groups = encoded
    compress_seconds = time.perf_counter() - t0
    size = SizeReport(len(blob), code_bytes if q.cap_counts_code else 0, q.cap_bytes)
    report: dict[str, Any] = {
        "artifact_bytes": size.artifact_bytes,
        "code_bytes": size.code_bytes,
        "total_bytes": size.total_bytes,
        "cap_bytes": size.cap_bytes,
        "fits": size.fits,
        "compressor": q.compressor,
        "shuffle": q.shuffle,
        "method": q.method,
        "classes": class_table(qtensors, frame_bytes, groups),
        "header_bytes": frame_bytes["header"],
        "hessians": len(hessians),
        "hessian_seconds": round(hessian_seconds, 3),
        "gptq_seconds": round(gptq_seconds, 3),
        "compress_seconds": round(compress_seconds, 3),
        "artifact": ARTIFACT_NAME if size.fits else OVER_CAP_NAME,
    }
    if not q.cap_counts_code:
        report.update(code_bytes=code_bytes, total_bytes=size.artifact_bytes + code_bytes, cap_counts_code=False)
    if fit is not None:
        report["fit"] = fit
    if q.lqer_top_k:
        report["lqer"] = lqer_tensors(qtensors)
    if q.clip_mode == "search":
        report["clip_search"] = {n: round(qt.clip_sigmas, 4) for n, qt in qtensors.items() if qt.clip_sigmas}
    if not dist.is_main:
        return report

    target = run_dir / report["artifact"]
    rundir.invalidate_from(run_dir, "quant")  # no earlier artifact, eval or summary outlives this one
    atomic_write_bytes(target, blob)
    atomic_write_json(rundir.path(run_dir, rundir.QUANT_JSON), report)
    rundir.record_stage(run_dir, "quant", to_toml(cfg), [rundir.MODEL])
    if verbose:
        print_report(report)
    if not size.fits:
        raise OverCapError(
            f"{target}: total {size.total_bytes:,} bytes (artifact {size.artifact_bytes:,} + code "
            f"{size.code_bytes:,}) exceeds quant.cap_bytes={size.cap_bytes:,} by "
            f"{size.total_bytes - size.cap_bytes:,}; kept as {OVER_CAP_NAME}",
            report,
        )
    return report


def print_report(report: dict[str, Any]) -> None:
    for cls, row in report["classes"].items():
        print(
            f"quant {cls:8s} params {row['params']:>11,}  bits {row['bits']:2d}  "
            f"bytes {row['bytes']:>11,}  bits/weight {row['bits_per_weight']:.3f}"
        )
    print(
        f"quant artifact {report['artifact_bytes']:,} B + code {report['code_bytes']:,} B = total "
        f"{report['total_bytes']:,} B (cap {report['cap_bytes']:,}); hessians {report['hessian_seconds']:.1f} s, "
        f"gptq {report['gptq_seconds']:.1f} s, compress {report['compress_seconds']:.1f} s"
    )


def load_artifact_model(
    path: str | Path, cfg: RunConfig, device: torch.device | str = "cpu"
) -> torch.nn.Module:
    """A GPT rebuilt from the artifact for eval: dequantized weights cast to the model's own dtypes
    (fp32 linears and control tensors, bf16 tok_emb), looping on, eval mode."""
    from pgolf.model import GPT

    qtensors, _ = read_artifact(path)
    state = dequantize_state_dict(qtensors)
    model = GPT(cfg.model)
    template = model.state_dict()
    missing = sorted(set(template) - set(state))
    extra = sorted(set(state) - set(template))
    if missing or extra:
        raise ArtifactError(
            f"{path}: tensors do not match the config's model: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    for name, ref in template.items():
        if tuple(state[name].shape) != tuple(ref.shape):
            raise ArtifactError(
                f"{path}: tensor {name} has shape {tuple(state[name].shape)}, the model expects {tuple(ref.shape)}"
            )
        state[name] = state[name].to(ref.dtype)
    model.load_state_dict(state, strict=True)
    model.set_looping(True)
    return model.to(device).eval()
