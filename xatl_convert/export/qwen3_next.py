"""transformers' Qwen3-Next (`model_type: qwen3_next`) with a dense MLP on every layer: Gated DeltaNet layers
("linear_attention") and gated attention ("full_attention") in any order. The exact home of Gated DeltaNet
conversions: pure ones of the Llama family and of Qwen3, and Qwen3 hybrids (their attention keeps its per-head q/k
norm, which Qwen3-Next's attention always applies). transformers loads it natively; the vLLM and SGLang Qwen3-Next
classes read (vLLM 002d607, SGLang 0201bc8) build MoE blocks only, so a dense export does not load there yet.

Facts read from transformers' modeling_qwen3_next.py (5.24):
- Qwen3NextRMSNorm (input, post-attention, final, q and k norms) computes x·(1 + w) in fp32: the export stores
  w + norm_weight_offset − 1 in float32 (exact; in bf16 it would round every weight below 0.5). The Gated
  DeltaNet's own gated norm (Qwen3NextRMSNormGated) is x·w: copied.
- its attention's q_proj holds, per head, [query (head_dim); gate (head_dim)] and multiplies the attention output by
  sigmoid(gate) before o_proj: zero gate rows (sigmoid 0.5) and a doubled o_proj are exact in any float format. One
  `attention_bias` covers q, k, v and o (zeros where the xatl layer has none: exact). The softmax scale is
  head_dim ** -0.5; q_norm and k_norm are always there, eps rms_norm_eps.
- Gated DeltaNet: in_proj_qkvz is grouped per key head g, [q_g (dk), k_g (dk), v_g (r·dv), z_g (r·dv)] with
  r = num_v_heads / num_heads, and in_proj_ba is [b_g (r), a_g (r)] per key head (`fix_query_key_value_ordering`):
  a row permutation of xatl's in_proj [q, k, v, z, b, a]. conv1d runs over [q, k, v] of all heads, as xatl's, with
  no bias and `hidden_act` as its activation; the gated norm's eps is rms_norm_eps; no in_proj or out_proj bias.
- num_experts 0 gives every layer Qwen3NextMLP (gate_proj, up_proj, down_proj; xatl's fc1 is [up; gate]).
- RoPE from rope_parameters, whose partial_rotary_factor defaults to 0.25 when absent: always written.
- its torch delta rule runs chunks of 64 tokens whatever xatl's chunk_size (the same maths; rounding differs).
- transformers 5's cache asks an attention layer for the sequence length, so a pure Gated DeltaNet export builds
  no cache by default (generate() then re-reads the prefix), as the Mamba2 hybrid formats do.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from xatl_convert.export.hybrids import bias_flags

LOADS_WITH = "AutoModelForCausalLM, no remote code"
NAME = "qwen3_next"
TITLE = "Qwen3-Next"

# The block skeleton Qwen3-Next has (the value it needs, per xatl config key), whatever the layer kinds.
SKELETON: dict[str, Any] = {
    "norm_type": "rmsnorm", "norm_layout": "pre", "parallel_residual": False, "mlp_gated": True, "mlp_bias": False,
    "lm_head_bias": False, "position_embedding_type": "rope", "final_logit_softcapping": None,
    "embedding_multiplier": 1.0, "residual_multiplier": 1.0, "logits_scaling": 1.0,
}  # fmt: skip
# What only attention layers compute (the value Qwen3-Next holds, what it is): a reason only where one is kept.
ATTENTION_ONLY = {
    "rope_interleaved": (False, "RoPE on interleaved pairs"),
    "attn_logit_softcapping": (None, "soft-capped scores"),
}
GATED_DELTANET_BIASES = {"proj_bias": "in_proj", "conv_bias": "conv1d", "out_proj_bias": "out_proj"}
ROPE_TYPES = ("default", *ROPE_INIT_FUNCTIONS)  # what Qwen3NextRotaryEmbedding computes
SILU = ("silu", "swish")  # transformers' two names of what xatl's Gated DeltaNet conv applies


def refusals(config: dict[str, Any]) -> list[str]:
    """Every reason the xatl config cannot become a Qwen3-Next that computes the same, or []. Settings of a mixer
    kind the model has no layer of are not reasons; Mamba and Mamba2 layers are the registry's (`check_format`)."""
    reasons = [
        f"{key} is {config.get(key)!r}; {TITLE} needs {value!r}"
        for key, value in SKELETON.items()
        if config.get(key, value) != value
    ]
    kinds = config["layer_types"]
    if "attention" in kinds:
        reasons += _attention_refusals(config, [i for i, kind in enumerate(kinds) if kind == "attention"])
    if "gated_deltanet" in kinds:
        reasons += _gated_deltanet_refusals(config)
    return reasons


