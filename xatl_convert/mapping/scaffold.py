"""`xatl mappings new`: a starting mapping for a source that has no built-in one.

It folds the tensor inventory into `{i}` rules, fills in the targets it recognises from common naming schemes
(Llama, GPT-NeoX, GPT-2, Falcon-style names) and marks everything else `TODO`, so that
`xatl mappings validate FILE --source SRC` names exactly what is left to do.
"""

from __future__ import annotations

import json
import re
from typing import Any

from xatl_convert.sources.checkpoint import SourceCheckpoint
from xatl_convert.sources.inventory import build_inventory

TODO = "TODO"

# (pattern on the part of a name after the layer index, target under model.layers.{i}., layer type or None)
_LAYER_GUESSES: list[tuple[str, str, str | None]] = [
    (r"(input_layernorm|ln_1|attention_norm|norm1|ln_attn)\.(weight|bias)", r"input_norm.\2", None),
    (r"(post_attention_layernorm|ln_2|ffn_norm|norm2|ln_mlp)\.(weight|bias)", r"mlp_norm.\2", None),
    (r"(query_key_value|c_attn|qkv_proj|Wqkv|qkv)\.(weight|bias)", "", "attention"),
    (r"(q_proj|query)\.(weight|bias)", r"mixer.q_proj.\2", "attention"),
    (r"(k_proj|key)\.(weight|bias)", r"mixer.k_proj.\2", "attention"),
    (r"(v_proj|value)\.(weight|bias)", r"mixer.v_proj.\2", "attention"),
    (
        r"(o_proj|attention\.dense|attn\.c_proj|self_attention\.dense|wo)\.(weight|bias)",
        r"mixer.out_proj.\2",
        "attention",
    ),
    (r"(down_proj|dense_4h_to_h|mlp\.c_proj|fc2|w2)\.(weight|bias)", r"mlp.fc2.\2", None),
    (r"(dense_h_to_4h|c_fc|fc1)\.(weight|bias)", r"mlp.fc1.\2", None),
]
_OUTSIDE_GUESSES: list[tuple[str, str]] = [
    (r"(embed_tokens|wte|embed_in|word_embeddings)\.weight", "model.embed_tokens.weight"),
    (r"(lm_head|embed_out)\.weight", "lm_head.weight"),
    (r"(\.norm|ln_f|final_layer_norm|final_layernorm)\.(weight|bias)", r"model.final_norm.\2"),
]
_CONFIG_KEYS = {
    "vocab_size": ["vocab_size"],
    "hidden_size": ["hidden_size", "n_embd", "d_model"],
    "num_hidden_layers": ["num_hidden_layers", "n_layer", "num_layers"],
    "intermediate_size": ["intermediate_size", "n_inner", "ffn_dim"],
    "num_attention_heads": ["num_attention_heads", "n_head", "num_heads"],
    "max_position_embeddings": ["max_position_embeddings", "n_positions"],
    "tie_word_embeddings": ["tie_word_embeddings"],
}


def scaffold_mapping(source: SourceCheckpoint, target_mixer: str = "mamba") -> str:
    """YAML text of a starting mapping for this source; every guess carries a comment, every gap a TODO."""
    inventory = build_inventory(source)
    lines = [
        f"# Scaffolded by `xatl mappings new` from {source.reference} ({len(source.tensors)} tensors).",
        "# Replace every TODO, check every guess, then run: xatl mappings validate THIS_FILE --source SRC",
        f"name: {inventory.model_type or 'my-model'}-to-{target_mixer}",
        "description: TODO",
        f"source: {{model_type: {json.dumps(inventory.model_type or TODO)}}}",
        "target:",
        "  model_type: xatl",
        f"  mixer: {target_mixer}",
        "  attention_layers: []            # indices, or a preset: paper, every-2, all",
        "  config:",
        *_config_lines(source.config),
        "options:",
        "  transfer_attention_output: true",
        "rules:",
    ]
    for info in inventory.outside:
        target = _guess(info.name, _OUTSIDE_GUESSES)
        lines.append(_rule(target or TODO, info.name, None, list(info.shape), info.dtype))
    for pattern in inventory.per_layer:
        tail = pattern.pattern.split(".{i}.", 1)[1]
        guess = _guess_layer(tail)
        shape = list(pattern.shapes[0])
        dtype = pattern.dtype
        if guess is None or not guess[0]:
            note = "fused q/k/v: split_heads into q_proj, k_proj, v_proj" if guess else "see docs/mappings.md"
            lines.append(_rule(TODO, pattern.pattern, guess[1] if guess else None, shape, dtype, note=note))
            continue
        target, where = guess
        lines.append(_rule(f"model.layers.{{i}}.{target}", pattern.pattern, where, shape, dtype))
        if target.startswith("mixer.out_proj"):
            lines.append(_rule(f"model.layers.{{i}}.{target}", pattern.pattern, "mamba", shape, dtype, w_o=True))
    lines += [
        "init:",
        f'  - {{target: "model.layers.{{i}}.mixer.*", where: {target_mixer}, strategy: default}}',
        "# Source tensors deliberately left out, e.g. the attention q/k/v of layers that become Mamba:",
        f'#   - {{source: "TODO.{{i}}.q_proj.*", where: {target_mixer}, reason: "q/k/v of a Mamba layer"}}',
        "drop: []",
    ]
    return "\n".join(lines) + "\n"


def _config_lines(config: dict[str, Any]) -> list[str]:
    lines = []
    for key, candidates in _CONFIG_KEYS.items():
        found = next((name for name in candidates if config.get(name) is not None), None)
        value = f"${{source.{found}}}" if found else TODO
        lines.append(f"    {key}: {value}")
    lines += [
        "    norm_type: TODO                # layernorm or rmsnorm",
        "    hidden_act: TODO               # e.g. gelu, silu",
        "    mlp_gated: TODO                # true when the MLP has a gate projection",
        "    parallel_residual: TODO        # true for GPT-NeoX-style blocks",
        "    mamba: {d_state: 16, d_conv: 4, expand: 1, dt_rank: auto}",
    ]
    return lines


def _guess(name: str, guesses: list[tuple[str, str]]) -> str | None:
    for pattern, target in guesses:
        match = re.search(r"(?:^|\.)" + pattern + "$", name)
        if match:
            return match.expand(target)
    return None


def _guess_layer(tail: str) -> tuple[str, str | None] | None:
    for pattern, target, where in _LAYER_GUESSES:
        match = re.search(r"(?:^|\.)" + pattern + "$", tail)
        if match:
            return match.expand(target), where
    return None


def _rule(
    target: str,
    source: str,
    where: str | None,
    shape: list[int],
    dtype: object,
    note: str = "",
    w_o: bool = False,
) -> str:
    fields = [f"target: {json.dumps(target)}", f"source: {json.dumps(source)}"]
    if where:
        fields.append(f"where: {where}")
    if w_o:
        fields += ["when: transfer_attention_output", "on_mismatch: drop", "optional: true"]
    comment = f"{shape} {str(dtype).removeprefix('torch.')}" + (f"; {note}" if note else "")
    return f"  - {{{', '.join(fields)}}}  # {comment}"
