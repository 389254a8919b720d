"""The GPT of the SP8192 record stack (SPEC §2), every element a ModelConfig switch.

Forward: x0 = RMSNorm(tok_emb[ids]); run the encoder index list (each output kept as a skip), then the
decoder list, where decoder position j < S first merges encoder output E−1−j (LIFO pairing, by explicit
index) with skip_weights[j] / skip_gates[j]; final_norm; logits = h·Wᵀ (tied: W = tok_emb); softcap.
Depth recurrence repeats physical blocks inside those lists (`recurrence_indices`). Lane-parallel layers
carry two residual lanes (block.py); the lanes are combined (`parallel_final_lane`) wherever a single
stream is needed: an encoder skip, a following sequential layer, the final norm.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.config.schema import ModelConfig
from pgolf.model.attention import AttnInputs, rope_tables
from pgolf.model.backend import Documents, resolve_backend
from pgolf.model.block import LANE_MODES, Block
from pgolf.model.layers import BOS_ID, CastedLinear, smear
from pgolf.model.loss import fused_head_loss, head_nll, softcap_logits, softcapped_cross_entropy

if TYPE_CHECKING:
    from pgolf.model.lora import Adapters, SlotAdapters

PARALLEL_MODES = ("none", "gptj", *LANE_MODES)
FINAL_LANES = ("mlp", "attn", "mean")
# Names of the small learnable tensors (AdamW "scalar" group, fp32, fp16 passthrough in the artifact).
CONTROL_NAMES = (
    "q_gain",
    "attn_scale",
    "mlp_scale",
    "resid_mix",
    "skip_weights",
    "skip_gates",
    "par_post",
    "par_resid",
    "attn_gate_w",  # the quantizer stores it int8 per row by this name (SPEC-1855 §4.3)
    "smear_gate",
    "smear_lambda",
)
# Output projections start at zero so every block is the identity at init (SPEC §2.7).
ZERO_INIT_LINEARS = ("attn.proj", "mlp.proj", "lm_head")

LaneState = Tensor | tuple[Tensor, Tensor]


class Step(NamedTuple):
    """One virtual layer: physical block `idx`; decoder position `pos` (-1 in the encoder), whose paired
    encoder output is skips[`skip`] (None: no skip merge)."""

    idx: int
    pos: int
    skip: int | None


def layer_plan(cfg: ModelConfig, looping: bool) -> list[Step]:
    """The virtual layers in order: encoder steps push their output as a skip, decoder position j < S
    merges encoder output E−1−j (LIFO pairing, by explicit index)."""
    encoder, decoder = recurrence_indices(cfg, looping)
    paired = min(len(encoder), len(decoder)) if num_skip_connections(cfg) else 0
    steps = [Step(idx, -1, None) for idx in encoder]
    for pos, idx in enumerate(decoder):
        steps.append(Step(idx, pos, len(encoder) - 1 - pos if pos < paired else None))
    return steps


def recurrence_indices(cfg: ModelConfig, looping: bool) -> tuple[list[int], list[int]]:
    """(encoder, decoder) physical block indices of the virtual layer sequence (SPEC §2.5).

    Looped: [0..LS−1] + [LS..LE]×(NUM_LOOPS+1) + [LE+1..L−1]; plain: [0..L−1]. The encoder is the first
    ⌊len/2⌋ entries, the decoder the rest.
    """
    num_layers = cfg.num_layers
    if looping and cfg.num_loops > 0:
        start, end = cfg.loop_start, cfg.loop_end
        if not 0 <= start <= end < num_layers:
            raise ValueError(
                f"model.loop_start={start}, model.loop_end={end} must satisfy "
                f"0 <= loop_start <= loop_end < model.num_layers={num_layers}"
            )
        order = (
            list(range(start))
            + list(range(start, end + 1)) * (cfg.num_loops + 1)
            + list(range(end + 1, num_layers))
        )
    else:
        order = list(range(num_layers))
    half = len(order) // 2
    return order[:half], order[half:]


def num_skip_connections(cfg: ModelConfig) -> int:
    """S of the looped graph (the largest one): skip_weights / skip_gates rows."""
    if not cfg.unet_skips:
        return 0
    enc, dec = recurrence_indices(cfg, looping=True)
    return min(len(enc), len(dec))


def _strip_wrappers(name: str) -> str:
    for prefix in ("_orig_mod.", "module."):
        while name.startswith(prefix):
            name = name[len(prefix) :]
    return name


def param_role(name: str, p: Tensor) -> str:
    """'embed' | 'head' | 'matrix' | 'control' for a GPT parameter (DDP/compile prefixes allowed).

    The one place that decides optimizer groups and quantization classes: matrices are the 2-D block
    weights (Muon, GPTQ int6), control tensors the small vectors (AdamW scalar group, fp16 passthrough).
    """
    name = _strip_wrappers(name)
    if name == "tok_emb.weight":
        return "embed"
    if name == "lm_head.weight":
        return "head"
    leaf = name.rsplit(".", 1)[-1]
    if leaf in CONTROL_NAMES:
        return "control"
    if name.startswith("blocks.") and leaf == "weight" and p.dim() == 2:
        return "matrix"
    return "control"


def _check_config(cfg: ModelConfig) -> None:
    if cfg.model_dim % cfg.num_heads:
        raise ValueError(
            f"model.model_dim={cfg.model_dim} must be divisible by model.num_heads={cfg.num_heads}"
        )
    if cfg.num_heads % cfg.num_kv_heads:
        raise ValueError(
            f"model.num_heads={cfg.num_heads} must be a multiple of model.num_kv_heads={cfg.num_kv_heads}"
        )
    if cfg.parallel_mode not in PARALLEL_MODES:
        raise ValueError(f"model.parallel_mode={cfg.parallel_mode!r}; expected one of {PARALLEL_MODES}")
    if cfg.parallel_final_lane not in FINAL_LANES:
        raise ValueError(
            f"model.parallel_final_lane={cfg.parallel_final_lane!r}; expected one of {FINAL_LANES}"
        )
    if cfg.logit_softcap < 0:
        raise ValueError(f"model.logit_softcap={cfg.logit_softcap} must be >= 0 (0 = off)")
    if (cfg.smear_gate or cfg.sparse_attn_gate) and not 0 < cfg.gate_window <= cfg.model_dim:
        raise ValueError(f"model.gate_window={cfg.gate_window} must be in [1, model.model_dim={cfg.model_dim}]")
    resolve_backend(cfg.attention_backend, "cpu")  # at build time: 'flash' without FlashAttention fails here


class RMSNorm(nn.Module):
    """Weight-free RMS norm over the last dim (a module so a forward hook can read its output)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.size(-1),))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        _check_config(cfg)
        self.cfg = cfg
        dim, layers = cfg.model_dim, cfg.num_layers
        self.tok_emb = nn.Embedding(cfg.vocab_size, dim)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(layers))
        self.final_norm = RMSNorm()
        skips = num_skip_connections(cfg)
        self.skip_weights = nn.Parameter(torch.empty(skips, dim)) if skips else None
        self.skip_gates = nn.Parameter(torch.empty(skips, dim)) if skips and cfg.skip_gates else None
        lanes = cfg.parallel_mode in LANE_MODES
        self.par_post = nn.Parameter(torch.empty(layers, 2, 2)) if lanes else None
        self.par_resid = nn.Parameter(torch.empty(layers, 2)) if lanes else None
        self.lm_head = None if cfg.tie_embeddings else CastedLinear(dim, cfg.vocab_size)
        self.smear_gate = nn.Parameter(torch.empty(cfg.gate_window)) if cfg.smear_gate else None
        self.smear_lambda = nn.Parameter(torch.empty(1)) if cfg.smear_gate else None
        self.looping = False
        self._plans = {flag: layer_plan(cfg, flag) for flag in (False, True)}
        # Precision (SPEC §2.7): tok_emb holds bf16 master weights; everything else is fp32.
        self.tok_emb.to(torch.bfloat16)
        self.init_weights()

    # ----------------------------------------------------------------------------- setup
    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re-)initialise every parameter (SPEC §2.7); a no-op on the meta device.

        After `to_empty(device=...)` of a meta-built model, call this to get real values.
        """
        if self.tok_emb.weight.is_meta:
            return
        cfg = self.cfg
        nn.init.normal_(self.tok_emb.weight, mean=0.0, std=cfg.tied_embed_init_std)
        for name, module in self.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            if name.endswith(ZERO_INIT_LINEARS):
                nn.init.zeros_(module.weight)
            elif min(module.weight.shape) >= 64:
                nn.init.orthogonal_(module.weight, gain=1.0)
            else:
                module.reset_parameters()
        for block in self.blocks:
            block.attn.q_gain.fill_(cfg.qk_gain_init)
            block.attn_scale.fill_(1.0)
            block.mlp_scale.fill_(1.0)
            if block.resid_mix is not None:
                block.resid_mix[0].fill_(1.0)
                block.resid_mix[1].fill_(0.0)
        for gate in (self.smear_gate, self.smear_lambda, *(b.attn.attn_gate_w for b in self.blocks)):
            if gate is not None:
                gate.zero_()  # #1855: the smear starts as the identity, every attention gate at σ(0)
        if self.skip_weights is not None:
            self.skip_weights.fill_(1.0)
        if self.skip_gates is not None:
            self.skip_gates.fill_(0.0)  # σ(0) = 0.5
        if self.par_post is not None:
            self.par_post.fill_(1.0)
            # #1541 shares the carry r0·r1 between lanes (init product 1.1); #1529 has one ρ per lane.
            carry = 1.1 if cfg.parallel_mode == "lanes1529" else math.sqrt(1.1)
            self.par_resid.fill_(carry)
        # The records build the model in bf16 and restore fp32 masters afterwards: values are bf16-rounded.
        for p in self.parameters():
            p.copy_(p.to(torch.bfloat16))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def set_looping(self, on: bool) -> None:
        """Switch depth recurrence on/off (training turns it on at ENABLE_LOOPING_AT; eval uses it)."""
        self.looping = bool(on)

    def layer_steps(self) -> list[Step]:
        """The virtual layers the forward runs now (one LoRA slot each)."""
        return self._plans[self.looping]

    # ----------------------------------------------------------------------------- forward
    def _single(self, state: LaneState) -> Tensor:
        """The single residual stream; lanes are combined per parallel_final_lane."""
        if isinstance(state, Tensor):
            return state
        lane0, lane1 = state
        final = self.cfg.parallel_final_lane
        if final == "mlp":
            return lane1
        if final == "attn":
            return lane0
        return 0.5 * (lane0 + lane1)

    def _merge_skip(self, x: Tensor, skip: Tensor, pos: int) -> Tensor:
        scaled = self.skip_weights[pos].to(x.dtype) * skip
        if self.skip_gates is None:
            return x + scaled
        gate = torch.sigmoid(self.skip_gates[pos].to(x.dtype))
        return torch.lerp(scaled, x, gate)  # σ(g)·x + (1−σ(g))·w⊙skip

    def _layer(self, step: Step, state: LaneState, x0: Tensor, ctx: AttnInputs, skips: list[Tensor],
               tail: int = 0, lora: SlotAdapters | None = None) -> LaneState:  # fmt: skip
        """Run one virtual layer; tail > 0 (the last layer only) returns positions tail.. alone."""
        block = self.blocks[step.idx]
        skip = None if step.skip is None else skips[step.skip]
        if block.lane_form is None:
            x = self._single(state)
            if skip is not None:
                x = self._merge_skip(x, skip, step.pos)
            state = block(x, x0, ctx, tail, lora)
        else:
            if isinstance(state, Tensor):
                # First lane layer: the skip is merged into x, then both lanes start from it.
                x = self._merge_skip(state, skip, step.pos) if skip is not None else state
                lane0, lane1 = x, x
            else:
                lane0, lane1 = state
                if skip is not None:
                    lane0 = self._merge_skip(lane0, skip, step.pos)
                    if block.lane_form == "lanes1541":  # #1541: into both lanes; #1529: lane 0 only
                        lane1 = self._merge_skip(lane1, skip, step.pos)
            post, resid = self.par_post[step.idx], self.par_resid[step.idx]
            state = block.forward_lanes(lane0, lane1, x0, ctx, post, resid, tail, lora)
        if step.pos < 0:
            skips.append(self._single(state))
        return state

    def hidden(self, ids: Tensor, first: int = 0, lora: Adapters | None = None) -> Tensor:
        """final_norm output [B, T - first, d] of positions first..: the features the output head reads.

        Every layer but the last runs on all T positions (their keys and values are needed); only the last
        layer is told `first`, and computes the outputs of positions first.. alone (what sliding eval scores).
        `lora`: per-row adapters (row b = document b), one slot per virtual layer (pgolf.model.lora).
        """
        if ids.dim() != 2:
            raise ValueError(f"expected token ids [B, T]; got shape {tuple(ids.shape)}")
        if not 0 <= first < ids.size(1):
            raise ValueError(f"first={first} must be in [0, {ids.size(1)}) for ids of shape {tuple(ids.shape)}")
        x = self.tok_emb(ids)
        if not torch.is_autocast_enabled(ids.device.type):
            # The bf16 storage of tok_emb must not pick the compute precision: without autocast the
            # whole forward runs in the parameters' fp32 (CPUs without bf16 matmul units need this).
            x = x.float()
        if self.smear_gate is not None:
            x = smear(x, ids == BOS_ID, self.smear_gate, self.smear_lambda)
        x0 = F.rms_norm(x, (self.cfg.model_dim,))
        ctx = self._attn_inputs(ids)
        plan = self.layer_steps()
        slots = [None] * len(plan) if lora is None else self._lora_slots(lora, ids)
        state: LaneState = x0
        skips: list[Tensor] = []
        for step, slot in zip(plan[:-1], slots):
            state = self._layer(step, state, x0, ctx, skips, lora=slot)
        state = self._layer(plan[-1], state, x0, ctx, skips, tail=first, lora=slots[-1])
        return self.final_norm(self._single(state))

    def _lora_slots(self, lora: Adapters, ids: Tensor) -> list[SlotAdapters]:
        if len(lora.slots) != len(self.layer_steps()) or lora.batch != ids.size(0):
            raise ValueError(
                f"LoRA set of {len(lora.slots)} slots x {lora.batch} rows does not fit a forward of "
                f"{len(self.layer_steps())} virtual layers x {ids.size(0)} rows"
            )
        return list(lora.slots)

    def _attn_inputs(self, ids: Tensor) -> AttnInputs:
        cfg = self.cfg
        rot_dims = cfg.rope_dims or cfg.model_dim // cfg.num_heads
        cos, sin = rope_tables(ids.size(1), rot_dims, cfg.rope_base, ids.device, cfg.rope_ntk_len)
        backend = resolve_backend(cfg.attention_backend, ids.device.type)
        docs = Documents.from_ids(ids, BOS_ID, backend) if cfg.doc_attention else None
        return AttnInputs(cos, sin, backend, docs)

    def _head_weight(self) -> Tensor:
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, ids: Tensor, targets: Tensor | None = None) -> Tensor:
        """Softcapped fp32 logits [B, T, V]; with targets, the fp32 mean cross-entropy (scalar)."""
        if targets is None:
            return self.tail_logits(ids)
        if targets.shape != ids.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} must equal ids shape {tuple(ids.shape)}")
        h = self.hidden(ids)
        h, targets = h.reshape(-1, h.size(-1)), targets.reshape(-1)
        if self.cfg.fused_ce:  # #1855: raw logits in h's dtype, then the fused softcapped CE
            return softcapped_cross_entropy(F.linear(h, self._head_weight().to(h.dtype)), targets,
                                            self.cfg.logit_softcap)  # fmt: skip
        return fused_head_loss(h, self._head_weight(), targets, self.cfg.logit_softcap)

    # Sliding-window eval scores only each window's last `stride` positions: `first` skips the last layer's
    # queries, MLP and the output head (a d x V matmul, tanh and log-softmax over V) where nothing is scored.
    def tail_logits(self, ids: Tensor, first: int = 0, lora: Adapters | None = None) -> Tensor:
        """Softcapped fp32 logits [B, T - first, V] of positions first.. (all of them by default); the
        head adapter of `lora` joins the raw logits before the softcap."""
        h = self.hidden(ids, first, lora)
        logits = F.linear(h, self._head_weight().to(h.dtype))
        if lora is not None:
            logits = logits + lora.head(h)
        return softcap_logits(logits, self.cfg.logit_softcap)

    def per_token_nll(self, ids: Tensor, targets: Tensor, first: int = 0, lora: Adapters | None = None) -> Tensor:
        """fp32 NLL [B, T - first] of the targets at positions first.., in row chunks (eval never holds
        [B, T, V] logits; with `lora` it does: the head adapter is per row). targets has the shape of ids."""
        if targets.shape != ids.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} must equal ids shape {tuple(ids.shape)}")
        tail = targets[:, first:]
        if lora is not None:
            logits = self.tail_logits(ids, first, lora)
            return F.cross_entropy(logits.flatten(0, 1), tail.reshape(-1), reduction="none").view(tail.shape)
        h = self.hidden(ids, first)
        nll = head_nll(
            h.reshape(-1, h.size(-1)), self._head_weight(), tail.reshape(-1), self.cfg.logit_softcap
        )
        return nll.view(tail.shape)