def _attention_refusals(config: dict[str, Any], kept: list[int]) -> list[str]:
    """What the kept attention layers compute that Qwen3-Next's gated attention cannot."""
    reasons = []
    qk_norm = config.get("qk_norm")
    if qk_norm is None:
        reasons.append(f"its attention layers have no q/k norm (qk_norm null, as the Llama family), which {TITLE}'s "
                       "attention always applies: export a pure Gated DeltaNet conversion (no --attn-layers), or a "
                       "hybrid of a source with per-head q/k norms (Qwen3)")  # fmt: skip
    elif qk_norm != "head":
        reasons.append(f"its attention layers normalise q and k over the whole width (qk_norm {qk_norm!r}); "
                       f"{TITLE}'s normalise each head")  # fmt: skip
    for key, (value, what) in ATTENTION_ONLY.items():
        if config.get(key, value) != value:
            reasons.append(f"its attention layers have {what} ({key} {config.get(key)!r}), which {TITLE}'s lack")
    scale = config.get("attention_multiplier")
    if scale is not None and scale != config["head_dim"] ** -0.5:
        reasons.append(f"a softmax scale of {scale:g} (attention_multiplier); {TITLE}'s is head_dim ** -0.5 = "
                       f"{config['head_dim'] ** -0.5:g}")  # fmt: skip
    sliding = [i for i in kept if _slides(config, i)]
    if sliding:
        reasons.append(f"attention layers {sliding} attend within a window of {config['sliding_window']} "
                       f"(sliding_window); {TITLE}'s attend to every earlier token")  # fmt: skip
    flags = config.get("no_rope_layers")
    unrotated = [i for i in kept if flags is not None and not flags[i]]
    if unrotated:
        reasons.append(f"attention layers {unrotated} use no RoPE (no_rope_layers); {TITLE} rotates every one")
    rope_type = config.get("rope_parameters", {}).get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        reasons.append(f"rope_type {rope_type!r}, which {TITLE}'s rotary embedding does not compute "
                       f"(it computes {', '.join(ROPE_TYPES)})")  # fmt: skip
    return reasons


def _slides(config: dict[str, Any], index: int) -> bool:
    """Whether attention layer `index` attends within a window (modeling_xatl's `attention_type`)."""
    if config.get("sliding_window") is None:
        return False
    types = config.get("attention_types")
    return types is None or types[index] == "sliding_attention"


def _gated_deltanet_refusals(config: dict[str, Any]) -> list[str]:
    """What the Gated DeltaNet layers have that Qwen3-Next's cannot hold."""
    g = config["gated_deltanet"]
    reasons = [
        f"gated_deltanet.{key}: its {where} has a bias, which {TITLE}'s Gated DeltaNet has not"
        for key, where in GATED_DELTANET_BIASES.items()
        if g[key]
    ]
    if config.get("hidden_act") not in SILU:
        reasons.append(f"hidden_act {config.get('hidden_act')!r}: {TITLE} uses it for the Gated DeltaNet conv too, "
                       "where xatl uses silu")  # fmt: skip
    if not math.isclose(g["norm_eps"], config["norm_eps"], rel_tol=1e-6):  # a float32-rounded eps is fine
        reasons.append(f"gated_deltanet.norm_eps {g['norm_eps']:g} is not norm_eps {config['norm_eps']:g}, which "
                       f"{TITLE}'s gated norm uses: convert again (it takes the source's unless --set)")  # fmt: skip
    return reasons


def target_config(config: dict[str, Any]) -> dict[str, Any]:
    """Qwen3-Next's config.json for an xatl config that `refusals` accepts: dense MLPs (num_experts 0)."""
    g, kinds = config["gated_deltanet"], config["layer_types"]
    rope = dict(config["rope_parameters"])
    rope.setdefault("partial_rotary_factor", 1.0)  # absent, Qwen3-Next would rotate a quarter of each head
    return {
        "architectures": ["Qwen3NextForCausalLM"],
        "model_type": NAME,
        "vocab_size": config["vocab_size"],
        "hidden_size": config["hidden_size"],
        "intermediate_size": config["intermediate_size"],
        "num_hidden_layers": config["num_hidden_layers"],
        "layer_types": ["full_attention" if kind == "attention" else "linear_attention" for kind in kinds],
        "num_attention_heads": config["num_attention_heads"],
        "num_key_value_heads": config["num_key_value_heads"],
        "head_dim": config["head_dim"],
        "attention_bias": any(bias_flags(config, "attention").values()),  # zeros where one has none: exact
        "hidden_act": config["hidden_act"],
        "rms_norm_eps": config["norm_eps"],
        "max_position_embeddings": config["max_position_embeddings"],
        "rope_parameters": rope,
        # the legacy top-level keys too, as Qwen's own checkpoints have them: engines that read these (SGLang's
        # config class defaults partial_rotary_factor to 0.25) rotate what transformers rotates
        "rope_theta": rope["rope_theta"],
        "partial_rotary_factor": rope["partial_rotary_factor"],
        "linear_num_key_heads": g["num_heads"],
        "linear_num_value_heads": g["num_v_heads"],
        "linear_key_head_dim": g["head_k_dim"],
        "linear_value_head_dim": g["head_v_dim"],
        "linear_conv_kernel_dim": g["d_conv"],
        "num_experts": 0,  # with none, Qwen3NextDecoderLayer builds a dense Qwen3NextMLP of intermediate_size
        "mlp_only_layers": [],
        "decoder_sparse_step": 1,
        "initializer_range": config.get("initializer_range", 0.02),
        "tie_word_embeddings": config["tie_word_embeddings"],
        "use_cache": "attention" in kinds,  # see the module docstring
        "pad_token_id": config.get("pad_token_id"),
        "bos_token_id": config.get("bos_token_id"),
        "eos_token_id": config.get("eos_token_id"),
    }


