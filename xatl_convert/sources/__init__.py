"""Resolving a source reference and opening its checkpoint lazily.

The names below load on first use (PEP 562): `xatl sources` reads only the aliases, without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from xatl_convert.sources.checkpoint import SourceCheckpoint, TensorInfo, open_checkpoint
    from xatl_convert.sources.resolve import resolve_source

_HOMES = {
    "SourceCheckpoint": "xatl_convert.sources.checkpoint",
    "TensorInfo": "xatl_convert.sources.checkpoint",
    "open_checkpoint": "xatl_convert.sources.checkpoint",
    "resolve_source": "xatl_convert.sources.resolve",
}

__all__ = ["SourceCheckpoint", "TensorInfo", "open_checkpoint", "resolve_source"]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
