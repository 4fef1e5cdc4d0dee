"""transformers Trainer adapter for `LITController`.

The Trainer does not hand per-step losses to callbacks, so the callback hooks the model's forward to read the
loss it returns in training mode (averaged over gradient-accumulation micro-batches) and feeds it to the controller
at each `on_step_end`, which runs after the optimizer and scheduler steps: the added group's LR is set then, for
the next step.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .controller import LITController


class LITCallback(TrainerCallback):
    """Unfreezes the controller's parameters when LIT fires; logs `lit/unfrozen_at` and exposes `unfrozen_at`."""

    def __init__(self, controller: LITController) -> None:
        self.controller = controller
        self._losses: list[torch.Tensor] = []
        self._hook: Any = None
        self._logged = False

    @property
    def unfrozen_at(self) -> int | None:
        return self.controller.unfrozen_at

    def record(self, loss: torch.Tensor) -> None:
        """Report a training loss that the model's forward does not return (a trainer's own, e.g. distillation's);
        like the forward's, it is averaged over the step's micro-batches and fed to LIT at the step's end."""
        self._losses.append(loss.detach())

    def _record(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        loss = getattr(output, "loss", None)
        if module.training and loss is not None:
            self._losses.append(loss.detach())

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        model = kwargs["model"]
        if self._hook is None:
            self._hook = model.register_forward_hook(self._record)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if not self._losses:
            return control
        loss = torch.stack(self._losses).float().mean()
        self._losses.clear()
        opt, sched = kwargs["optimizer"], kwargs.get("lr_scheduler")
        if self.controller.step(loss, opt, sched, step=state.global_step):
            control.should_log = True
        return control

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        logs = kwargs.get("logs")
        if self.unfrozen_at is not None and logs is not None and not self._logged:
            logs["lit/unfrozen_at"] = self.unfrozen_at
            self._logged = True
            state.log_history.append({"lit/unfrozen_at": self.unfrozen_at, "step": state.global_step})

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
