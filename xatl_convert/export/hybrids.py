"""What transformers' Mamba2 hybrids (GraniteMoeHybrid, Bamba) share: a Llama block skeleton around mamba-ssm's
Mamba2 mixer, whose gated norm uses the model's RMSNorm eps and whose conv uses the model's hidden_act."""

from __future__ import annotations

import math
from typing import Any

import torch

LLAMA_SKELETON = {
    "norm_type": "rmsnorm", "norm_weight_offset": 0.0, "norm_layout": "pre", "parallel_residual": False,
    "mlp_gated": True, "lm_head_bias": False, "position_embedding_type": "rope", "final_logit_softcapping": None,
}  # fmt: skip
# What only attention layers compute (the value the formats hold, what it is): a reason only where some layer is one.
ATTENTION_ONLY = {
    "qk_norm": (None, "a q/k norm"),
    "rope_interleaved": (False, "RoPE on interleaved pairs"),
    "attn_logit_softcapping": (None, "soft-capped scores"),
    "sliding_window": (None, "a sliding window"),
    "no_rope_layers": (None, "layers without RoPE"),
    "sliding_rope_parameters": (None, "a RoPE of its own for sliding layers"),
}


def hybrid_refusals(config: dict[str, Any], name: str, expected: dict[str, Any]) -> list[str]:
    """Every reason the xatl config is not a Llama-skeleton Mamba2 hybrid that `name` computes the same way. Settings
    of a mixer kind the model has no layer of are not reasons."""
    reasons = []
    kinds = set(config["layer_types"])
    for key, value in {**LLAMA_SKELETON, **expected}.items():
        if config.get(key, value) != value:
            reasons.append(f"{key} is {config.get(key)!r}; {name} needs {value!r}")
    if "attention" in kinds:
        for key, (value, what) in ATTENTION_ONLY.items():
            if config.get(key, value) != value:
                reasons.append(f"its attention layers have {what} ({key} {config.get(key)!r}), which {name}'s lack")
    if config.get("hidden_act") != "silu":
        reasons.append(f"hidden_act {config.get('hidden_act')!r}: {name} uses it for the Mamba2 conv too, "
                       "where xatl uses silu")  # fmt: skip
    if "mamba2" in kinds:
        m = config["mamba2"]
        if m["norm_before_gate"]:
            reasons.append(f"Mamba2 norm_before_gate; {name} gates before its norm")
        if not math.isclose(m["norm_eps"], config["norm_eps"], rel_tol=1e-6):  # a float32-rounded eps is fine
            reasons.append(
                f"mamba2.norm_eps {m['norm_eps']:g} is not norm_eps {config['norm_eps']:g}, which {name}'s Mamba2 "
                "norm uses: convert again (it takes the source's eps unless --set)"
            )
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
        "attention_bias": any(bias_flags(config, "attention").values()),  # zeros where one has none: exact
        "mamba_n_heads": m["expand"] * config["hidden_size"] // m["headdim"],
        "mamba_d_head": m["headdim"],
        "mamba_n_groups": m["ngroups"],
        "mamba_d_state": m["d_state"],
        "mamba_d_conv": m["d_conv"],
        "mamba_expand": m["expand"],
        "mamba_chunk_size": m["chunk_size"],
        "mamba_conv_bias": m["conv_bias"],
        "mamba_proj_bias": any(bias_flags(config, "mamba2").values()),
        "tie_word_embeddings": config["tie_word_embeddings"],
        # transformers 5's hybrid cache asks an attention layer for the sequence length: with none, a forward that
        # builds a cache fails, so a pure Mamba2 export builds none by default (generate() re-reads the prefix)
        "use_cache": "attention" in config["layer_types"],
        "pad_token_id": config.get("pad_token_id"),
        "bos_token_id": config.get("bos_token_id"),
        "eos_token_id": config.get("eos_token_id"),
    }


def bias_flags(config: dict[str, Any], kind: str) -> dict[str, bool]:
    """Whether each projection of an xatl layer kind has a bias; the formats have one flag for all of them."""
    if kind == "attention":
        qkv = config["attention_bias"]
        return {"q_proj": qkv, "k_proj": qkv, "v_proj": qkv, "out_proj": config["attention_out_bias"]}
    if kind == "mamba2":
        return {"in_proj": config["mamba2"]["proj_bias"], "out_proj": config["mamba2"]["out_proj_bias"]}
    return {}


def mixer_tensors(name: str, value: torch.Tensor, config: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    """A tensor under transformers' hybrids' name (`mixer_name`, else its own); a projection's weight also brings a
    zero bias where the format's one flag gives that projection a bias the xatl layer has not (adding zero is exact:
    Qwen2's o_proj)."""
    renamed = [(mixer_name(name, config) or name, value)]
    parts = name.split(".")
    if len(parts) != 6 or parts[:2] != ["model", "layers"] or parts[3] != "mixer" or parts[5] != "weight":
        return renamed
    flags = bias_flags(config, config["layer_types"][int(parts[2])])
    if parts[4] in flags and not flags[parts[4]] and any(flags.values()):
        bias = mixer_name(".".join([*parts[:5], "bias"]), config)
        renamed.append((bias, torch.zeros(value.shape[0], dtype=value.dtype)))
    return renamed


def mixer_name(name: str, config: dict[str, Any]) -> str | None:
    """model.layers.N.mixer.X as transformers' hybrids name it (self_attn with o_proj, or mamba), else None."""
    parts = name.split(".")
    if len(parts) < 5 or parts[:2] != ["model", "layers"] or parts[3] != "mixer":
        return None
    index, rest = int(parts[2]), ".".join(parts[4:])
    if config["layer_types"][index] == "attention":
        return f"model.layers.{index}.self_attn.{rest.replace('out_proj', 'o_proj')}"
    return f"model.layers.{index}.mamba.{rest}"
