"""The one .gguf file of a gguf export, written streamed and read back.

A GGUF header lists every tensor's name, shape and type before any data. So the writer first maps every xatl tensor
on the meta device (names and shapes, no data), writes the header and the metadata, then reads, maps, converts and
writes one xatl tensor at a time: memory stays near the largest tensor, whatever the model's size.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xatl_convert.export import gguf as layout
from xatl_convert.sources.checkpoint import SourceCheckpoint

_FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0"}
# generation_config.json → llama.cpp's sampling defaults (general.sampling.*), where it has a key
_SAMPLING = {"temperature": "temp", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
             "repetition_penalty": "penalty_repeat"}  # fmt: skip


def require_gguf() -> Any:
    """The `gguf` library, or an ExportError that says how to install it."""
    from xatl_convert.export.writer import ExportError

    try:
        import gguf
    except ImportError:
        raise ExportError("--format gguf needs the gguf library: pip install 'xatl-convert[gguf]'") from None
    return gguf


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the .gguf: its name, the xatl tensor it comes from, its shape (PyTorch order) and GGML type."""

    name: str
    source: str
    shape: tuple[int, ...]
    type: str


def plan_tensors(weights: SourceCheckpoint, config: dict[str, Any], chosen: str) -> list[PlannedTensor]:
    """Every tensor the .gguf will hold, in file order, learned by mapping the xatl tensors on the meta device."""
    planned = []
    for name, info in weights.tensors.items():
        for gguf_name, value in layout.tensors(name, torch.empty(info.shape, dtype=info.dtype, device="meta"), config):
            shape = tuple(value.shape)
            planned.append(PlannedTensor(gguf_name, name, shape, layout.tensor_type(gguf_name, shape, chosen)))
    for gguf_name, value in layout.noop_tensors(config, device="meta"):
        shape = tuple(value.shape)
        planned.append(PlannedTensor(gguf_name, "", shape, layout.tensor_type(gguf_name, shape, chosen)))
    return planned


def converted(value: torch.Tensor, type_name: str) -> np.ndarray:
    """The bytes (as numpy) of one tensor in a GGML type; F16, BF16 and Q8_0 round as llama.cpp's converter does."""
    import gguf

    data = value.detach().to(torch.float32).contiguous().numpy()
    return gguf.quants.quantize(data, gguf.GGMLQuantizationType[type_name])


def mapped_values(weights: SourceCheckpoint, config: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, value in float precision before any rounding) of every tensor, one xatl tensor in memory at a
    time, in the order `plan_tensors` lists them."""
    for name in weights.tensors:
        yield from layout.tensors(name, weights.read(name), config)
    yield from layout.noop_tensors(config)


def write_gguf(
    path: Path, folder: Path, weights: SourceCheckpoint, config: dict[str, Any], planned: list[PlannedTensor],
    chosen: str, name: str, provenance: dict[str, str],
) -> str:  # fmt: skip
    """Write the .gguf at `path` (`name` is its general.name); returns the tokenizer's pre-tokenizer name."""
    gguf = require_gguf()
    writer = gguf.GGUFWriter(None, layout.ARCHITECTURE)
    writer.add_name(name)
    pre = _add_keys(writer, folder, config, chosen)
    for key, value in provenance.items():
        writer.add_string(f"xatl.{key}", value)
    writer.add_array("xatl.layer_types", list(config["layer_types"]))
    for tensor in planned:
        qtype = gguf.GGMLQuantizationType[tensor.type]
        if tensor.type in ("BF16", "Q8_0"):
            byte_shape = gguf.quants.quant_shape_to_byte_shape(tensor.shape, qtype)
            writer.add_tensor_info(tensor.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), qtype)
        else:
            dtype = np.dtype(np.float32 if tensor.type == "F32" else np.float16)
            writer.add_tensor_info(tensor.name, tensor.shape, dtype, int(np.prod(tensor.shape)) * dtype.itemsize)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    types = iter(planned)
    for name, value in mapped_values(weights, config):
        tensor = next(types)
        assert tensor.name == name, (tensor.name, name)  # the two passes list the same tensors in the same order
        writer.write_tensor_data(converted(value, tensor.type))
    writer.close()
    return pre


