"""The unfrozen parameters' own optimizer param group: its own learning rate, with a linear warmup.

Schedulers built on torch's LRScheduler (all of transformers' `get_*_schedule_*`, which are LambdaLR) update
param groups with `zip(param_groups, values, strict=True)` in torch 2.13, so a group added after the scheduler was
created makes the next `scheduler.step()` raise. `attach` therefore also registers the group with the scheduler
(a base LR and, for LambdaLR, our own lambda), and `set_lr` rewrites the group's LR after each scheduler step so
schedulers of any other kind cannot clobber it either.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

GROUP_KEY = "xatl_unfrozen"


@dataclass
class UnfrozenGroup:
    """Owns the LR of the group: lr * min(1, (step - start + 1) / warmup) * schedule(step).

    `schedule` is an optional multiplier of the step (e.g. the main schedule's decay, so that both groups anneal
    together); by default the main LambdaLR's first lambda when there is one, else 1.
    """

    params: Sequence[nn.Parameter]
    lr: float
    warmup_steps: int = 100
    weight_decay: float | None = None
    follow_schedule: bool = True
    start_step: int | None = None
    schedule: Callable[[int], float] | None = None

    def factor(self, step: int) -> float:
        """Multiplier of `lr` for the optimizer step after `step` scheduler steps."""
        if self.start_step is None:
            return 0.0
        warm = min(1.0, (step - self.start_step + 1) / max(1, self.warmup_steps))
        decay = self.schedule(step) if (self.follow_schedule and self.schedule is not None) else 1.0
        return warm * decay

    def lr_at(self, step: int) -> float:
        return self.lr * self.factor(step)

    def attach(self, optimizer: torch.optim.Optimizer, step: int, scheduler: Any | None = None) -> dict[str, Any]:
        """Unfreeze the params and add them to `optimizer` as a new group; `step` is the steps done so far."""
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if any(id(p) in in_optimizer for p in self.params):
            raise ValueError("frozen parameters are already in the optimizer; build it over trainable ones only")
        self.start_step = step
        inner = getattr(scheduler, "scheduler", scheduler)  # accelerate's AcceleratedScheduler wraps the real one
        lambdas = getattr(inner, "lr_lambdas", None)
        if self.schedule is None and lambdas:
            self.schedule = lambdas[0]
        for p in self.params:
            p.requires_grad_(True)
        group: dict[str, Any] = {"params": list(self.params), "lr": self.lr_at(step), GROUP_KEY: True}
        group["initial_lr"] = self.lr
        if self.weight_decay is not None:
            group["weight_decay"] = self.weight_decay
        optimizer.add_param_group(group)
        if inner is not None and hasattr(inner, "base_lrs"):
            inner.base_lrs.append(self.lr)
            if lambdas is not None:
                lambdas.append(self.factor)
        return optimizer.param_groups[-1]

    def set_lr(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Write this group's LR for the next optimizer step (after `step` steps)."""
        for group in optimizer.param_groups:
            if group.get(GROUP_KEY):
                group["lr"] = self.lr_at(step)
