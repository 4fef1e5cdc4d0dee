"""The `xatl` model family, registered with transformers' Auto classes on import.

After `import xatl_convert.models`, `AutoConfig` / `AutoModel` / `AutoModelForCausalLM` resolve `model_type: xatl`
without `trust_remote_code` (converted folders also carry copies of the two files for remote-code loading).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_xatl import LAYER_TYPES, MAMBA2_DEFAULTS, MAMBA_DEFAULTS, XatlConfig
from .modeling_xatl import (
    XatlAttention,
    XatlBlock,
    XatlCache,
    XatlForCausalLM,
    XatlGatedRMSNorm,
    XatlMamba,
    XatlMamba2,
    XatlMLP,
    XatlModel,
    XatlPreTrainedModel,
    XatlRMSNorm,
    init_xatl_weights,
    new_cache,
    rotary_cos_sin,
    rotary_tables,
    selective_scan_reference,
    ssd_chunk_scan_reference,
)

AutoConfig.register(XatlConfig.model_type, XatlConfig, exist_ok=True)
AutoModel.register(XatlConfig, XatlModel, exist_ok=True)
AutoModelForCausalLM.register(XatlConfig, XatlForCausalLM, exist_ok=True)

__all__ = [
    "LAYER_TYPES",
    "MAMBA2_DEFAULTS",
    "MAMBA_DEFAULTS",
    "XatlAttention",
    "XatlBlock",
    "XatlCache",
    "XatlConfig",
    "XatlForCausalLM",
    "XatlGatedRMSNorm",
    "XatlMLP",
    "XatlMamba",
    "XatlMamba2",
    "XatlModel",
    "XatlPreTrainedModel",
    "XatlRMSNorm",
    "init_xatl_weights",
    "new_cache",
    "rotary_cos_sin",
    "rotary_tables",
    "selective_scan_reference",
    "ssd_chunk_scan_reference",
]
