"""Training converted models: freeze what XATL transferred, unfreeze it when the Loss Improvement Threshold fires.

`freeze_transferred` freezes by manifest group; `LITController` holds the trigger (`LossImprovementThreshold`) and
the unfrozen parameters' own optimizer group (`UnfrozenGroup`); `LITCallback` adapts it to transformers' Trainer,
and a plain loop calls `controller.step(loss, optimizer, scheduler)` once per optimizer step.
"""

from .callback import LITCallback
from .controller import LITController
from .freeze import TRANSFER_GROUPS, freeze_transferred, transferred_parameters
from .groups import UnfrozenGroup
from .lit import LIT_PRESETS, LossImprovementThreshold

__all__ = [
    "LIT_PRESETS",
    "TRANSFER_GROUPS",
    "LITCallback",
    "LITController",
    "LossImprovementThreshold",
    "UnfrozenGroup",
    "freeze_transferred",
    "transferred_parameters",
]
