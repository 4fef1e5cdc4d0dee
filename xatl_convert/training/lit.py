"""The Loss Improvement Threshold: when has training stopped gaining enough to unfreeze?"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# The paper's two settings: (threshold, patience).
LIT_PRESETS: dict[str, dict[str, float | int]] = {
    "paper-1pct": {"threshold": 0.01, "patience": 1},
    "paper-0.5pct": {"threshold": 0.005, "patience": 2},
}
# `after-N`: unfreeze after exactly N steps, whatever the loss does. On SmolLM2-135M the paper's plateau test never
# fired within a few hundred steps, so the transferred weights never moved; a fixed step (1 = from the start, at the
# unfreeze learning rate) is how benchmarks/distill_bench.py measures forgetting against fit.
FIXED_STEP = re.compile(r"after-([1-9][0-9]*)")
PRESET_NAMES = (*LIT_PRESETS, "after-N")


@dataclass
class LossImprovementThreshold:
    """Fires once when the windowed training loss has plateaued.

    The loss is averaged over consecutive windows of `window` steps; when the relative improvement between two
    consecutive windows, (prev - cur) / prev, is below `threshold` for `patience` windows in a row, it fires.
    Pure logic (no torch), so it can be tested on synthetic loss sequences.
    """

    window: int = 50
    threshold: float = 0.01
    patience: int = 1
    fixed_step: int | None = None  # fire after exactly this many steps instead of on a plateau
    steps: int = 0
    fired_at: int | None = None
    window_means: list[float] = field(default_factory=list)
    _sum: float = 0.0
    _count: int = 0
    _below: int = 0

    @classmethod
    def preset(cls, name: str, window: int = 50) -> LossImprovementThreshold:
        """`paper-1pct` (threshold 0.01, patience 1), `paper-0.5pct` (threshold 0.005, patience 2), or `after-N`
        (fire after step N, N ≥ 1)."""
        fixed = FIXED_STEP.fullmatch(name)
        if fixed:
            return cls(window=window, fixed_step=int(fixed.group(1)))
        if name not in LIT_PRESETS:
            raise ValueError(f"unknown LIT preset {name!r}; choose from {', '.join(PRESET_NAMES)}")
        return cls(window=window, **LIT_PRESETS[name])  # type: ignore[arg-type]

    def __post_init__(self) -> None:
        if self.window < 1 or self.patience < 1:
            raise ValueError("window and patience must be >= 1")

    def observe(self, loss: float) -> bool:
        """Record one step's training loss; True exactly once, at the step that completes the plateau."""
        self.steps += 1
        if self.fired_at is not None:
            return False
        if self.fixed_step is not None:
            if self.steps >= self.fixed_step:
                self.fired_at = self.steps
                return True
            return False
        self._sum += float(loss)
        self._count += 1
        if self._count < self.window:
            return False
        mean = self._sum / self._count
        self._sum, self._count = 0.0, 0
        if self.window_means:
            prev = self.window_means[-1]
            improvement = (prev - mean) / prev if prev else 0.0
            self._below = self._below + 1 if improvement < self.threshold else 0
        self.window_means.append(mean)
        if self._below >= self.patience:
            self.fired_at = self.steps
            return True
        return False
