"""Mapping files: schema, loading, `{i}` patterns and `${...}` expressions."""

from xatl_convert.mapping.loader import builtin_mappings, load_mapping, parse_mapping
from xatl_convert.mapping.schema import InitRule, Mapping, TensorRule

__all__ = ["InitRule", "Mapping", "TensorRule", "builtin_mappings", "load_mapping", "parse_mapping"]
