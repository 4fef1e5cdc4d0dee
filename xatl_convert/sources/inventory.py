"""A checkpoint's tensors grouped by layer: what `xatl inspect` prints and `xatl mappings new` starts from."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from xatl_convert.sources.checkpoint import SourceCheckpoint, TensorInfo

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class TensorPattern:
    """One tensor name with its layer index replaced by `{i}`, and the shape and dtype it has in each layer."""

    pattern: str
    layers: tuple[int, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: str

    @property
    def uniform(self) -> bool:
        """Whether every layer has this tensor with the same shape."""
        return len(set(self.shapes)) <= 1


@dataclass
class Inventory:
    """Tensors outside the layer stack, and per-layer tensors folded into `{i}` patterns."""

    model_type: str
    num_layers: int
    outside: list[TensorInfo] = field(default_factory=list)
    per_layer: list[TensorPattern] = field(default_factory=list)
    total_bytes: int = 0


def build_inventory(source: SourceCheckpoint) -> Inventory:
    """Fold `…layers.7.attn…` names into `…layers.{i}.attn…` patterns (the first numeric path segment)."""
    grouped: dict[str, list[tuple[int, TensorInfo]]] = {}
    outside: list[TensorInfo] = []
    for info in source.tensors.values():
        match = _LAYER_INDEX.search(info.name)
        if match is None:
            outside.append(info)
            continue
        pattern = info.name[: match.start()] + ".{i}." + info.name[match.end() :]
        grouped.setdefault(pattern, []).append((int(match.group(1)), info))
    per_layer = []
    layer_count = 0
    for pattern, items in sorted(grouped.items(), key=lambda item: _natural_key(item[0])):
        items.sort(key=lambda item: item[0])
        layer_count = max(layer_count, items[-1][0] + 1)
        per_layer.append(
            TensorPattern(
                pattern=pattern,
                layers=tuple(index for index, _ in items),
                shapes=tuple(info.shape for _, info in items),
                dtype=str(items[0][1].dtype).removeprefix("torch."),
            )
        )
    return Inventory(
        model_type=source.model_type,
        num_layers=layer_count,
        outside=sorted(outside, key=lambda info: _natural_key(info.name)),
        per_layer=per_layer,
        total_bytes=sum(info.nbytes for info in source.tensors.values()),
    )


def _natural_key(name: str) -> list[object]:
    """Sort `layers.10` after `layers.9`. isdecimal, not isdigit: `²` is a digit that int() refuses."""
    return [int(part) if part.isdecimal() else part for part in re.split(r"(\d+)", name)]
