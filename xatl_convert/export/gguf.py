"""llama.cpp's GGUF (`--format gguf`): one `model.gguf` in llama.cpp's `granitehybrid` architecture, the one llama.cpp
architecture that holds an xatl Mamba2 conversion exactly: per layer a Mamba2 mixer or attention (a layer is
recurrent where its `head_count_kv` is 0), then a gated SiLU MLP, pre-RMSNorms, Granite's multipliers, RoPE on the
attention layers (`rope.scaling.finetuned` true). llama.cpp's `mamba2` architecture has no MLP, and `nemotron_h`'s MLP
is not gated, so neither holds a transfer.

Facts read from llama.cpp's source (as vendored in llama-cpp-python 0.3.36: src/models/granite-hybrid.cpp,
mamba-base.cpp, ggml-cpu's ssm_scan): the Mamba2 layer computes out(rmsnorm_groups(y * silu(z))) with the model's
RMS eps, A = -exp(A_log) is stored as `ssm_a`, dt gets `ssm_dt.bias` then softplus, D is per head, heads h share
group h / (heads / groups); the conv bias is always added; in/out projections have no bias. Its rope is GPT-J's
(adjacent pairs), so q and k rows of a Llama-style (halves) model are permuted per head, as llama.cpp's own converter
does. The loader asserts d_inner = 2 × hidden_size: a conversion with a narrower mixer (Llama mappings use expand 1)
gets whole zero groups appended (zero in_proj rows, conv channels and out_proj columns; their outputs are exactly 0,
and a group's norm sees only its own channels), which computes the same function at twice the mixer width.

A model without any attention layer gets one more layer at the end that computes x exactly: attention with one
head whose q, k, v and output are zero, and an MLP whose down projection is zero (x + 0 + 0 = x). llama.cpp (0.3.36)
aborts on an all-recurrent granitehybrid (`GGML_ASSERT(buffer)`: `llm_graph_input_mem_hybrid::set_input` fills the
KV-cache inputs of a graph that has no attention, whose inputs were never allocated); one attention layer avoids it.

llama.cpp's own converter (`convert_hf_to_gguf.py`) cannot be used on an export: it turns RoPE off for GraniteMoeHybrid
hybrids. The writer is xatl_convert/export/gguf_file.py, the tokenizer xatl_convert/export/gguf_vocab.py.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

LOADS_WITH = "llama.cpp, Ollama, LM Studio"
NAME = "gguf"
ARCHITECTURE = "granitehybrid"
FILE_NAME = "model.gguf"
# --gguf-type: the type of the matrices; "auto" is llama.cpp's converter's default (bf16 for a bfloat16 folder,
# else f16). Norms, biases, A, D and the conv stay F32, as that converter keeps them.
GGUF_TYPES = ("auto", "f32", "f16", "bf16", "q8_0")
Q8_0_BLOCK = 32
ROPE_TYPES = ("default", "linear")  # what llama.cpp computes from keys alone (llama3's factors need a tensor)

# Every key the config must have for llama.cpp's graph, with the value it needs: general, then attention-only ones.
_GENERAL = {
    "norm_type": "rmsnorm", "norm_weight_offset": 0.0, "norm_layout": "pre", "parallel_residual": False,
    "mlp_gated": True, "hidden_act": "silu", "lm_head_bias": False, "position_embedding_type": "rope",
    "final_logit_softcapping": None,
}  # fmt: skip
_ATTENTION = {
    "qk_norm": None, "attn_logit_softcapping": None, "sliding_window": None, "no_rope_layers": None,
    "sliding_rope_parameters": None,
}  # fmt: skip


def refusals(config: dict[str, Any]) -> list[str]:
    """Every reason llama.cpp's granitehybrid graph would compute something else than the xatl config, or []."""
    kinds = set(config["layer_types"])
    where = "llama.cpp's granitehybrid"
    reasons = []
    if "mamba2" not in kinds:
        reasons.append("it has no Mamba2 layer; llama.cpp's own convert_hf_to_gguf.py converts the source itself")
    expected = {**_GENERAL, **(_ATTENTION if "attention" in kinds else {})}
    for key, value in expected.items():
        if config.get(key, value) != value:
            reasons.append(f"{key} is {config.get(key)!r}; {where} needs {value!r}")
    if "attention" in kinds:
        rope_type = config.get("rope_parameters", {}).get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            reasons.append(f"rope_type {rope_type!r}; the GGUF is written for {' or '.join(ROPE_TYPES)} only")
        if _rotary_dims(config) % 2:
            reasons.append(f"an odd number of rotary dims ({_rotary_dims(config)})")
    if "mamba2" in kinds:
        m = config["mamba2"]
        if m["proj_bias"] or m["out_proj_bias"]:
            reasons.append(f"the Mamba2 in_proj or out_proj has a bias; {where}'s has none")
        if m["norm_before_gate"]:
            reasons.append(f"Mamba2 norm_before_gate; {where} gates before its norm")
        eps = m.get("norm_eps", 1e-5)
        if not _same_float32(eps, config["norm_eps"]):
            reasons.append(f"the Mamba2 norm eps {eps:.3g} differs from norm_eps {config['norm_eps']:.3g}; "
                           f"{where} uses one RMS eps for both")  # fmt: skip
        layout = mamba2_layout(config)
        if layout.pad_groups < 0 or layout.pad_channels % layout.group_size:
            reasons.append(f"the Mamba2 width {layout.d_inner} cannot be made 2 × hidden_size "
                           f"({2 * config['hidden_size']}) with whole zero groups of {layout.group_size}; "
                           f"{where} asserts that width")  # fmt: skip
    return reasons


