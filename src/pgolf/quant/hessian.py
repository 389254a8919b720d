"""Calibration (SPEC §4.2): H = XᵀX of the input of every quantized matrix, via forward hooks.

* Each `nn.Linear` whose weight has role "matrix" gets a hook that adds XᵀX of its input rows (fp32 per
  forward call, accumulated in float64). With looping on, a looped block's hooks fire once per pass, so
  its Hessian sums every pass, as in the records.
* The tied embedding (and an untied lm_head) is the output head: its input is the output of
  `model.final_norm`, so its H comes from a hook on that module.
* H is divided by the number of batches and, by default, averaged across ranks (quant.average_hessians;
  the records keep per-rank Hessians, which makes the artifact depend on rank 0's data, SPEC §9.7).
* Batches come from a fresh ShuffledSequenceLoader over the training shards (never val), under the
  same autocast as training, in eval mode with no grad.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from pgolf.config.schema import RunConfig
from pgolf.runtime import DistInfo, all_reduce_, autocast, dist_info


def hessian_targets(model: nn.Module) -> tuple[dict[str, nn.Linear], list[str]]:
    """({param name: Linear} of the quantized matrices, [param names whose H is the final_norm output])."""
    from pgolf.model import param_role

    linears = {}
    for mod_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            pname = f"{mod_name}.weight"
            if param_role(pname, module.weight) == "matrix":
                linears[pname] = module
    head = []
    if getattr(model, "lm_head", None) is not None:
        head.append("lm_head.weight")
    else:
        head.append("tok_emb.weight")
    return linears, head


def collect_hessians(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    device: torch.device | str = "cpu",
    autocast_mode: str = "auto",
    average_across_ranks: bool = True,
    looping: bool = True,
) -> dict[str, torch.Tensor]:
    """{param name: H [cols, cols] fp32} over `batches` (token id tensors [B, T]); see the module doc.

    `looping`: the depth-recurrence state to calibrate in, which must be the one eval will use (SPEC §2.5:
    on; a run whose training never switched looping on is evaluated, hence calibrated, without it)."""
    device = torch.device(device)
    linears, head_names = hessian_targets(model)
    sums: dict[str, torch.Tensor] = {}

    def add(name: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        # autocast would run this matmul in bf16 and return bf16: keep XᵀX in fp32
        with torch.autocast(device_type=x.device.type, enabled=False):
            xtx = (x.T @ x).double()
        if name in sums:
            sums[name] += xtx
        else:
            sums[name] = xtx

    handles = []
    for name, module in linears.items():
        handles.append(module.register_forward_hook(lambda m, inp, out, name=name: add(name, inp[0])))

    def head_hook(m: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        for name in head_names:
            add(name, out)

    handles.append(model.final_norm.register_forward_hook(head_hook))
    was_training, was_looping = model.training, getattr(model, "looping", False)
    model.eval()
    if hasattr(model, "set_looping"):
        model.set_looping(looping)
    count = 0
    try:
        with torch.no_grad(), autocast(device, autocast_mode):
            for ids in batches:
                ids = ids.to(device)
                # the hidden states suffice (the head hook reads final_norm); skip the vocab matmul if we can
                (model.hidden if hasattr(model, "hidden") else model)(ids)
                count += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        if hasattr(model, "set_looping"):
            model.set_looping(was_looping)
    if count == 0:
        raise ValueError("collect_hessians: no calibration batch was given")
    out = {}
    for name, H in sums.items():
        H = H / count
        if average_across_ranks:
            H = all_reduce_(H.to(device), "sum").cpu()
            H = H / dist_info().world_size
        out[name] = H.float().cpu()
    return out


def calibration_seqs_per_batch(cfg: RunConfig, world_size: int) -> int:
    """Sequences in one calibration batch on one rank: quant.calibration_batch_tokens worth, else one
    training micro-batch."""
    from pgolf.data.loader import sequences_per_microbatch
    from pgolf.train.loop import grad_accum_steps

    d, q = cfg.data, cfg.quant
    if q.calibration_batch_tokens > 0:
        return max(1, q.calibration_batch_tokens // d.train_seq_len)
    accum = grad_accum_steps(cfg, world_size)
    return sequences_per_microbatch(d.train_batch_tokens, d.train_seq_len, world_size, accum)


def calibration_batches(cfg: RunConfig, dist: DistInfo) -> Iterable[torch.Tensor]:
    """cfg.quant.calibration_batches token batches [B, L] from a fresh loader over the train shards.

    Tokens per batch per rank: quant.calibration_batch_tokens, or one training micro-batch when 0.
    """
    from pgolf.data.loader import ShuffledSequenceLoader
    from pgolf.data.shards import list_shards

    d, q = cfg.data, cfg.quant
    if not d.dir:
        raise ValueError("data.dir is empty: calibration needs the training shards (set data.dir)")
    files = list_shards(Path(d.dir), "train")
    num_seqs = calibration_seqs_per_batch(cfg, dist.world_size)
    loader = ShuffledSequenceLoader(files, d.train_seq_len, dist.rank, dist.world_size, d.shuffle_seed)
    for _ in range(q.calibration_batches):
        x, _y = loader.next_batch(num_seqs, "cpu")
        yield x


def collect_run_hessians(
    model: nn.Module, cfg: RunConfig, dist: DistInfo, looping: bool = True
) -> tuple[dict[str, torch.Tensor], float]:
    """Hessians for a run's model from its config; returns (hessians, seconds). Empty when batches = 0."""
    if cfg.quant.calibration_batches <= 0:
        return {}, 0.0
    t0 = time.perf_counter()
    hessians = collect_hessians(
        model,
        calibration_batches(cfg, dist),
        dist.device,
        cfg.train.autocast,
        cfg.quant.average_hessians,
        looping,
    )
    return hessians, time.perf_counter() - t0
