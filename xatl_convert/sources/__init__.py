"""Resolving a source reference and opening its checkpoint lazily.

The names below load on first use: `xatl sources` reads only the aliases, without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from xatl_convert._lazy import lazy_attributes

if TYPE_CHECKING:
    from xatl_convert.sources.checkpoint import SourceCheckpoint, TensorInfo, open_checkpoint
    from xatl_convert.sources.resolve import resolve_source

__all__ = ["SourceCheckpoint", "TensorInfo", "open_checkpoint", "resolve_source"]
__getattr__ = lazy_attributes(
    __name__,
    {
        "SourceCheckpoint": "xatl_convert.sources.checkpoint",
        "TensorInfo": "xatl_convert.sources.checkpoint",
        "open_checkpoint": "xatl_convert.sources.checkpoint",
        "resolve_source": "xatl_convert.sources.resolve",
    },
)
