"""Stage `align`: each new mixer learns to compute what the attention layer it replaces computed.

At depth a converted model knows nothing until its mixers do what attention did (MOHAWK, RADLADS, MambaInLlama and
LoLCATs all start here). For every LCI layer, the teacher's own normalised input to that layer's attention goes into
the student's mixer, and the mixer is trained to give the teacher's attention output (normalised MSE). The student's
input norm is the teacher's, transferred, so that input is exactly what the mixer will see once the model is whole.
Only the LCI layers' mixers train. By default that includes the attention output projection W_O, which the
conversion copied into each mixer's `out_proj` as its starting point: fitting it with the rest of the mixer recovers
the layer's output far faster (on SmolLM2-135M → Mamba2, 16 steps: held-out 12.9 with it, 14.1 without, at the same
learning rate). `train_w_o=False` keeps it frozen too. Everything else transferred (embeddings, norms, MLPs, kept
attention layers, the head) stays as it is (XATL's freezing) until `kd`'s LIT. One teacher forward per batch
gives every layer's pair; each layer's graph is built and freed in turn, so memory is one teacher forward plus one
mixer's graph.

With `target = "block"` (MOHAWK's stage 2, hidden-state alignment), the pair is instead the teacher block's input
and the residual update it adds (output − input), and the student's whole block runs on that input: the mixer is
then fitted through the transferred MLP and norms to what the block must add to the stream, not only to what its
attention computed. The same parameters train; only the target moves.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from xatl_convert.training.freeze import transferred_parameters
from xatl_convert.verify.streaming import StreamingError, decoder_blocks

ATTENTION_NAMES = ("self_attn", "attention", "attn", "self_attention")  # transformers' names, by family


class AlignError(ValueError):
    """The teacher and student cannot be aligned layer by layer (layer counts, no attention module found)."""


def normalised_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE relative to the target's own mean square, per sequence, averaged over the batch: 1.0 for a mixer that
    outputs zeros, whatever the layer's scale (attention outputs differ by orders of magnitude across depth), so
    per-layer losses can be compared and summed. Per sequence, so that a batch split into micro-batches or across
    processes gives the same loss and gradient as the whole batch."""
    target = target.float()
    error = (prediction.float() - target).pow(2).flatten(1).mean(dim=1)
    return (error / target.pow(2).flatten(1).mean(dim=1).clamp_min(1e-12)).mean()


def teacher_attention(teacher: nn.Module, num_layers: int) -> list[nn.Module]:
    """The attention module of each of the teacher's decoder blocks (self_attn, attention, attn, ...)."""
    try:
        _, blocks = decoder_blocks(teacher, num_layers)
    except StreamingError:
        raise AlignError(f"{type(teacher).__name__}: cannot find its {num_layers} decoder blocks") from None
    found = []
    for index, block in enumerate(blocks):
        attention = next((getattr(block, name) for name in ATTENTION_NAMES if hasattr(block, name)), None)
        if attention is None:
            raise AlignError(
                f"{type(teacher).__name__} block {index}: no attention module ({', '.join(ATTENTION_NAMES)})"
            )
        found.append(attention)
    return found


@contextmanager
def attention_taps(attention: dict[int, nn.Module]) -> Iterator[dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """While active, each forward records {layer: (input, output)} of the given modules: the normalised input and
    output of attention modules, or the stream into and out of decoder blocks."""
    pairs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for index, module in attention.items():

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any, index: int = index):
            hidden = args[0] if args else kwargs["hidden_states"]
            result = output[0] if isinstance(output, (tuple, list)) else output
            pairs[index] = (hidden.detach(), result.detach())

        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        yield pairs
    finally:
        for handle in handles:
            handle.remove()


def mixer_parameters(student: nn.Module, manifest: dict[str, Any], train_w_o: bool = True) -> dict[str, nn.Parameter]:
    """What `align` trains: the parameters of the LCI layers' mixers, with or without the transferred W_O."""
    transferred = set() if train_w_o else set(transferred_parameters(student, manifest))
    layer_types = student.config.layer_types
    return {
        name: parameter
        for name, parameter in student.named_parameters()
        if name not in transferred and _lci_mixer(name, layer_types)
    }


def _lci_mixer(name: str, layer_types: list[str]) -> bool:
    parts = name.split(".")
    return (
        len(parts) > 4 and parts[:2] == ["model", "layers"] and parts[3] == "mixer"
        and layer_types[int(parts[2])] != "attention"
    )  # fmt: skip