def planned_bytes(planned: list[PlannedTensor]) -> int:
    """About the size of the .gguf (its tensors' bytes), for the free-space check before writing."""
    sizes = {"F32": 4.0, "F16": 2.0, "BF16": 2.0, "Q8_0": 34 / 32}
    return int(sum(np.prod(tensor.shape) * sizes[tensor.type] for tensor in planned))


def _add_keys(writer: Any, folder: Path, config: dict[str, Any], chosen: str) -> str:
    """Every key that follows from the xatl folder (model, tokenizer, sampling); returns the pre-tokenizer's name."""
    from xatl_convert.export.gguf_vocab import add_tokenizer

    _add_model_keys(writer, config, chosen)
    pre = add_tokenizer(writer, folder, config["vocab_size"])
    _add_generation_keys(writer, folder)
    return pre


def expected_keys(folder: Path, config: dict[str, Any], chosen: str) -> dict[str, Any]:
    """The keys (and values) `write_gguf` writes for this folder, provenance aside: what verify reads back."""
    gguf = require_gguf()
    writer = gguf.GGUFWriter(None, layout.ARCHITECTURE)
    _add_keys(writer, folder, config, chosen)
    return {key: value.value for key, value in writer.kv_data[0].items()}


def _add_model_keys(writer: Any, config: dict[str, Any], chosen: str) -> None:
    """The granitehybrid keys llama.cpp's loader reads: sizes, per-layer attention/recurrent layout, RoPE, eps, the
    ssm sizes after padding, and Granite's multipliers where they are not neutral."""
    import gguf

    kinds = config["layer_types"]
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[chosen]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    # a layer is recurrent where head_count_kv is 0 (llama.cpp's granitehybrid loader)
    kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    kv_per_layer = [kv_heads if kind == "attention" else 0 for kind in kinds]
    if layout.noop_layer(config) is None:
        writer.add_block_count(len(kinds))
        writer.add_head_count(config["num_attention_heads"])
    else:  # the identity layer: one head
        writer.add_block_count(len(kinds) + 1)
        writer.add_head_count([config["num_attention_heads"]] * len(kinds) + [1])
        kv_per_layer.append(1)
    writer.add_head_count_kv(kv_per_layer)
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_layer_norm_rms_eps(config["norm_eps"])
    rope = config.get("rope_parameters") or {}
    writer.add_rope_dimension_count(int(config["head_dim"] * rope.get("partial_rotary_factor", 1.0)))
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_rope_scaling_finetuned(True)  # granitehybrid's switch for RoPE on its attention layers
    m, dims = config["mamba2"], layout.gguf_dims(config)
    writer.add_ssm_conv_kernel(m["d_conv"])
    writer.add_ssm_inner_size(dims["inner_size"])
    writer.add_ssm_state_size(m["d_state"])
    writer.add_ssm_time_step_rank(dims["heads"])  # llama.cpp reads the Mamba2 head count from this key
    writer.add_ssm_group_count(dims["groups"])
    for key, value in layout.multiplier_keys(config).items():
        getattr(writer, f"add_{key}")(value)


def _add_generation_keys(writer: Any, folder: Path) -> None:
    """llama.cpp's sampling defaults from the folder's generation_config.json, where it samples and has a key."""
    try:
        generation = json.loads((folder / "generation_config.json").read_text())
    except (OSError, ValueError):
        return
    if not isinstance(generation, dict) or not generation.get("do_sample", False):
        return
    for key, gguf_key in _SAMPLING.items():
        value = generation.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            getattr(writer, f"add_sampling_{gguf_key}")(value)


def read_gguf(path: Path) -> Any:
    """A `gguf.GGUFReader` of the export's file, or an OutputError naming it."""
    from xatl_convert.errors import OutputError

    gguf = require_gguf()
    try:
        return gguf.GGUFReader(path)
    except (OSError, ValueError, IndexError) as error:  # gguf-py's errors on a truncated or foreign file
        raise OutputError(f"{path}: not a readable GGUF file ({error}); export again") from None


def dequantized(tensor: Any) -> torch.Tensor:
    """One GGUFReader tensor as float32, in PyTorch order."""
    import gguf

    values = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    return torch.from_numpy(np.array(values, dtype=np.float32)).reshape(shape)
