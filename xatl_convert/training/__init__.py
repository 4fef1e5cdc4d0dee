"""Training converted models: freeze what XATL transferred, unfreeze it when the Loss Improvement Threshold fires.

`freeze_transferred` freezes by manifest group; `LITController` holds the trigger (`LossImprovementThreshold`) and
the unfrozen parameters' own optimizer group (`UnfrozenGroup`); `LITCallback` adapts it to transformers' Trainer,
and a plain loop calls `controller.step(loss, optimizer, scheduler)` once per optimizer step. `data` reads text
(local files or a Hub dataset) into packed blocks with a held-out split that never trains; `Aligner` runs stage
`align`, each new mixer learning its layer's attention output from the teacher's own input; `DistillationTrainer`
runs stage `kd`, the HF Trainer against the teacher's logits, with LIT through `LITCallback`; `LITTrainer` resumes
checkpoints saved after LIT unfroze; `distill.distill` runs the stages end to end (`xatl distill`).
"""

from .align import Aligner, AlignError, normalised_mse
from .callback import LITCallback, LITTrainer
from .controller import LITController
from .data import DataError, DataSpec, PackedBlocks, read_documents
from .freeze import TRANSFER_GROUPS, freeze_transferred, transferred_parameters
from .groups import UnfrozenGroup
from .kd import DistillationTrainer, distillation_loss
from .lit import LIT_PRESETS, LossImprovementThreshold

__all__ = [
    "LIT_PRESETS",
    "TRANSFER_GROUPS",
    "AlignError",
    "Aligner",
    "DataError",
    "DataSpec",
    "DistillationTrainer",
    "LITCallback",
    "LITController",
    "LITTrainer",
    "LossImprovementThreshold",
    "PackedBlocks",
    "UnfrozenGroup",
    "distillation_loss",
    "freeze_transferred",
    "normalised_mse",
    "read_documents",
    "transferred_parameters",
]
