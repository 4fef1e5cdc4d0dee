"""What transformers' Mamba2 hybrids (GraniteMoeHybrid, Bamba) share: a Llama block skeleton around mamba-ssm's
Mamba2 mixer, whose gated norm uses the model's RMSNorm eps and whose conv uses the model's hidden_act."""

from __future__ import annotations

import math
from typing import Any

MAMBA2_NORM_EPS = 1e-5  # xatl's Mamba2 gated RMSNorm (mamba-ssm's)
LLAMA_SKELETON = {
    "norm_type": "rmsnorm", "norm_weight_offset": 0.0, "norm_layout": "pre", "parallel_residual": False,
    "mlp_gated": True, "lm_head_bias": False, "position_embedding_type": "rope", "rope_interleaved": False,
    "qk_norm": None, "attn_logit_softcapping": None, "final_logit_softcapping": None, "sliding_window": None,
    "no_rope_layers": None, "sliding_rope_parameters": None,
}  # fmt: skip


def hybrid_refusals(config: dict[str, Any], name: str, expected: dict[str, Any]) -> list[str]:
    """Every reason the xatl config is not a Llama-skeleton Mamba2 hybrid that `name` computes the same way."""
    reasons = []
    kinds = set(config["layer_types"])
    if "mamba" in kinds:
        reasons.append(f"it has Mamba (v1) layers; {name} holds Mamba2 and attention only (convert --to mamba2)")
    for key, value in {**LLAMA_SKELETON, **expected}.items():
        if config.get(key, value) != value:
            reasons.append(f"{key} is {config.get(key)!r}; {name} needs {value!r}")
    if config.get("hidden_act") != "silu":
        reasons.append(f"hidden_act {config.get('hidden_act')!r}: {name} uses it for the Mamba2 conv too, "
                       "where xatl uses silu")  # fmt: skip
    if "attention" in kinds and config.get("attention_bias") != config.get("attention_out_bias"):
        reasons.append(f"q/k/v and output biases differ; {name} has one attention_bias for all four")
    if "mamba2" in kinds:
        m = config["mamba2"]
        if m["proj_bias"] != m["out_proj_bias"]:
            reasons.append(f"Mamba2 in_proj and out_proj biases differ; {name} has one mamba_proj_bias")
        if m["norm_before_gate"]:
            reasons.append(f"Mamba2 norm_before_gate; {name} gates before its norm")
        if not math.isclose(config["norm_eps"], MAMBA2_NORM_EPS, rel_tol=1e-6):  # a float32-rounded 1e-5 is fine
            reasons.append(f"norm_eps {config['norm_eps']:.3g}: {name}'s Mamba2 norm uses it, xatl's uses "
                           f"{MAMBA2_NORM_EPS:g}")  # fmt: skip
    return reasons


def hybrid_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config.json keys both formats share: sizes, attention, norms, RoPE, the mamba_* keys and token ids."""
    m = config["mamba2"]
    return {
        "vocab_size": config["vocab_size"],
        "hidden_size": config["hidden_size"],
        "intermediate_size": config["intermediate_size"],
        "num_hidden_layers": config["num_hidden_layers"],
        "num_attention_heads": config["num_attention_heads"],
        "num_key_value_heads": config["num_key_value_heads"],
        "head_dim": config["head_dim"],
        "hidden_act": config["hidden_act"],
        "rms_norm_eps": config["norm_eps"],
        "max_position_embeddings": config["max_position_embeddings"],
        "rope_parameters": config["rope_parameters"],
        "attention_bias": config["attention_bias"],
        "mamba_n_heads": m["expand"] * config["hidden_size"] // m["headdim"],
        "mamba_d_head": m["headdim"],
        "mamba_n_groups": m["ngroups"],
        "mamba_d_state": m["d_state"],
        "mamba_d_conv": m["d_conv"],
        "mamba_expand": m["expand"],
        "mamba_chunk_size": m["chunk_size"],
        "mamba_conv_bias": m["conv_bias"],
        "mamba_proj_bias": m["proj_bias"],
        "tie_word_embeddings": config["tie_word_embeddings"],
        # transformers 5's hybrid cache asks an attention layer for the sequence length: with none, a forward that
        # builds a cache fails, so a pure Mamba2 export builds none by default (generate() re-reads the prefix)
        "use_cache": "attention" in config["layer_types"],
        "pad_token_id": config.get("pad_token_id"),
        "bos_token_id": config.get("bos_token_id"),
        "eos_token_id": config.get("eos_token_id"),
    }


def mixer_name(name: str, config: dict[str, Any]) -> str | None:
    """model.layers.N.mixer.X as transformers' hybrids name it (self_attn with o_proj, or mamba), else None."""
    parts = name.split(".")
    if len(parts) < 5 or parts[:2] != ["model", "layers"] or parts[3] != "mixer":
        return None
    index, rest = int(parts[2]), ".".join(parts[4:])
    if config["layer_types"][index] == "attention":
        return f"model.layers.{index}.self_attn.{rest.replace('out_proj', 'o_proj')}"
    return f"model.layers.{index}.mamba.{rest}"
