"""`xatl mappings new`: a starting mapping for a source that has no built-in one, or a family variant of one.

It folds the tensor inventory into `{i}` rules, fills in the targets it recognises from common naming schemes
(Llama, GPT-NeoX, GPT-2, Falcon-style names), reads what the source's config and tensors say (norm type and
epsilon, bias flags, key/value heads, head width, RoPE, windows), writes the chosen mixer's own settings shaped so
that the attention's W_O fits its out_proj, and marks everything else `TODO`. The loader refuses any TODO left, so
`xatl mappings validate FILE --source SRC` names exactly what is left to do.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from xatl_convert.errors import PlanError
from xatl_convert.mapping.layers import LCI_MIXERS, mixer_named, mixer_spelling
from xatl_convert.sources.checkpoint import SourceCheckpoint
from xatl_convert.sources.inventory import build_inventory

TODO = "TODO"

# (pattern on the part of a name after the layer index, target under model.layers.{i}. (with \2 = weight|bias),
# kind). Kinds: norm, attention (q/k/v), qkv (fused), w_o, mlp, up, gate (a gated MLP's halves), buffer (dropped).
_LAYER_GUESSES: list[tuple[str, str, str]] = [
    (r"(input_layernorm|ln_1|attention_norm|norm1|ln_attn)\.(weight|bias)", r"input_norm.\2", "norm"),
    (r"(post_attention_layernorm|ln_2|ffn_norm|norm2|ln_mlp)\.(weight|bias)", r"mlp_norm.\2", "norm"),
    (r"(query_key_value|c_attn|qkv_proj|Wqkv|qkv)\.(weight|bias)", r"\2", "qkv"),
    (r"(q_proj|query)\.(weight|bias)", r"mixer.q_proj.\2", "attention"),
    (r"(k_proj|key)\.(weight|bias)", r"mixer.k_proj.\2", "attention"),
    (r"(v_proj|value)\.(weight|bias)", r"mixer.v_proj.\2", "attention"),
    (r"(o_proj|attention\.dense|attn\.c_proj|self_attention\.dense|wo)\.(weight|bias)", r"mixer.out_proj.\2", "w_o"),
    (r"(down_proj|dense_4h_to_h|mlp\.c_proj|fc2|w2)\.(weight|bias)", r"mlp.fc2.\2", "mlp"),
    (r"(dense_h_to_4h|c_fc|fc1)\.(weight|bias)", r"mlp.fc1.\2", "mlp"),
    (r"(up_proj)\.(weight|bias)", r"mlp.fc1.\2", "up"),
    (r"(gate_proj)\.(weight|bias)", r"mlp.fc1.\2", "gate"),
    (r"rotary_emb\.inv_freq", "buffer recomputed from the config", "buffer"),
    (r"(attention|attn)\.(bias|masked_bias)", "causal-mask buffer of old checkpoints", "buffer"),
]
_OUTSIDE_GUESSES: list[tuple[str, str, str]] = [
    (r"(embed_tokens|wte|embed_in|word_embeddings)\.weight", "model.embed_tokens.weight", "embeddings"),
    (r"(lm_head|embed_out)\.weight", "lm_head.weight", "lm_head"),
    (r"(norm|ln_f|final_layer_norm|final_layernorm)\.(weight|bias)", r"model.final_norm.\2", "norms"),
    (r"rotary_emb\.inv_freq", "buffer recomputed from the config", "buffer"),
]
_GROUPS = {"norm": "norms", "attention": "attention", "qkv": "attention", "w_o": "w_o", "mlp": "mlp"}
# target config key -> the source config keys that may hold it, first found wins
_SOURCE_KEYS = {
    "vocab_size": ["vocab_size"],
    "hidden_size": ["hidden_size", "n_embd", "d_model"],
    "num_hidden_layers": ["num_hidden_layers", "n_layer", "num_layers"],
    "intermediate_size": ["intermediate_size", "n_inner", "ffn_dim"],
    "num_attention_heads": ["num_attention_heads", "n_head", "num_heads"],
    "num_key_value_heads": ["num_key_value_heads", "num_kv_heads", "n_head_kv"],
    "head_dim": ["head_dim"],
    "norm_eps": ["rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps", "norm_epsilon"],
    "hidden_act": ["hidden_act", "activation_function", "hidden_activation"],
    "parallel_residual": ["use_parallel_residual", "parallel_attn", "parallel_residual"],
    "max_position_embeddings": ["max_position_embeddings", "n_positions"],
    "tie_word_embeddings": ["tie_word_embeddings"],
    "bos_token_id": ["bos_token_id"],
    "eos_token_id": ["eos_token_id"],
}
_QKV_DROPPED = "attention q/k/v of a layer that gets a new mixer"
_ROPE_KEYS = ("rope_parameters",)  # transformers' current name; the legacy ones only where it is absent
_LEGACY_ROPE_KEYS = ("rope_theta", "rope_scaling", "partial_rotary_factor")


@dataclass
class _Found:
    """What the inventory showed: the rules and drops written, and the facts the config lines are read from."""

    mixer: str
    rules: list[str] = field(default_factory=list)
    drops: list[str] = field(default_factory=list)
    kinds: dict[str, set[str]] = field(default_factory=dict)  # kind -> target tails seen (input_norm.bias, ...)

    def saw(self, kind: str, target: str) -> None:
        self.kinds.setdefault(kind, set()).add(target)

    def has_bias(self, *kinds: str) -> bool | None:
        """Whether any tensor of these kinds is a bias; None when none of them was recognised."""
        seen = set().union(*(self.kinds.get(kind, set()) for kind in kinds))
        return any(name.endswith("bias") for name in seen) if seen else None


# The mixers whose settings and rules the scaffold can guess from a source (Gated DeltaNet's Q/K/V part rules it
# cannot yet: users start from a built-in family mapping).
SCAFFOLD_MIXERS: tuple[str, ...] = ("mamba", "mamba2")


def scaffold_mapping(source: SourceCheckpoint, target_mixer: str = "mamba") -> str:
    """YAML text of a starting mapping for this source; every guess carries a comment, every gap a TODO."""
    target_mixer = mixer_named(target_mixer)
    if target_mixer not in LCI_MIXERS:
        raise PlanError(
            f"--to {target_mixer!r}: unknown target (known: {', '.join(mixer_spelling(m) for m in LCI_MIXERS)})"
        )
    if target_mixer not in SCAFFOLD_MIXERS:
        raise PlanError(
            f"--to {mixer_spelling(target_mixer)}: `xatl mappings new` scaffolds {' and '.join(SCAFFOLD_MIXERS)} "
            f"mappings; start from a built-in one (`xatl mappings show llama-to-{mixer_spelling(target_mixer)}`), "
            "whose Q/K/V rules it cannot guess yet"
        )
    from xatl_convert.plan import normalised_source_config

    inventory = build_inventory(source)
    config = normalised_source_config(source)
    found = _Found(target_mixer)
    for info in inventory.outside:
        _outside_rule(found, info.name, list(info.shape), info.dtype)
    _layer_rules(found, inventory.per_layer, config)
    family = (inventory.model_type or "model").replace("_", "-")
    lines = [
        f"# Scaffolded by `xatl mappings new` from {source.reference} ({len(source.tensors)} tensors).",
        "# Values read from the source's config and tensors say so in a comment. Replace every TODO (validation",
        "# refuses them), check every guess, then run: xatl mappings validate THIS_FILE --source SRC",
        f"name: my-{family}-to-{mixer_spelling(target_mixer)}",
        f"description: {json.dumps(f'{family} to {target_mixer}, scaffolded by xatl mappings new')}",
        f"source: {{model_type: {json.dumps(inventory.model_type or TODO)}}}",
        "target:",
        "  model_type: xatl",
        f"  mixer: {target_mixer}",
        "  attention_layers: []            # indices, or a preset: paper, every-2, all",
        "  config:",
        *_config_lines(config, found),
        "options:",
        "  transfer_attention_output: true # W_O → the new mixer's out_proj where the shapes agree",
        "rules:",
        *found.rules,
        "init:",
        f'  - {{target: "model.layers.{{i}}.mixer.*", where: {target_mixer}, strategy: default}}',
        "drop:" if found.drops else "drop: []",
        *found.drops,
    ]
    return "\n".join(lines) + "\n"


def _outside_rule(found: _Found, name: str, shape: list[int], dtype: object) -> None:
    for pattern, target, group in _OUTSIDE_GUESSES:
        match = re.search(r"(?:^|\.)" + pattern + "$", name)
        if match is None:
            continue
        if group == "buffer":
            found.drops.append(_drop(name, None, target))
            return
        optional = {"optional": True} if group == "lm_head" else {}  # absent where a size ties it
        found.rules.append(_rule(match.expand(target), name, _shape(shape, dtype), group=group, **optional))
        return
    found.rules.append(_rule(TODO, name, _shape(shape, dtype, "see docs/mappings.md")))


def _layer_rules(found: _Found, patterns: list[Any], config: dict[str, Any]) -> None:
    halves: dict[tuple[str, str], dict[str, Any]] = {}  # (name with the half blanked, weight|bias) -> up/gate
    for pattern in patterns:
        tail = pattern.pattern.split(".{i}.", 1)[1]
        shape = _shape(list(pattern.shapes[0]), pattern.dtype)
        guess = _guess_layer(tail)
        if guess is None:
            found.rules.append(_rule(TODO, pattern.pattern, shape + "; see docs/mappings.md"))
            continue
        target, kind = guess
        if kind == "buffer":
            found.drops.append(_drop(pattern.pattern, None, target))
        elif kind in ("up", "gate"):
            key = (pattern.pattern.replace(f"{kind}_proj", "HALF_proj"), target)
            halves.setdefault(key, {})[kind] = pattern
        elif kind == "qkv":
            _fused_qkv_rules(found, pattern, target, config)
        else:
            full = f"model.layers.{{i}}.{target}"
            found.saw(kind, target)
            where = "attention" if kind in ("attention", "w_o") else None
            found.rules.append(_rule(full, pattern.pattern, shape, where=where, group=_GROUPS[kind]))
            if kind == "attention":
                found.drops.append(_drop(pattern.pattern, found.mixer, _QKV_DROPPED))
            if kind == "w_o":
                found.rules.append(
                    _rule(full, pattern.pattern, shape + "; W_O → the new mixer's out_proj where the shapes agree",
                          where=found.mixer, group="w_o", when="transfer_attention_output", on_mismatch="drop",
                          optional=True)
                )  # fmt: skip
    for (_, target), pair in halves.items():
        if set(pair) != {"up", "gate"}:
            for lone in pair.values():
                note = "half of a gated MLP whose other half was not found"
                found.rules.append(_rule(TODO, lone.pattern, _shape(list(lone.shapes[0]), lone.dtype, note)))
            continue
        found.saw("gated", target)
        up, gate = pair["up"], pair["gate"]
        rows = up.shapes[0][0] + gate.shapes[0][0]
        shape = _shape([rows, *up.shapes[0][1:]], up.dtype, "fc1 rows are [up; gate]")
        found.rules.append(
            _rule(f"model.layers.{{i}}.{target}", [up.pattern, gate.pattern], shape, group="mlp",
                  transform={"concat": {"dim": 0}})
        )  # fmt: skip


def _fused_qkv_rules(found: _Found, pattern: Any, suffix: str, config: dict[str, Any]) -> None:
    """GPT-NeoX's (and Bloom's, Falcon-RW's) query_key_value: rows (heads, 3, head_dim), cut by split_heads."""
    heads_key, kv_key = _source_key(config, "num_attention_heads"), _source_key(config, "num_key_value_heads")
    width = _attention_width(config)
    interleaved = (  # Falcon's multi-query and grouped layouts have other rows: left to the user
        pattern.pattern.endswith(f"query_key_value.{suffix}")
        and width is not None
        and pattern.shapes[0][0] == 3 * width
        and not config.get("multi_query")
        and not config.get("new_decoder_architecture")
        and (kv_key is None or config[kv_key] == config[heads_key])
    )
    shape = list(pattern.shapes[0])
    if not interleaved:
        note = "fused q/k/v: split_heads (or split) into q_proj, k_proj, v_proj; see docs/mappings.md"
        found.rules.append(_rule(TODO, pattern.pattern, _shape(shape, pattern.dtype, note), where="attention"))
        found.drops.append(_drop(pattern.pattern, found.mixer, _QKV_DROPPED))
        return
    for take, part in enumerate(("q", "k", "v")):
        target = f"mixer.{part}_proj.{suffix}"
        found.saw("qkv", target)
        split = {
            "split_heads": {"parts": 3, "take": take, "heads": f"${{source.{heads_key}}}", "layout": "interleaved"}
        }
        note = f"rows (heads, 3, head_dim): the {part} rows of each head"
        found.rules.append(
            _rule(f"model.layers.{{i}}.{target}", pattern.pattern, _shape(shape, pattern.dtype, note),
                  where="attention", group="attention", transform=split)
        )  # fmt: skip
    found.drops.append(_drop(pattern.pattern, found.mixer, _QKV_DROPPED))


