"""Stage `kd`: the whole student learns the teacher's next-token distribution, end to end.

After `align` the mixers each compute roughly what their attention layer did; `kd` trains them together against
the teacher's logits: KL(teacher ‖ student) at a temperature, plus an optional next-token loss. The transferred
weights start frozen and the Loss Improvement Threshold unfreezes them as their own parameter group (XATL's
recipe), through `LITCallback`, which the trainer tells the loss it optimises.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .callback import LITCallback, LITTrainer


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    temperature: float = 1.0,
    ce_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """KL(teacher ‖ student) per token at `temperature` (scaled by T², so the gradient's size does not depend on
    T, as Hinton et al.), plus `ce_weight` × the next-token loss on `labels`. Computed in float32. Returns the loss
    and its parts, for logging."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    vocab = student_logits.shape[-1]
    student = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2
    parts = {"kl": kl.item()}
    loss = kl
    if ce_weight and labels is not None:
        ce = F.cross_entropy(student_logits[:, :-1].float().reshape(-1, vocab), labels[:, 1:].reshape(-1))
        parts["ce"] = ce.item()
        loss = loss + ce_weight * ce
    return loss, parts


class DistillationTrainer(LITTrainer):
    """HF Trainer whose loss is `distillation_loss` against a frozen teacher, run in eval mode under no_grad.

    Everything else is the Trainer's: optimiser, schedule, gradient accumulation, checkpoints, and distribution
    through accelerate (the teacher is placed on each process's device, never wrapped or sharded for training).
    """

    def __init__(
        self, *args: Any, teacher: nn.Module, temperature: float = 1.0, ce_weight: float = 0.0, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature = temperature
        self.ce_weight = ce_weight
        self._parts: dict[str, list[float]] = {}

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False, **kwargs: Any
    ) -> Any:
        input_ids = inputs["input_ids"]
        if next(self.teacher.parameters()).device != input_ids.device:
            self.teacher.to(input_ids.device)
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=input_ids).logits
        outputs = model(input_ids=input_ids)
        loss, parts = distillation_loss(
            outputs.logits, teacher_logits, inputs.get("labels"), self.temperature, self.ce_weight
        )
        if model.training:
            for name, value in parts.items():
                self._parts.setdefault(name, []).append(value)
            for callback in self.callback_handler.callbacks:
                if isinstance(callback, LITCallback):
                    callback.record(loss)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the loss's parts (KL, next-token), averaged since the last log, to the Trainer's own logs."""
        for name, values in self._parts.items():
            if values:
                logs[f"kd/{name}"] = sum(values) / len(values)
        self._parts = {}
        super().log(logs, *args, **kwargs)
