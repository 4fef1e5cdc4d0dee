"""Freeze the parameters a conversion transferred, as its manifest records them."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn

from xatl_convert.manifest import read_manifest

TRANSFER_GROUPS = ("embeddings", "norms", "mlp", "attention", "w_o", "lm_head")


def _load(manifest: dict[str, Any] | str | Path) -> dict[str, Any]:
    return manifest if isinstance(manifest, dict) else read_manifest(manifest)


def transferred_parameters(
    model: nn.Module, manifest: dict[str, Any] | str | Path, groups: Iterable[str] | None = None
) -> dict[str, nn.Parameter]:
    """The model's parameters that the manifest marks as transferred in `groups` (default: all), by name.

    Initialised tensors, including those with `parts` (rows partly filled from the source), are never included:
    most of their rows are new and must train from the start. A tied lm_head is the embedding parameter, so it is
    returned once, under the model's own (first) name for it, whenever either group is selected.
    """
    manifest = _load(manifest)
    wanted = set(TRANSFER_GROUPS if groups is None else groups)
    unknown = wanted - set(TRANSFER_GROUPS)
    if unknown:
        raise ValueError(f"unknown transfer group(s) {sorted(unknown)}; choose from {list(TRANSFER_GROUPS)}")
    by_name = dict(model.named_parameters(remove_duplicate=False))
    canonical = {id(p): name for name, p in model.named_parameters()}  # first name of each (tied) parameter
    selected: dict[str, nn.Parameter] = {}
    missing = []
    for name, entry in manifest["tensors"].items():
        if entry["status"] != "transferred" or entry.get("group") not in wanted:
            continue
        if name not in by_name:
            if name.endswith(".weight") or name.endswith(".bias"):
                missing.append(name)
            continue  # buffers (none today) are not trainable anyway
        param = by_name[name]
        selected[canonical[id(param)]] = param
    if missing:
        raise ValueError(f"manifest tensors not found among the model's parameters: {missing[:5]}")
    return selected


def freeze_transferred(
    model: nn.Module, manifest: dict[str, Any] | str | Path, groups: Iterable[str] | None = None
) -> list[str]:
    """Set requires_grad=False on the transferred parameters of `groups`; returns their names, for logging.

    Freezing first lets the new mixers adapt to the pretrained components before those move (XATL's recipe).
    """
    params = transferred_parameters(model, manifest, groups)
    for param in params.values():
        param.requires_grad_(False)
    return list(params)
