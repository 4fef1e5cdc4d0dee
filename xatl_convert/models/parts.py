"""Named row blocks of fused mixer tensors, so a mapping rule can fill one block (`part: x`) of a tensor.

mamba-ssm fuses several projections into one matrix: Mamba's in_proj rows are [x; z]; Mamba2's are
[z, x, B, C, dt] and its conv1d runs over the channels [x, B, C]. Attention-informed init writes V, K and Q into
the x, B and C blocks and leaves the rest to the default init.
"""

from __future__ import annotations

from typing import Any


def mixer_parts(layer_type: str, config: Any) -> dict[str, dict[str, tuple[int, int]]]:
    """For one layer type: tensor name (relative to the mixer) → part name → (first row, end row)."""
    hidden = config.hidden_size
    if layer_type == "mamba":
        d_inner = config.mamba["expand"] * hidden
        return {"in_proj.weight": _blocks([("x", d_inner), ("z", d_inner)])}
    if layer_type == "mamba2":
        settings = config.mamba2
        d_inner = settings["expand"] * hidden
        group_rows = settings["ngroups"] * settings["d_state"]
        nheads = d_inner // settings["headdim"]
        in_proj = _blocks([("z", d_inner), ("x", d_inner), ("B", group_rows), ("C", group_rows), ("dt", nheads)])
        conv = _blocks([("x", d_inner), ("B", group_rows), ("C", group_rows)])
        return {"in_proj.weight": in_proj, "conv1d.weight": conv, "conv1d.bias": conv}
    return {}


def _blocks(sizes: list[tuple[str, int]]) -> dict[str, tuple[int, int]]:
    blocks, start = {}, 0
    for name, size in sizes:
        blocks[name] = (start, start + size)
        start += size
    return blocks
