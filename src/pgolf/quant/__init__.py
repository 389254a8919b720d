"""pgolf.quant: calibration, GPTQ / SDClip quantization, the artifact container and size accounting (SPEC §4).

`collect_hessians` (hessian.py), `gptq_quantize`, `sdclip_scales`, `rtn_quantize` (gptq.py), the rule table
(rules.py), the per-tensor plan (scheme.py), the LQER correction (lqer.py), `write_artifact` /
`read_artifact` (artifact.py), `quant_reserve_seconds` (budget.py), `quantize_run` and `load_artifact_model`
(pipeline.py).
"""

from pgolf.quant.artifact import (
    ArtifactError,
    decode_artifact,
    encode_artifact,
    read_artifact,
    write_artifact,
)
from pgolf.quant.budget import estimate_quant_seconds, quant_reserve_seconds
from pgolf.quant.gptq import (
    dequantize,
    gptq_quantize,
    hessian_clip_multipliers,
    percentile_clip_scales,
    quant_error,
    rtn_quantize,
    sdclip_scales,
)
from pgolf.quant.hessian import calibration_batches, collect_hessians, collect_run_hessians
from pgolf.quant.lqer import LqerFactors, lqer_correction, lqer_factors
from pgolf.quant.pipeline import OverCapError, load_artifact_model, quantize_run
from pgolf.quant.rules import QuantRule, match_rule, rules_from_config
from pgolf.quant.scheme import (
    QuantizedTensor,
    TensorPlan,
    dequantize_state_dict,
    plan_tensors,
    quantize_state_dict,
)

__all__ = [
    "ArtifactError",
    "OverCapError",
    "LqerFactors",
    "QuantRule",
    "QuantizedTensor",
    "TensorPlan",
    "calibration_batches",
    "collect_hessians",
    "collect_run_hessians",
    "decode_artifact",
    "dequantize",
    "dequantize_state_dict",
    "encode_artifact",
    "estimate_quant_seconds",
    "gptq_quantize",
    "hessian_clip_multipliers",
    "load_artifact_model",
    "lqer_correction",
    "lqer_factors",
    "match_rule",
    "percentile_clip_scales",
    "plan_tensors",
    "quant_error",
    "quant_reserve_seconds",
    "quantize_run",
    "quantize_state_dict",
    "read_artifact",
    "rtn_quantize",
    "rules_from_config",
    "sdclip_scales",
    "write_artifact",
]
