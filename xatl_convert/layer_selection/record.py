"""What a layer selection found: each layer's score, the greedy picks, and what the measurement cost.

Light on purpose (no torch): the plan, the manifest, the model card and the CLI's table read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

METHOD = "restore-kl-greedy"
METHOD_TEXT = (
    "every new mixer aligned briefly to its attention layer; then each layer alone restored to the source's attention "
    "and the student's KL to the teacher measured on text align never read; layers picked greedily, each pick "
    "re-measured with the earlier ones restored"
)


@dataclass(frozen=True)
class LayerScore:
    """One layer's measurement: the KL to the teacher with this layer alone restored, and how far that is below the
    all-LCI student's (the score: higher is worth more as attention)."""

    layer: int
    kl: float
    score: float


@dataclass(frozen=True)
class GreedyPick:
    """A greedy pick and the student's KL with it and every earlier pick restored."""

    layer: int
    kl: float


@dataclass(frozen=True)
class SelectionBudget:
    """Tokens the measurement read (the budget bounds `tokens`) and what it computed."""

    select_tokens: int  # the budget asked for
    align_tokens: int  # text through the align steps (teacher forward, each mixer's forward and backward)
    score_tokens: int  # text the restorations are scored on, never aligned on
    align_steps: int
    score_forward_tokens: int  # compute of the scoring: tokens × the share of the model each restored pass ran

    @property
    def tokens(self) -> int:
        return self.align_tokens + self.score_tokens


@dataclass(frozen=True)
class LayerSelection:
    """The layers `auto:K` keeps and why: pass it to `convert(..., attn_layers=selection)` to convert with them, and
    the manifest and model card record it."""

    keep: int
    num_layers: int
    baseline_kl: float  # every layer LCI (after the brief align)
    scores: tuple[LayerScore, ...]  # every layer, by index
    picks: tuple[GreedyPick, ...]  # in the order they were picked
    budget: SelectionBudget
    data: str
    seed: int
    seconds: float = 0.0
    method: str = METHOD

    @property
    def chosen(self) -> list[int]:
        """The kept layers, sorted."""
        return sorted(pick.layer for pick in self.picks)

    def ranking(self) -> list[LayerScore]:
        """Every layer, best single restoration first (ties: the lower index)."""
        return sorted(self.scores, key=lambda entry: (-entry.score, entry.layer))

    def record(self) -> dict[str, Any]:
        """The manifest's `layer_selection` record (also what `select-layers --json` writes)."""
        ranks = {entry.layer: rank for rank, entry in enumerate(self.ranking(), 1)}
        return {
            "method": self.method,
            "description": METHOD_TEXT,
            "keep": self.keep,
            "chosen": self.chosen,
            "data": self.data,
            "seed": self.seed,
            "budget": {
                "select_tokens": self.budget.select_tokens,
                "tokens": self.budget.tokens,
                "align_tokens": self.budget.align_tokens,
                "score_tokens": self.budget.score_tokens,
                "align_steps": self.budget.align_steps,
                "score_forward_tokens": self.budget.score_forward_tokens,
            },
            "baseline_kl": self.baseline_kl,
            "layers": [{"layer": s.layer, "kl": s.kl, "score": s.score, "rank": ranks[s.layer]} for s in self.scores],
            "greedy": [{"layer": pick.layer, "kl": pick.kl} for pick in self.picks],
            "seconds": round(self.seconds, 3),
        }
