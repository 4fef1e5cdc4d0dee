"""transformers Trainer adapter for `LITController`.

The Trainer does not hand per-step losses to callbacks, so the callback hooks the model's forward to read the
loss it returns in training mode (averaged over gradient-accumulation micro-batches) and feeds it to the controller
at each `on_step_end`, which runs after the optimizer and scheduler steps: the added group's LR is set then, for
the next step. Under data parallelism the loss is averaged over the processes first, so that every process unfreezes
at the same step.

Checkpoints: the callback writes the controller's state (trigger history, step, unfreeze step) into each Trainer
checkpoint as `xatl_lit.json`, and `LITTrainer` reads it back on resume *before* the optimizer's state is loaded,
re-attaching the unfrozen group first: a checkpoint saved after the unfreeze holds one more parameter group than a
fresh optimizer, which a plain Trainer cannot load.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .controller import LITController
from .lit import LossImprovementThreshold

LIT_STATE_NAME = "xatl_lit.json"


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
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(loss, op=torch.distributed.ReduceOp.SUM)  # every process decides alike
            loss = loss / torch.distributed.get_world_size()
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

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir() and state.is_world_process_zero:
            (folder / LIT_STATE_NAME).write_text(json.dumps(self.state_dict(), indent=1) + "\n")
        return control

    def state_dict(self) -> dict[str, Any]:
        """What resuming needs: the controller's step and unfreeze step, and the trigger's whole history."""
        controller = self.controller
        return {"steps": controller.steps, "unfrozen_at": controller.unfrozen_at, "trigger": asdict(controller.trigger)}

    def load_state_dict(self, state: dict[str, Any], optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        """Restore the state saved in a checkpoint; an unfrozen group is re-attached to `optimizer` (and
        `scheduler`), so that the checkpoint's optimizer state, which has that group, loads into it."""
        controller = self.controller
        controller.trigger = LossImprovementThreshold(**state["trigger"])
        controller.steps = state["unfrozen_at"] if state["unfrozen_at"] is not None else state["steps"]
        if state["unfrozen_at"] is not None and controller.unfrozen_at is None:
            controller.unfreeze(optimizer, scheduler)
            self._logged = True  # logged before the checkpoint
        controller.steps = state["steps"]


class LITTrainer(Trainer):
    """A Trainer that resumes a checkpoint saved after LIT unfroze the transferred weights (see the module's text)."""

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        saved = Path(checkpoint) / LIT_STATE_NAME if checkpoint else None
        if saved is not None and saved.is_file():
            state = json.loads(saved.read_text())
            for callback in self.callback_handler.callbacks:
                if isinstance(callback, LITCallback):
                    callback.load_state_dict(state, self.optimizer, self.lr_scheduler)
        super()._load_optimizer_and_scheduler(checkpoint)
