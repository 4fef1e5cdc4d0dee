"""Every top-level key of the xatl model config, declared once: its default, its kind and its meaning.

`XatlConfig` takes exactly these keys (and one settings group per registered mixer, `mixers_xatl`), checks each by
its kind, and stores them; the mapping schema builds `target.config` from the same table, so a mapping, `--set` and
the model accept the same keys with the same defaults. The kinds are the checks' names (configuration_xatl) and the
mapping schema's JSON types.

Self-contained (the stdlib only, no torch): copied into every converted folder beside configuration_xatl, and read
by the mapping schema without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

NORM_TYPES: tuple[str, ...] = ("layernorm", "rmsnorm")
# Where a block's norms sit: "pre" norm → sublayer (Llama, GPT-NeoX); "post" sublayer → norm, added to the raw
# stream (OLMo2); "sandwich" both (Gemma 2 and 3).
NORM_LAYOUTS: tuple[str, ...] = ("pre", "post", "sandwich")
QK_NORMS: tuple[str, ...] = ("head", "full")  # q/k norm over each head (Qwen3, Gemma 3) or the whole width (OLMo2)
POSITION_EMBEDDINGS: tuple[str, ...] = ("rope", "learned")  # learned: absolute positions added to the embeddings
ATTENTION_TYPES: tuple[str, ...] = ("full_attention", "sliding_attention")  # transformers' own names


@dataclass(frozen=True)
class Key:
    """One config key: its default (what XatlConfig stores when it is not given), its kind, and what it means."""

    default: Any
    kind: str
    meaning: str


# In the order a bad value is reported: the first bad key given is the one named.
MODEL_KEYS: dict[str, Key] = {
    "vocab_size": Key(50304, "int", "rows of the embedding and of the LM head"),
    "hidden_size": Key(768, "int", "width of the residual stream"),
    "num_hidden_layers": Key(12, "layers", "number of blocks"),
    "intermediate_size": Key(3072, "int", "width of the MLP (of each half when gated)"),
    "norm_type": Key("layernorm", "norm", "layernorm or rmsnorm"),
    "norm_eps": Key(1e-05, "number", "epsilon of every norm (of the Mamba2 norm too, unless mamba2.norm_eps)"),
    "norm_bias": Key(True, "bool", "LayerNorm has a bias"),
    "norm_weight_offset": Key(
        0.0, "number>=0", "RMSNorm scales by (offset + weight): 1 for Gemma, whose norm weights are stored as w - 1"
    ),
    "norm_layout": Key(
        "pre", "norm_layout", "pre: norm → sublayer; post: sublayer → norm (OLMo2); sandwich: both (Gemma 2, 3)"
    ),
    "hidden_act": Key("gelu", "activation", "MLP activation, a name in transformers' ACT2FN (gelu, silu, ...)"),
    "mlp_bias": Key(True, "bool", "the MLP's linear layers have biases"),
    "mlp_gated": Key(False, "bool", "gated MLP: fc1 rows are [up; gate], out = fc2(up * act(gate))"),
    "parallel_residual": Key(True, "bool", "x + mixer(norm1(x)) + mlp(norm2(x)) (GPT-NeoX) instead of sequential"),
    "num_attention_heads": Key(12, "int", "query heads of the attention layers"),
    "num_key_value_heads": Key(None, "int?", "key/value heads (grouped-query attention); null: num_attention_heads"),
    "head_dim": Key(None, "int?", "width of an attention head; null: hidden_size / num_attention_heads"),
    "attention_bias": Key(True, "bool", "q, k and v projections have biases"),
    "attention_out_bias": Key(True, "bool", "the attention output projection (W_O) has a bias"),
    "qk_norm": Key(None, "qk_norm", "norm q and k before RoPE: head (per head, Qwen3) or full (OLMo2); null: none"),
    "attention_multiplier": Key(None, "number?", "softmax scale of q·k (Granite, Gemma); null: head_dim ** -0.5"),
    "attn_logit_softcapping": Key(None, "number?", "cap · tanh(score / cap) on attention scores (Gemma 2)"),
    "sliding_window": Key(None, "int?", "keys a sliding layer's query sees, itself included; null: none"),
    "attention_types": Key(
        None, "attention_types", "per layer full_attention or sliding_attention; null: all slide when sliding_window"
    ),
    "position_embedding_type": Key("rope", "positions", "rope, or learned absolute positions (GPT-2, OPT)"),
    "position_embedding_offset": Key(0, "int>=0", "rows of the learned position table before position 0 (OPT: 2)"),
    "rope_interleaved": Key(False, "bool", "rotate dims in pairs (2k, 2k+1) as GPT-J, not in halves as Llama"),
    "no_rope_layers": Key(None, "flags?", "per layer 1 = RoPE, 0 = no positions (SmolLM3, Llama 4); null: all"),
    "sliding_rope_parameters": Key(
        None, "dict?", "RoPE of sliding layers (Gemma 3's local base); null: rope_parameters"
    ),
    "partial_rotary_factor": Key(None, "fraction?", "legacy: share of head_dim that RoPE rotates"),
    "rope_theta": Key(None, "number?", "legacy: RoPE base; prefer rope_parameters"),
    "rope_parameters": Key(
        None, "dict?", "transformers-style RoPE (rope_type, rope_theta, partial_rotary_factor, ...); null: default RoPE"
    ),
    "rope_scaling": Key(None, "dict?", "legacy alias of rope_parameters"),
    "max_position_embeddings": Key(2048, "int", "longest sequence the attention layers accept"),
    "tie_word_embeddings": Key(False, "bool", "the LM head shares the embedding matrix"),
    "lm_head_bias": Key(False, "bool", "the LM head has a bias (GPT-J)"),
    "embedding_multiplier": Key(1.0, "number", "embeddings are multiplied by it (Gemma: sqrt(hidden); Granite)"),
    "residual_multiplier": Key(1.0, "number", "each sublayer's output is multiplied by it before the add (Granite)"),
    "logits_scaling": Key(1.0, "number", "logits are divided by it (Granite)"),
    "final_logit_softcapping": Key(None, "number?", "cap · tanh(logit / cap) on the logits (Gemma 2)"),
    "initializer_range": Key(0.02, "number>=0", "std of the default init of linear and embedding weights"),
    "use_cache": Key(False, "bool", "generate() keeps a cache by default"),
    "pad_token_id": Key(None, "token", "padding token id"),
    "bos_token_id": Key(None, "token", "beginning-of-sequence token id"),
    "eos_token_id": Key(None, "token", "end-of-sequence token id(s)"),
}
# Keys read only at construction: legacy spellings that build rope_parameters (they stay readable as properties).
CONSTRUCTION_ONLY: tuple[str, ...] = ("partial_rotary_factor", "rope_theta", "rope_scaling")
