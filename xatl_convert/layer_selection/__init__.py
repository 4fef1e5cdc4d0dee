"""Choosing the layers a hybrid keeps as attention by measurement (`--attn-layers auto:K`, `xatl select-layers`).

`select.select_layers` runs the measurement and returns a `LayerSelection` (`record`), which `convert(...,
attn_layers=selection)` converts with and records; `restoration` holds the measurement itself.
"""

from .record import LayerScore, LayerSelection, SelectionBudget

__all__ = ["LayerScore", "LayerSelection", "SelectionBudget"]
