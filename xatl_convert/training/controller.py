"""One object that a training loop (or the Trainer callback) calls once per optimizer step."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .groups import UnfrozenGroup
from .lit import LossImprovementThreshold

log = logging.getLogger(__name__)


class LITController:
    """Couples the LIT trigger with the frozen parameters' future optimizer group.

    Plain PyTorch: after `optimizer.step()` (and `scheduler.step()`, if any) call `controller.step(loss, optimizer,
    scheduler)`. The step count is the number of optimizer steps done; `unfrozen_at` is the step after which the
    transferred parameters were unfrozen (they first move in step `unfrozen_at + 1`).
    """

    def __init__(
        self,
        frozen: Sequence[nn.Parameter] | dict[str, nn.Parameter],
        lr: float,
        warmup_steps: int = 100,
        trigger: LossImprovementThreshold | None = None,
        weight_decay: float | None = None,
        follow_schedule: bool = True,
        schedule: Callable[[int], float] | None = None,
        on_unfreeze: Callable[[int], None] | None = None,
    ) -> None:
        params = list(frozen.values()) if isinstance(frozen, dict) else list(frozen)
        self.trigger = trigger or LossImprovementThreshold.preset("paper-1pct")
        self.group = UnfrozenGroup(params, lr, warmup_steps, weight_decay, follow_schedule, schedule=schedule)
        self.on_unfreeze = on_unfreeze
        self.steps = 0
        self.unfrozen_at: int | None = None

    @property
    def unfrozen(self) -> bool:
        return self.unfrozen_at is not None

    def step(
        self,
        loss: float | torch.Tensor,
        optimizer: torch.optim.Optimizer,
        scheduler: Any | None = None,
        step: int | None = None,
    ) -> bool:
        """Record this step's loss; unfreeze on the trigger; keep the new group's LR on its schedule.

        Returns True at the step that unfroze. `step` overrides the internal count (the Trainer's global_step).
        """
        self.steps = self.steps + 1 if step is None else step
        value = loss.item() if isinstance(loss, torch.Tensor) else float(loss)
        if self.unfrozen_at is None:
            if self.trigger.observe(value):
                self.unfreeze(optimizer, scheduler)
                return True
            return False
        self.group.set_lr(optimizer, self.steps)
        return False

    def unfreeze(self, optimizer: torch.optim.Optimizer, scheduler: Any | None = None) -> None:
        """Unfreeze now (also callable by hand), adding the parameters' own group to `optimizer`."""
        if self.unfrozen_at is not None:
            return
        self.group.attach(optimizer, self.steps, scheduler)
        self._hooks = average_gradients_over_processes(self.group.params)
        self.unfrozen_at = self.steps
        n = sum(p.numel() for p in self.group.params)
        log.info(
            "LIT: unfroze %d transferred parameters (%d tensors) after step %d", n, len(self.group.params), self.steps
        )
        if self.on_unfreeze is not None:
            self.on_unfreeze(self.steps)


def average_gradients_over_processes(params: Sequence[nn.Parameter]) -> list[Any]:
    """Under data parallelism, average these parameters' gradients over the processes as backward makes them.

    DDP only reduces the parameters that required grad when it wrapped the model, so the ones LIT unfreezes later
    would otherwise step on each process's own gradient, and the copies would drift apart. The average is taken
    after each backward (micro-batch), which adds up to the same as once per step. Nothing in one process."""
    distributed = torch.distributed
    if not (distributed.is_available() and distributed.is_initialized()) or distributed.get_world_size() == 1:
        return []
    world = distributed.get_world_size()

    def average(param: torch.Tensor) -> None:
        distributed.all_reduce(param.grad, op=distributed.ReduceOp.SUM)
        param.grad.div_(world)

    return [param.register_post_accumulate_grad_hook(average) for param in params]