def _same_float32(a: float, b: float) -> bool:
    """Equal once stored as float32, as llama.cpp reads them (SmolLM2's rms_norm_eps is a float32-rounded 1e-5)."""
    return torch.tensor(a, dtype=torch.float32).item() == torch.tensor(b, dtype=torch.float32).item()


def _rotary_dims(config: dict[str, Any]) -> int:
    return int(config["head_dim"] * config["rope_parameters"].get("partial_rotary_factor", 1.0))


@dataclass(frozen=True)
class Mamba2Layout:
    """The xatl Mamba2 mixer's sizes, and the zero groups appended to reach llama.cpp's d_inner = 2 × hidden."""

    d_inner: int
    heads: int
    groups: int
    d_state: int
    group_size: int  # channels of one group: its heads × headdim
    pad_groups: int

    @property
    def pad_channels(self) -> int:
        return self.pad_groups * self.group_size

    @property
    def pad_heads(self) -> int:
        return self.pad_groups * self.heads // self.groups


def mamba2_layout(config: dict[str, Any]) -> Mamba2Layout:
    m = config["mamba2"]
    d_inner = m["expand"] * config["hidden_size"]
    group_size = d_inner // m["ngroups"]
    missing = 2 * config["hidden_size"] - d_inner
    pad_groups = missing // group_size if missing % group_size == 0 else -1
    return Mamba2Layout(d_inner, d_inner // m["headdim"], m["ngroups"], m["d_state"], group_size, pad_groups)


def gguf_dims(config: dict[str, Any]) -> dict[str, int]:
    """The ssm sizes llama.cpp reads: inner size, heads (its `time_step_rank`) and groups, after padding."""
    layout = mamba2_layout(config)
    return {
        "inner_size": layout.d_inner + layout.pad_channels,
        "heads": layout.heads + layout.pad_heads,
        "groups": layout.groups + layout.pad_groups,
    }


def noop_layer(config: dict[str, Any]) -> int | None:
    """The index of the appended identity layer (see the module's doc), for a model without attention; else None."""
    return None if "attention" in config["layer_types"] else config["num_hidden_layers"]


def noop_tensors(config: dict[str, Any], device: str = "cpu") -> list[tuple[str, torch.Tensor]]:
    """The identity layer's tensors (one head; zero q, k, v, output and MLP down projection), or none."""
    index = noop_layer(config)
    if index is None:
        return []
    hidden, width, head = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    block = f"blk.{index}."
    shapes = {"attn_norm.weight": (hidden,), "attn_q.weight": (head, hidden), "attn_k.weight": (head, hidden),
              "attn_v.weight": (head, hidden), "attn_output.weight": (hidden, head), "ffn_norm.weight": (hidden,),
              "ffn_up.weight": (width, hidden), "ffn_gate.weight": (width, hidden),
              "ffn_down.weight": (hidden, width)}  # fmt: skip
    return [
        (block + name, (torch.ones if name.endswith("norm.weight") else torch.zeros)(shape, device=device))
        for name, shape in shapes.items()
    ]


_TOP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.final_norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_BLOCK = {
    "input_norm.weight": "attn_norm.weight",
    "mlp_norm.weight": "ffn_norm.weight",
    "mlp.fc2.weight": "ffn_down.weight",
    "mlp.fc2.bias": "ffn_down.bias",
}
_ATTENTION_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "out_proj": "attn_output"}