@dataclass
class Aligner:
    """Runs align steps: one teacher forward per batch, then each LCI layer's mixer on its own pair."""

    student: nn.Module
    teacher: nn.Module
    manifest: dict[str, Any]
    train_w_o: bool = True
    target: Literal["mixer", "block"] = "mixer"  # may change between steps
    layers: list[int] = field(init=False)
    attention: dict[int, nn.Module] = field(init=False)
    teacher_blocks: dict[int, nn.Module] = field(init=False)

    def __post_init__(self) -> None:
        types = self.student.config.layer_types
        self.layers = [index for index, kind in enumerate(types) if kind != "attention"]
        modules = teacher_attention(self.teacher, len(types))
        self.attention = {index: modules[index] for index in self.layers}
        _, blocks = decoder_blocks(self.teacher, len(types))
        self.teacher_blocks = {index: blocks[index] for index in self.layers}
        self.teacher.eval().requires_grad_(False)
        trainable = mixer_parameters(self.student, self.manifest, self.train_w_o)
        for name, parameter in self.student.named_parameters():
            parameter.requires_grad_(name in trainable)

    def trainable(self) -> list[nn.Parameter]:
        return [parameter for parameter in self.student.parameters() if parameter.requires_grad]

    def step(
        self, input_ids: torch.Tensor, optimizer: torch.optim.Optimizer, micro_batches: int = 1
    ) -> dict[int, float]:
        """One optimiser step over every LCI layer; returns each layer's normalised MSE before the step.

        `input_ids` is this process's share of the step's batch, run in `micro_batches` pieces whose gradients
        add up (gradient accumulation). Under data parallelism (an initialised process group, e.g. from
        `accelerate launch`), gradients and losses are averaged over the processes before the step, so every
        process takes the same step as one process over the whole batch."""
        optimizer.zero_grad(set_to_none=True)
        totals: dict[int, float] = {}
        pieces = input_ids.chunk(micro_batches)
        for piece in pieces:
            share = len(piece) / len(input_ids)
            for index, loss in self._losses(piece):
                (loss * share).backward()  # this layer's graph only: freed before the next layer builds its own
                totals[index] = totals.get(index, 0.0) + loss.item() * share
        losses = _average_over_processes(self.trainable(), totals)
        optimizer.step()
        return losses

    def _losses(self, input_ids: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """Each LCI layer's loss on `input_ids`, layer by layer after one teacher forward."""
        with torch.no_grad(), attention_taps(self._tapped()) as pairs:
            self.teacher(input_ids=input_ids)
        for index in self.layers:
            yield index, self._layer_loss(index, *pairs.pop(index))  # each pair is freed once its layer is done

    def _tapped(self) -> dict[int, nn.Module]:
        return self.teacher_blocks if self.target == "block" else self.attention

    def _layer_loss(self, index: int, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        block = self.student.model.layers[index]
        hidden = hidden.to(_dtype(block))
        if self.target == "block":  # the residual update: the stream itself would swamp the loss
            return normalised_mse(block(hidden) - hidden, target.to(hidden.dtype) - hidden)
        return normalised_mse(block.mixer(hidden), target)

    @torch.no_grad()
    def evaluate(self, input_ids: torch.Tensor) -> dict[int, float]:
        """Each LCI layer's normalised MSE on a batch, without training."""
        with attention_taps(self._tapped()) as pairs:
            self.teacher(input_ids=input_ids)
        return {index: self._layer_loss(index, *pairs[index]).item() for index in self.layers}


def cosine_to_a_tenth(step: int, steps: int) -> float:
    """The align learning rate's factor at `step` of `steps`: 1 at the start, 0.1 at the end, on a half cosine. A
    high peak moves the freshly initialised mixers fast; the decay lets them settle."""
    return 0.1 + 0.45 * (1 + math.cos(math.pi * step / max(1, steps - 1)))


def _average_over_processes(parameters: list[nn.Parameter], losses: dict[int, float]) -> dict[int, float]:
    """Average gradients and losses over the data-parallel processes (nothing to do in one process)."""
    distributed = torch.distributed
    if not (distributed.is_available() and distributed.is_initialized()) or distributed.get_world_size() == 1:
        return losses
    world = distributed.get_world_size()
    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        distributed.all_reduce(parameter.grad, op=distributed.ReduceOp.SUM)
        parameter.grad /= world
    values = torch.tensor(list(losses.values()), dtype=torch.float64)
    distributed.all_reduce(values, op=distributed.ReduceOp.SUM)
    return dict(zip(losses, (values / world).tolist(), strict=True))


def _dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype
