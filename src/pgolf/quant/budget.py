"""Size accounting against the cap (SPEC §4.7) and the time reserved for quantization inside training.

Code bytes (until the bundler exists): the UTF-8 bytes of every pgolf source file that training and
evaluation import. The set is the static transitive closure of `import pgolf...` / `from pgolf... import`
statements (module-level and function-level alike, so lazy imports count) starting from the entry
packages pgolf.train, pgolf.quant and pgolf.eval, plus every parent package `__init__.py` Python runs on
the way; command-line modules (`*.cli`, `pgolf.cli`) and `pgolf.submit` are excluded, and so is
everything outside src/pgolf (benchmarks, tests).
"""

from __future__ import annotations

import ast
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import pgolf
from pgolf.config.schema import RunConfig

PACKAGE_ROOT = Path(pgolf.__file__).resolve().parent
ENTRY_MODULES = ("pgolf.train", "pgolf.quant", "pgolf.eval")

# Modelled costs, calibrated on this project's 2-core CPU (torch 2.13) with other jobs running: the full
# pr1541 GPTQ (66 matrices + 8192x512 embedding) took 68 s of CPU time (190 s wall at load average 6);
# these constants reproduce ~68 s. brotli-11 compressed int6 data at ~0.25 MB/s under the same load.
# CUDA numbers are deliberately conservative (the column sweep is launch-bound there).
GPTQ_FLOPS_PER_SECOND = {"cpu": 6e9, "cuda": 2e12}
GPTQ_SECONDS_PER_COLUMN = {"cpu": 5e-3, "cuda": 1e-3}
COMPRESS_BYTES_PER_SECOND = {"brotli": 0.25e6, "lzma": 0.4e6, "zstd": 0.3e6, "zlib": 2e6}
RESERVE_SAFETY = 1.5
RESERVE_FIXED_SECONDS = 2.0


def _excluded(module: str) -> bool:
    return module == "pgolf.cli" or module.endswith(".cli") or module.startswith("pgolf.submit")


def _module_file(module: str) -> Path | None:
    path = PACKAGE_ROOT.joinpath(*module.split(".")[1:])
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return None


def _imports(module: str, file: Path) -> set[str]:
    """pgolf modules named by the import statements of one file (candidates; non-modules drop out later)."""
    tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
    package = module if file.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "pgolf")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != "pgolf":
                continue
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def code_files(entries: tuple[str, ...] = ENTRY_MODULES) -> list[Path]:
    """The source files counted as code bytes (see the module docstring), sorted."""
    seen: set[str] = set()
    files: set[Path] = set()
    todo = list(entries)
    while todo:
        module = todo.pop()
        if module in seen or _excluded(module):
            continue
        seen.add(module)
        file = _module_file(module)
        if file is None:
            continue
        files.add(file)
        parts = module.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages run first
        todo.extend(_imports(module, file))
    return sorted(files)


def code_bytes(entries: tuple[str, ...] = ENTRY_MODULES) -> int:
    """UTF-8 bytes of the counted source files (file sizes: the files are UTF-8 text)."""
    return sum(f.stat().st_size for f in code_files(entries))


@dataclass(frozen=True)
class SizeReport:
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
    compress_seconds: float

    @property
    def total(self) -> float:
        raw = self.calibration_seconds + self.gptq_seconds + self.compress_seconds
        return RESERVE_SAFETY * raw + RESERVE_FIXED_SECONDS


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
    """Time collect_hessians (forward + hooks, looping on) on two sequences of training length."""
    from pgolf.quant.hessian import collect_hessians

    seq = cfg.data.train_seq_len
    ids = torch.randint(0, cfg.model.vocab_size, (1, seq))
    collect_hessians(model, [ids], device, cfg.train.autocast, average_across_ranks=False)  # warm-up
    t0 = time.perf_counter()
    collect_hessians(model, [ids, ids], device, cfg.train.autocast, average_across_ranks=False)
    return (time.perf_counter() - t0) / (2 * seq)


def calibration_tokens(cfg: RunConfig) -> int:
    """Tokens one rank runs through the model during calibration."""
    from pgolf.runtime import dist_info
    from pgolf.train.loop import grad_accum_steps

    q = cfg.quant
    if q.calibration_batch_tokens > 0:
        per_batch = q.calibration_batch_tokens // cfg.data.train_seq_len * cfg.data.train_seq_len
    else:
        world = dist_info().world_size
        per_batch = cfg.data.train_batch_tokens // (world * grad_accum_steps(cfg, world))
    return per_batch * max(q.calibration_batches, 0)


def estimate_quant_seconds(
    cfg: RunConfig, device: torch.device | str = "cpu", seconds_per_token: float | None = None
) -> ReserveEstimate:
    """Calibration tokens × seconds per token (measured on `device` unless given) + modelled GPTQ +
    modelled compression, for the model and quantization plan of `cfg`."""
    from pgolf.model import GPT, param_role
    from pgolf.quant.scheme import plan_tensors

    device = torch.device(device)
    model = GPT(cfg.model).to(device)
    state = model.state_dict()
    plans = plan_tensors(state, cfg.quant, param_role)
    quantized = [p for p in plans if p.scheme.startswith("int")]
    shapes = [tuple(state[p.name].shape) for p in quantized]
    gptq_on = cfg.quant.method == "gptq" and cfg.quant.calibration_batches > 0
    gptq = gptq_cost_seconds(shapes, device.type, cfg.quant.gptq_block_size) if gptq_on else 0.0
    payload = sum(state[p.name].numel() for p in quantized) + sum(
        2 * state[p.name].numel() for p in plans if p.scheme == "fp16"
    )
    compress = payload / COMPRESS_BYTES_PER_SECOND[cfg.quant.compressor]
    tokens = calibration_tokens(cfg)
    if tokens and seconds_per_token is None:
        seconds_per_token = measure_calibration_seconds_per_token(cfg, model, device)
    return ReserveEstimate(tokens * (seconds_per_token or 0.0), gptq, compress)


def quant_reserve_seconds(cfg: RunConfig, device: torch.device | str = "cpu") -> float:
    """train.quant_reserve_seconds when >= 0, else the estimate above (with its safety factor)."""
    if cfg.train.quant_reserve_seconds >= 0:
        return float(cfg.train.quant_reserve_seconds)
    return estimate_quant_seconds(cfg, device).total
