"""Resolving a source reference and opening its checkpoint lazily."""

from xatl_convert.sources.checkpoint import SourceCheckpoint, TensorInfo, open_checkpoint
from xatl_convert.sources.resolve import resolve_source

__all__ = ["SourceCheckpoint", "TensorInfo", "open_checkpoint", "resolve_source"]