def tensors(name: str, value: torch.Tensor, config: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    """The GGUF name(s) and layout (PyTorch order: the file's dims reversed) of one xatl tensor; works on the meta
    device too, which is how the writer learns every shape before it reads a byte."""
    if name in _TOP:
        return [(_TOP[name], value)]
    match = _LAYER.fullmatch(name)
    if match is None:
        raise _unknown(name)
    index, rest = int(match.group(1)), match.group(2)
    block = f"blk.{index}."
    if rest in _BLOCK:
        return [(block + _BLOCK[rest], value)]
    if rest.startswith("mlp.fc1."):  # xatl fc1 is [up; gate]
        up, gate = value.chunk(2, dim=0)
        kind = rest.rsplit(".", 1)[1]
        return [(f"{block}ffn_up.{kind}", up), (f"{block}ffn_gate.{kind}", gate)]
    if not rest.startswith("mixer."):
        raise _unknown(name)
    part, _, kind = rest.removeprefix("mixer.").partition(".")  # in_proj.weight, or A_log alone
    if config["layer_types"][index] == "attention":
        if part in ("q_proj", "k_proj") and not config.get("rope_interleaved", False):
            value = _halves_to_pairs(value, config["head_dim"], _rotary_dims(config))
        return [(f"{block}{_ATTENTION_NAMES[part]}.{kind}", value)]
    return _mamba2(block, part, kind, value, config)


def _unknown(name: str) -> Exception:
    from xatl_convert.export.writer import ExportError

    return ExportError(f"{name}: a tensor llama.cpp's granitehybrid has no place for; the GGUF would drop it")


def _halves_to_pairs(value: torch.Tensor, head_dim: int, rotary: int) -> torch.Tensor:
    """Reorder each head's first `rotary` rows from rotate-half (i, i + rotary/2) to GPT-J's adjacent pairs
    (2i, 2i + 1), which llama.cpp's rope rotates; q·k is unchanged, as the same order is applied to both."""
    heads = value.shape[0] // head_dim
    rows = value.reshape(heads, head_dim, -1)
    rotated = rows[:, :rotary].reshape(heads, 2, rotary // 2, -1).transpose(1, 2).reshape(heads, rotary, -1)
    return torch.cat([rotated, rows[:, rotary:]], dim=1).reshape(value.shape)


def _mamba2(block: str, part: str, kind: str, value: torch.Tensor, config: dict[str, Any]) -> list[tuple[str, Any]]:
    """A Mamba2 tensor in llama.cpp's names and shapes, padded with zero groups to d_inner = 2 × hidden_size."""
    layout = mamba2_layout(config)
    inner, bc, heads = layout.pad_channels, layout.pad_groups * layout.d_state, layout.pad_heads
    xbc = [layout.d_inner, layout.groups * layout.d_state, layout.groups * layout.d_state]
    if part == "in_proj" and kind == "weight":  # rows [z, x, B, C, dt]
        sizes, pads = [layout.d_inner, *xbc, layout.heads], [inner, inner, bc, bc, heads]
        return [(f"{block}ssm_in.weight", _pad(value, sizes, pads))]
    if part == "conv1d" and kind == "weight":  # (channels, 1, width) over x‖B‖C
        conv = [(f"{block}ssm_conv1d.weight", _pad(value.squeeze(1), xbc, [inner, bc, bc]))]
        if not config["mamba2"]["conv_bias"]:  # llama.cpp always adds one
            conv.append((f"{block}ssm_conv1d.bias", value.new_zeros(sum(xbc) + inner + 2 * bc)))
        return conv
    if part == "conv1d" and kind == "bias":
        return [(f"{block}ssm_conv1d.bias", _pad(value, xbc, [inner, bc, bc]))]
    if part == "dt_bias":
        return [(f"{block}ssm_dt.bias", _pad(value, [layout.heads], [heads]))]
    if part == "A_log":  # llama.cpp stores A itself, as xatl computes it (-exp in float32)
        return [(f"{block}ssm_a", _pad(-torch.exp(value.float()), [layout.heads], [heads], fill=-1.0)[:, None])]
    if part == "D":
        return [(f"{block}ssm_d", _pad(value, [layout.heads], [heads])[:, None])]
    if part == "norm" and kind == "weight":  # one row of weights per group
        weights = _pad(value, [layout.d_inner], [inner], fill=1.0)
        return [(f"{block}ssm_norm.weight", weights.reshape(-1, layout.group_size))]
    if part == "out_proj" and kind == "weight":  # zero columns for the zero groups
        return [(f"{block}ssm_out.weight", _pad(value.T, [layout.d_inner], [inner]).T)]
    raise _unknown(f"{block}{part}.{kind}")


def _pad(value: torch.Tensor, sizes: list[int], pads: list[int], fill: float = 0.0) -> torch.Tensor:
    """Split dim 0 into `sizes` and append `pads[i]` rows of `fill` after part i."""
    if not any(pads):
        return value
    parts = []
    for part, pad in zip(value.split(sizes, dim=0), pads, strict=True):
        parts += [part, part.new_full((pad, *part.shape[1:]), fill)] if pad else [part]
    return torch.cat(parts, dim=0)


def is_float32_tensor(gguf_name: str, shape: tuple[int, ...]) -> bool:
    """Kept F32 whatever --gguf-type says, as llama.cpp's converter keeps them: 1-D tensors, norms, the conv, and
    tensors without a `.weight` suffix (ssm_a, ssm_d, biases)."""
    return (
        len(shape) <= 1
        or gguf_name.endswith("_norm.weight")
        or ".ssm_conv1d." in gguf_name
        or not gguf_name.endswith(".weight")
    )


def tensor_type(gguf_name: str, shape: tuple[int, ...], chosen: str) -> str:
    """The GGML type name one tensor is written in: F32 for those llama.cpp keeps so, else `chosen`; Q8_0 only where
    a row is whole blocks of 32 (else F16, as llama.cpp's converter falls back)."""
    if is_float32_tensor(gguf_name, shape):
        return "F32"
    if chosen == "Q8_0" and shape[-1] % Q8_0_BLOCK:
        return "F16"
    return chosen


def chosen_type(gguf_type: str | None, folder_dtype: torch.dtype) -> str:
    """The matrices' GGML type for --gguf-type; auto is BF16 for a bfloat16 folder, else F16 (llama.cpp's converter)."""
    from xatl_convert.export.writer import ExportError

    requested = (gguf_type or "auto").lower()
    if requested not in GGUF_TYPES:
        raise ExportError(f"--gguf-type {gguf_type!r}: expected one of {', '.join(GGUF_TYPES)}")
    if requested == "auto":
        return "BF16" if folder_dtype == torch.bfloat16 else "F16"
    return requested.upper()


def multiplier_keys(config: dict[str, Any]) -> dict[str, float]:
    """Granite's multipliers as llama.cpp's keys (`{arch}.embedding_scale`, ...; the GGUFWriter's `add_<key>`), only
    where they are not neutral: llama.cpp skips a key that is absent."""
    keys = {}
    for key, gguf_key in (("embedding_multiplier", "embedding_scale"), ("residual_multiplier", "residual_scale"),
                          ("logits_scaling", "logit_scale")):  # fmt: skip
        if config.get(key, 1.0) != 1.0:
            keys[gguf_key] = float(config[key])
    scale = config.get("attention_multiplier")
    if "attention" in config["layer_types"] and scale and not math.isclose(scale, config["head_dim"] ** -0.5):
        keys["attention_scale"] = float(scale)
    return keys


def folder_refusals(folder: Path, config: dict[str, Any]) -> list[str]:
    """What the config alone does not say: whether the folder's tokenizer can be written for llama.cpp."""
    from xatl_convert.export.gguf_vocab import tokenizer_refusals

    return tokenizer_refusals(folder, config["vocab_size"])