class _ConfigLines:
    """The `target.config` lines: a value, then a comment that says where it came from."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.lines: list[str] = []

    def put(self, key: str, value: Any, comment: str = "", indent: int = 4) -> None:
        text = value if isinstance(value, str) else json.dumps(value)
        self.lines.append(_commented(f"{' ' * indent}{key}: {text}", comment))

    def read(self, key: str, comment: str = "", missing: str | None = TODO) -> None:
        """`${source.KEY}` from the first source key that holds it; `missing` (None: no line) where none does."""
        name = _source_key(self.config, key)
        if name is not None:
            self.put(key, f"${{source.{name}}}", comment)
        elif missing is not None:
            self.put(key, missing, comment or "not in the source config")


def _config_lines(config: dict[str, Any], found: _Found) -> list[str]:
    out = _ConfigLines(config)
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size"):
        out.read(key)
    eps_key = _source_key(config, "norm_eps")
    if eps_key == "rms_norm_eps":
        out.put("norm_type", "rmsnorm", f"the config has {eps_key}")
    elif eps_key in ("layer_norm_eps", "layer_norm_epsilon"):
        out.put("norm_type", "layernorm", f"the config has {eps_key}")
    else:
        out.put("norm_type", TODO, "layernorm or rmsnorm")
    out.read("norm_eps")
    out.put("norm_bias", *_flag(found.has_bias("norm"), "norm biases", "the norms"))
    out.read("hidden_act")
    out.put("mlp_bias", *_flag(found.has_bias("mlp", "gated"), "MLP biases", "the MLP"))
    if "gated" in found.kinds:
        out.put("mlp_gated", True, "up_proj and gate_proj: fc1 rows are [up; gate]")
    elif "mlp" in found.kinds:
        out.put("mlp_gated", False, "one input projection (fc1)")
    else:
        out.put("mlp_gated", TODO, "true when the MLP has a gate projection")
    norms = found.kinds.get("norm", set())
    if _source_key(config, "parallel_residual") is not None:
        out.read("parallel_residual")
    elif any(name.startswith("mlp_norm") for name in norms):
        out.put("parallel_residual", False, "a norm per branch and no parallel flag: sequential")
    elif norms:
        out.put("parallel_residual", True, "one norm per layer: a GPT-J-style parallel block")
    else:
        out.put("parallel_residual", TODO, "true for GPT-NeoX-style blocks")
    out.read("num_attention_heads")
    out.read("num_key_value_heads", "grouped-query attention", missing=None)
    out.read("head_dim", missing=None)
    out.put("attention_bias", *_flag(found.has_bias("attention", "qkv"), "q/k/v biases", "the attention's q/k/v"))
    out.put("attention_out_bias", *_flag(found.has_bias("w_o"), "W_O bias", "the attention's W_O"))
    rope = [key for key in _ROPE_KEYS if config.get(key) is not None]
    for key in rope or [key for key in _LEGACY_ROPE_KEYS if config.get(key) is not None]:
        out.put(key, f"${{source.{key}}}")
    if "sliding_window" in config:
        out.put("sliding_window", "${source.sliding_window or None}", "null where the source has no window")
        if "layer_types" in config:
            out.put("attention_types", "${source.layer_types or None}", "which layers slide")
    out.read("max_position_embeddings")
    for key in ("tie_word_embeddings", "pad_token_id", "bos_token_id", "eos_token_id"):
        out.read(key, missing=None)
    _mixer_lines(out, found)
    return out.lines


def _mixer_lines(out: _ConfigLines, found: _Found) -> None:
    """The mixer's own settings: d_inner = heads × head_dim where that is a multiple of hidden_size, so W_O fits
    out_proj; Mamba2 shaped as the built-in mappings (headdim = d_state = head_dim, one group per head)."""
    config = out.config
    hidden_key, heads_key = _source_key(config, "hidden_size"), _source_key(config, "num_attention_heads")
    hidden = config.get(hidden_key) if hidden_key else None
    width = _attention_width(config)
    fits = width is not None and isinstance(hidden, int) and width % hidden == 0
    if fits:
        expand = (width // hidden, "d_inner = heads × head_dim, so W_O fits out_proj")
    else:
        expand = (1, "heads × head_dim is no multiple of hidden_size: W_O does not fit out_proj and is dropped")
    out.lines.append(f"    {found.mixer}:")
    if found.mixer == "mamba":
        settings: list[tuple[str, Any, str]] = [("d_state", 16, ""), ("d_conv", 4, ""), ("expand", *expand),
                                                ("dt_rank", "auto", "")]  # fmt: skip
    else:
        if fits and config.get("head_dim") is not None:
            head_dim = "${source.head_dim}"
        elif width is not None and hidden_key and heads_key:
            head_dim = f"${{source.{hidden_key} // source.{heads_key}}}"
        else:
            head_dim = TODO
        groups = f"${{source.{heads_key}}}" if heads_key else TODO
        settings = [("expand", *expand), ("headdim", head_dim, "the attention's head width"),
                    ("d_state", head_dim, ""), ("ngroups", groups, "one group per attention head"),
                    ("d_conv", 4, ""), ("chunk_size", 256, "")]  # fmt: skip
    settings.append(("out_proj_bias", *_flag(found.has_bias("w_o"), "W_O bias", "the attention's W_O")))
    for key, value, comment in settings:
        out.put(key, value, comment, indent=6)


def _attention_width(config: dict[str, Any]) -> int | None:
    """heads × head_dim: the width of W_O's input, or None where the config does not say."""
    heads_key, hidden_key = _source_key(config, "num_attention_heads"), _source_key(config, "hidden_size")
    heads = config.get(heads_key) if heads_key else None
    hidden = config.get(hidden_key) if hidden_key else None
    if not isinstance(heads, int) or heads <= 0:
        return None
    head_dim = config.get("head_dim")
    if isinstance(head_dim, int) and head_dim > 0:
        return heads * head_dim
    return hidden if isinstance(hidden, int) and hidden % heads == 0 else None