def tensors(name: str, value: torch.Tensor, config: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    """Qwen3-Next's name(s), layout and value of one xatl tensor."""
    if name == "model.final_norm.weight":
        return [("model.norm.weight", zero_centred(value, config))]
    layer = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if layer is None:
        return [(name, value)]  # model.embed_tokens.weight, lm_head.weight
    index, rest = int(layer.group(1)), layer.group(2)
    prefix = f"model.layers.{index}"
    if rest == "input_norm.weight":
        return [(f"{prefix}.input_layernorm.weight", zero_centred(value, config))]
    if rest == "mlp_norm.weight":
        return [(f"{prefix}.post_attention_layernorm.weight", zero_centred(value, config))]
    if rest == "mlp.fc1.weight":  # xatl [up; gate]
        up, gate = value.chunk(2, dim=0)
        return [(f"{prefix}.mlp.up_proj.weight", up), (f"{prefix}.mlp.gate_proj.weight", gate)]
    if rest == "mlp.fc2.weight":
        return [(f"{prefix}.mlp.down_proj.weight", value)]
    part = rest.removeprefix("mixer.")
    if config["layer_types"][index] == "attention":
        return attention_tensors(f"{prefix}.self_attn", part, value, config)
    if part == "in_proj.weight":
        return in_proj_tensors(f"{prefix}.linear_attn", value, config["gated_deltanet"])
    return [(f"{prefix}.linear_attn.{part}", value)]  # conv1d, dt_bias, A_log, norm (plain x·w), out_proj


def zero_centred(weight: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
    """A norm weight w (xatl applies w + norm_weight_offset) as Qwen3NextRMSNorm's, which applies 1 + stored: kept
    in float32 (a norm is one row), because w − 1 in bf16 rounds every weight below 0.5 (measured on SmolLM2-135M:
    9.6e-3 relative at layer 0, where float32 is exact)."""
    return weight.float() + (config.get("norm_weight_offset", 0.0) - 1.0)


def attention_tensors(
    prefix: str, part: str, value: torch.Tensor, config: dict[str, Any]
) -> list[tuple[str, torch.Tensor]]:
    """One tensor of a kept attention layer: q_proj gains zero gate rows per head (sigmoid(0) = 0.5), out_proj
    becomes o_proj doubled (its bias unchanged); a projection's weight brings a zero bias where the format's one
    `attention_bias` flag gives it a bias the xatl layer has not."""
    projection, kind = part.rsplit(".", 1)
    if projection in ("q_norm", "k_norm"):
        return [(f"{prefix}.{part}", zero_centred(value, config))]
    renamed = "o_proj" if projection == "out_proj" else projection
    if projection == "q_proj":
        value = gated_query(value, config["head_dim"])
    elif projection == "out_proj" and kind == "weight":
        value = value * 2
    out = [(f"{prefix}.{renamed}.{kind}", value)]
    flags = bias_flags(config, "attention")
    if kind == "weight" and not flags[projection] and any(flags.values()):
        out.append((f"{prefix}.{renamed}.bias", torch.zeros(value.shape[0], dtype=value.dtype)))
    return out


def gated_query(value: torch.Tensor, head_dim: int) -> torch.Tensor:
    """q_proj rows (or bias) [q_0, q_1, ...] per head as Qwen3-Next's [q_0, gate_0, q_1, gate_1, ...], gates zero."""
    heads = value.reshape(-1, head_dim, *value.shape[1:])
    return torch.cat([heads, torch.zeros_like(heads)], dim=1).reshape(-1, *value.shape[1:])


def in_proj_tensors(prefix: str, value: torch.Tensor, g: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    """xatl's in_proj rows [q, k, v, z, b, a] as Qwen3-Next's in_proj_qkvz and in_proj_ba, grouped per key head."""
    heads, v_heads, dk, dv = g["num_heads"], g["num_v_heads"], g["head_k_dim"], g["head_v_dim"]
    per_head = v_heads // heads  # value heads per key head
    q, k, v, z, b, a = value.split([heads * dk, heads * dk, v_heads * dv, v_heads * dv, v_heads, v_heads])
    columns = value.shape[1:]
    qkvz = torch.cat([t.reshape(heads, -1, *columns) for t in (q, k, v, z)], dim=1).reshape(-1, *columns)
    ba = torch.cat([t.reshape(heads, per_head, *columns) for t in (b, a)], dim=1).reshape(-1, *columns)
    return [(f"{prefix}.in_proj_qkvz.weight", qkvz), (f"{prefix}.in_proj_ba.weight", ba)]
