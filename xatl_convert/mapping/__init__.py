"""Mapping files: schema, loading, `{i}` patterns and `${...}` expressions.

The names below load on first use: `xatl --help` needs the layer presets, not pydantic and the schema.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from xatl_convert._lazy import lazy_attributes

if TYPE_CHECKING:
    from xatl_convert.mapping.loader import builtin_mappings, load_mapping, parse_mapping
    from xatl_convert.mapping.schema import InitRule, Mapping, TensorRule

__all__ = ["InitRule", "Mapping", "TensorRule", "builtin_mappings", "load_mapping", "parse_mapping"]
__getattr__ = lazy_attributes(
    __name__,
    {
        "builtin_mappings": "xatl_convert.mapping.loader",
        "load_mapping": "xatl_convert.mapping.loader",
        "parse_mapping": "xatl_convert.mapping.loader",
        "InitRule": "xatl_convert.mapping.schema",
        "Mapping": "xatl_convert.mapping.schema",
        "TensorRule": "xatl_convert.mapping.schema",
    },
)