def _flag(value: bool | None, what: str, where: str) -> tuple[Any, str]:
    """A bias flag read from the checkpoint's tensors, with its comment; TODO where they were not recognised."""
    if value is None:
        return TODO, f"true when {where} has biases"
    return value, f"{what} found in the checkpoint" if value else f"no {what} in the checkpoint"


def _commented(line: str, comment: str) -> str:
    return f"{line:<35} # {comment}" if comment else line


def _source_key(config: dict[str, Any], key: str) -> str | None:
    return next((name for name in _SOURCE_KEYS.get(key, [key]) if config.get(name) is not None), None)


def _guess_layer(tail: str) -> tuple[str, str] | None:
    for pattern, target, kind in _LAYER_GUESSES:
        match = re.search(r"(?:^|\.)" + pattern + "$", tail)
        if match:
            return (match.expand(target) if kind != "buffer" else target), kind
    return None


def _shape(shape: list[int], dtype: object, note: str = "") -> str:
    return f"{shape} {str(dtype).removeprefix('torch.')}" + (f"; {note}" if note else "")


def _flow(value: Any) -> str:
    """A value in YAML flow style: bare words where YAML reads them back as the same string, JSON quotes elsewhere."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {_flow(item)}" for key, item in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_flow(item) for item in value) + "]"
    text = str(value)
    bare = re.fullmatch(r"[a-z_][a-z0-9_]*", text) and text not in ("true", "false", "null", "yes", "no", "on", "off")
    return text if bare else json.dumps(text)


def _rule(target: str, source: str | list[str], comment: str, **fields: Any) -> str:
    items = {"target": target, "source": source, **{key: value for key, value in fields.items() if value is not None}}
    quoted = {key: json.dumps(value) if key in ("target", "source") and isinstance(value, str) else _flow(value)
              for key, value in items.items()}  # fmt: skip
    return f"  - {{{', '.join(f'{key}: {text}' for key, text in quoted.items())}}}  # {comment}"


def _drop(source: str, where: str | None, reason: str) -> str:
    fields = [f"source: {json.dumps(source)}", *([f"where: {where}"] if where else []), f"reason: {json.dumps(reason)}"]
    return f"  - {{{', '.join(fields)}}}"
