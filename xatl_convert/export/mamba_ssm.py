"""mamba-ssm's `MambaLMHeadModel` (`from_pretrained` builds `MambaConfig(**config.json)`, so every key must be one of
its fields): `backbone.embedding`, `backbone.layers.{i}.norm/.mixer/.norm2/.mlp`, `backbone.norm_f`, `lm_head`;
weights in `pytorch_model.bin`. Mixers: one SSM kind for all LCI layers (`ssm_cfg.layer` Mamba1 or Mamba2) and MHA at
`attn_layer_idx` (fused `in_proj` rows Q, K, V; rotary on `rotary_emb_dim` dims, halves or interleaved, no rope
scaling). The MLP is `GatedMLP`: `fc2(y * silu(gate))` with fc1 = [y; gate], xatl's layout, its width rounded up to a
multiple of 128 (zero rows and columns: exact). The norms are RMSNorm (or LayerNorm) with eps 1e-5, fixed. The
vocabulary is not padded (`pad_vocab_size_multiple: 1`): padded rows would add logits the source never had.
mamba-ssm runs only on CUDA: the export is checked here against its parameter names and config keys
(tests/fixtures/mamba_ssm_api.json) and against mamba-ssm itself by benchmarks/gpu_check.sh on a GPU.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
import torch.nn.functional as F

LOADS_WITH = "mamba-ssm's MambaLMHeadModel.from_pretrained (CUDA)"
NAME = "mamba-ssm"
WEIGHTS_FILE = "pytorch_model.bin"
NORM_EPS = 1e-5
MLP_MULTIPLE = 128


def refusals(config: dict[str, Any]) -> list[str]:
    """Every reason the xatl config cannot become a MambaLMHeadModel that computes the same, or []."""
    reasons = []
    kinds = set(config["layer_types"])
    if {"mamba", "mamba2"} <= kinds:
        reasons.append("it mixes Mamba and Mamba2 layers; mamba-ssm has one ssm_cfg for all")
    expected = {
        "norm_weight_offset": 0.0, "norm_layout": "pre", "parallel_residual": False, "mlp_gated": True,
        "mlp_bias": False, "hidden_act": "silu", "lm_head_bias": False, "position_embedding_type": "rope",
        "qk_norm": None, "attn_logit_softcapping": None, "final_logit_softcapping": None, "sliding_window": None,
        "no_rope_layers": None, "sliding_rope_parameters": None, "embedding_multiplier": 1.0,
        "residual_multiplier": 1.0, "logits_scaling": 1.0,
    }  # fmt: skip
    for key, value in expected.items():
        if config.get(key, value) != value:
            reasons.append(f"{key} is {config.get(key)!r}; mamba-ssm needs {value!r}")
    if not math.isclose(config["norm_eps"], NORM_EPS, rel_tol=1e-6):
        reasons.append(f"norm_eps {config['norm_eps']:.3g}; mamba-ssm's norms use {NORM_EPS:g}")
    if config["norm_type"] == "layernorm" and not config.get("norm_bias", True):
        reasons.append("LayerNorm without bias; mamba-ssm's nn.LayerNorm has one")
    if "attention" in kinds and config["rope_parameters"].get("rope_type", "default") != "default":
        reasons.append(f"rope_type {config['rope_parameters']['rope_type']!r}; mamba-ssm's MHA has no rope scaling")
    if "mamba" in kinds and config["mamba"]["proj_bias"] != config["mamba"]["out_proj_bias"]:
        reasons.append("Mamba in_proj and out_proj biases differ; mamba-ssm has one bias flag")
    if "mamba2" in kinds and not math.isclose(config["mamba2"]["norm_eps"], NORM_EPS, rel_tol=1e-6):
        reasons.append(f"mamba2.norm_eps {config['mamba2']['norm_eps']:.3g}; mamba-ssm's Mamba2 norm uses {NORM_EPS:g}")
    if "mamba2" in kinds and config["mamba2"]["proj_bias"] != config["mamba2"]["out_proj_bias"]:
        reasons.append("Mamba2 in_proj and out_proj biases differ; mamba-ssm has one bias flag")
    return reasons


def _mlp_width(config: dict[str, Any]) -> int:
    return -(-config["intermediate_size"] // MLP_MULTIPLE) * MLP_MULTIPLE


def target_config(config: dict[str, Any]) -> dict[str, Any]:
    """The MambaConfig fields, and nothing else."""
    kinds = config["layer_types"]
    if "mamba2" in kinds:
        m = config["mamba2"]
        ssm = {"layer": "Mamba2", "d_state": m["d_state"], "d_conv": m["d_conv"], "expand": m["expand"],
               "headdim": m["headdim"], "ngroups": m["ngroups"], "chunk_size": m["chunk_size"], "bias": m["proj_bias"],
               "conv_bias": m["conv_bias"], "rmsnorm": True, "norm_before_gate": m["norm_before_gate"]}  # fmt: skip
    else:
        m = config["mamba"]
        ssm = {"layer": "Mamba1", "d_state": m["d_state"], "d_conv": m["d_conv"], "expand": m["expand"],
               "dt_rank": m["dt_rank"], "bias": m["proj_bias"], "conv_bias": m["conv_bias"]}  # fmt: skip
    head_dim = config["head_dim"]
    attn = {
        "num_heads": config["num_attention_heads"],
        "num_heads_kv": config["num_key_value_heads"],
        "head_dim": head_dim,
        "qkv_proj_bias": config["attention_bias"],
        "out_proj_bias": config["attention_out_bias"],
        "softmax_scale": config.get("attention_multiplier") or head_dim**-0.5,
        "causal": True,
        "rotary_emb_dim": int(head_dim * config["rope_parameters"].get("partial_rotary_factor", 1.0)),
        "rotary_emb_base": config["rope_parameters"]["rope_theta"],
        "rotary_emb_interleaved": config["rope_interleaved"],
    }
    return {
        "d_model": config["hidden_size"],
        "d_intermediate": _mlp_width(config),
        "n_layer": config["num_hidden_layers"],
        "vocab_size": config["vocab_size"],
        "ssm_cfg": ssm,
        "attn_layer_idx": [i for i, kind in enumerate(kinds) if kind == "attention"],
        "attn_cfg": attn,
        "rms_norm": config["norm_type"] == "rmsnorm",
        "residual_in_fp32": True,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": 1,
        "tie_embeddings": config["tie_word_embeddings"],
    }


_RENAMES = (
    (r"model\.embed_tokens\.", "backbone.embedding."),
    (r"model\.final_norm\.", "backbone.norm_f."),
    (r"model\.layers\.(\d+)\.input_norm\.", r"backbone.layers.\1.norm."),
    (r"model\.layers\.(\d+)\.mlp_norm\.", r"backbone.layers.\1.norm2."),
    (r"model\.layers\.(\d+)\.mlp\.", r"backbone.layers.\1.mlp."),
    (r"model\.layers\.(\d+)\.mixer\.", r"backbone.layers.\1.mixer."),
)
_QKV = re.compile(r"model\.layers\.(\d+)\.mixer\.([qkv])_proj\.(weight|bias)")


def tensors(name: str, value: torch.Tensor, config: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    """mamba-ssm's name(s) for one xatl tensor. q, k and v of a layer go into one fused in_proj: each is returned
    as its row block, and `fuse` joins them."""
    qkv = _QKV.match(name)
    if qkv:
        return [(f"backbone.layers.{qkv.group(1)}.mixer.in_proj.{qkv.group(3)}#{qkv.group(2)}", value)]
    pad = _mlp_width(config) - config["intermediate_size"]
    if pad and name.endswith("mlp.fc1.weight"):  # [y; gate], each half padded with zero rows
        y, gate = value.chunk(2, dim=0)
        value = torch.cat([F.pad(y, (0, 0, 0, pad)), F.pad(gate, (0, 0, 0, pad))])
    elif pad and name.endswith("mlp.fc2.weight"):
        value = F.pad(value, (0, pad))
    for pattern, replacement in _RENAMES:
        if re.match(pattern, name):
            return [(re.sub(pattern, replacement, name), value)]
    return [(name, value)]  # lm_head.weight


def fuse(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Join each attention layer's q, k, v row blocks into MHA's in_proj (rows Q, then K, then V); a tied head gets
    the embedding (mamba-ssm's state dict holds lm_head.weight either way)."""
    fused = {name: value for name, value in state.items() if "#" not in name}
    for name in sorted({name.split("#")[0] for name in state if "#" in name}):
        fused[name] = torch.cat([state[f"{name}#{part}"] for part in "qkv"])
    if "lm_head.weight" not in fused:
        fused["lm_head.weight"] = fused["backbone.embedding.weight"]
    return fused
