"""The measurement: an LCI student's KL to its teacher with some of its layers restored to attention.

Restoring a layer swaps its block's mixer for the source's own attention (built from the all-attention plan, so it
is exactly the source's layer) and marks the layer as attention, which is what a hybrid that keeps it computes. The
teacher's log-probabilities are computed once. Restoring layer i changes nothing before block i, so each candidate
runs from block i on the student's own input to that block, taken from one pass with the earlier picks restored:
on average half a forward pass per candidate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from xatl_convert.models import XatlForCausalLM

from .record import GreedyPick, LayerScore

Progress = Callable[[str, int, int, dict[str, float]], None]


@contextmanager
def restored(student: XatlForCausalLM, attention: dict[int, nn.Module], layers: Iterable[int]) -> Iterator[None]:
    """While active, the student computes as the hybrid that keeps `layers` as attention (and restores after)."""
    blocks, kinds = student.model.layers, student.config.layer_types
    saved = {index: (blocks[index].mixer, blocks[index].layer_type, kinds[index]) for index in set(layers)}
    try:
        for index in saved:
            blocks[index].mixer, blocks[index].layer_type, kinds[index] = attention[index], "attention", "attention"
        yield
    finally:
        for index, (mixer, layer_type, kind) in saved.items():
            blocks[index].mixer, blocks[index].layer_type, kinds[index] = mixer, layer_type, kind


@contextmanager
def from_block(student: XatlForCausalLM, start: int, hidden: torch.Tensor) -> Iterator[None]:
    """While active, a forward runs only blocks `start`… (the model's own forward: norms, head, softcapping), with
    `hidden` as block `start`'s input."""
    decoder = student.model
    blocks = decoder.layers
    decoder.layers = nn.ModuleList(list(blocks)[start:])
    handle = decoder.layers[0].register_forward_pre_hook(lambda module, args: (hidden, *args[1:]))
    try:
        yield
    finally:
        handle.remove()
        decoder.layers = blocks


def kl_sum(student_logits: torch.Tensor, teacher_log_probs: torch.Tensor) -> float:
    """Σ over positions of KL(teacher ‖ student), at temperature 1, in float32."""
    log_probs = F.log_softmax(student_logits.float(), dim=-1).flatten(0, 1)
    return F.kl_div(log_probs, teacher_log_probs.flatten(0, 1), log_target=True, reduction="sum").item()


@dataclass
class RestorationKL:
    """The KL of `student` to the teacher on fixed blocks, with chosen layers restored to attention."""

    student: XatlForCausalLM
    attention: dict[int, nn.Module]
    batches: list[tuple[torch.Tensor, torch.Tensor]]  # (input ids, the teacher's log-probabilities)
    forward_tokens: float = field(default=0.0, init=False)  # compute: tokens × the share of the blocks each pass ran

    @torch.no_grad()
    def measure(
        self, kept: list[int], candidates: list[int], progress: Progress | None = None, label: str = "score"
    ) -> tuple[float, dict[int, float]]:
        """Mean KL per token with `kept` restored, and with `kept` plus each candidate restored."""
        layers = len(self.student.model.layers)
        total, tokens = 0.0, 0
        totals = dict.fromkeys(candidates, 0.0)
        work, done = len(self.batches) * (len(candidates) + 1), 0
        for ids, teacher in self.batches:
            with restored(self.student, self.attention, kept):
                out = self.student(input_ids=ids, output_hidden_states=True, use_cache=False)
            total += kl_sum(out.logits, teacher)
            tokens += ids.numel()
            self.forward_tokens += ids.numel()
            states, done = out.hidden_states, done + 1
            del out
            for candidate in candidates:
                hybrid = restored(self.student, self.attention, [*kept, candidate])
                with hybrid, from_block(self.student, candidate, states[candidate]):
                    logits = self.student(input_ids=ids, use_cache=False).logits
                totals[candidate] += kl_sum(logits, teacher)
                self.forward_tokens += ids.numel() * (layers - candidate) / layers
                done += 1
                if progress is not None:
                    progress(label, done, work, {"kl": total / tokens})
        return total / tokens, {candidate: value / tokens for candidate, value in totals.items()}


def greedy_picks(
    measure: RestorationKL, layers: list[int], keep: int, shortlist: int, progress: Progress | None = None
) -> tuple[float, list[LayerScore], list[GreedyPick]]:
    """The all-LCI KL, every layer's single-restoration score, and `keep` greedy picks: the best single layer, then
    each next pick the one that lowers the KL most with the earlier picks restored, among the `shortlist` best single
    layers (ties go to the lower index, so a run is deterministic)."""
    baseline, single = measure.measure([], layers, progress, "score")
    scores = [LayerScore(index, single[index], baseline - single[index]) for index in layers]
    order = sorted(layers, key=lambda index: (single[index], index))
    pool = order[: max(shortlist, keep)]
    picks = [GreedyPick(order[0], single[order[0]])]
    while len(picks) < keep:
        kept = [pick.layer for pick in picks]
        candidates = [index for index in pool if index not in kept]
        _, after = measure.measure(kept, candidates, progress, f"pick {len(kept) + 1}")
        best = min(after, key=lambda index: (after[index], index))
        picks.append(GreedyPick(best, after[best]))
    return baseline, scores, picks
