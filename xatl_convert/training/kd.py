"""Stage `kd`: the whole student learns the teacher's next-token distribution, end to end.

After `align` the mixers each compute roughly what their attention layer did; `kd` trains them together against
the teacher's logits: KL(teacher ‖ student) at a temperature, plus an optional next-token loss. The transferred
weights start frozen and the Loss Improvement Threshold unfreezes them as their own parameter group (XATL's
recipe), through `LITCallback`, which the trainer tells the loss it optimises.

The teacher is either run at every step or read from a `TeacherCache` (see `teacher_cache`): its top k tokens'
log-probabilities per position (`TeacherTopK`), which the loss compares as k + 1 outcomes, the k tokens and the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .callback import LITCallback, LITTrainer

if TYPE_CHECKING:
    from .teacher_cache import TeacherCache


@dataclass(frozen=True)
class TeacherTopK:
    """The teacher's next-token distribution at temperature 1, cut to each position's k likeliest tokens plus one
    bucket for the rest of the vocabulary: what a teacher cache keeps instead of the full logits."""

    token_ids: torch.Tensor  # [..., k], the k likeliest tokens
    log_probs: torch.Tensor  # [..., k], their log-probabilities over the whole vocabulary
    rest_log_prob: torch.Tensor  # [...], log of the mass of every other token (-inf when k is the whole vocabulary)

    @classmethod
    def from_logits(cls, logits: torch.Tensor, k: int) -> TeacherTopK:
        """The top k of `logits` ([..., vocab]), from a float32 log-softmax over the whole vocabulary. The rest's mass
        is a log-sum-exp over the other tokens, not 1 − Σ p, which would cancel to 0 when the top k hold nearly all."""
        log_probs = F.log_softmax(logits.float(), dim=-1)
        if not 0 < k <= log_probs.shape[-1]:
            raise ValueError(f"top-k {k}: expected 1 to the vocabulary's {log_probs.shape[-1]} tokens")
        top, ids = log_probs.topk(k, dim=-1)
        rest = log_probs.scatter(-1, ids, float("-inf")).logsumexp(dim=-1)
        return cls(ids.to(torch.int32), top, rest)

    def to(self, device: torch.device | str) -> TeacherTopK:
        return TeacherTopK(self.token_ids.to(device), self.log_probs.to(device), self.rest_log_prob.to(device))


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | TeacherTopK,
    labels: torch.Tensor | None = None,
    temperature: float = 1.0,
    ce_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """KL(teacher ‖ student) per token at `temperature` (scaled by T², so the gradient's size does not depend on
    T, as Hinton et al.), plus `ce_weight` × the next-token loss on `labels`. Computed in float32. Returns the loss
    and its parts, for logging.

    With a `TeacherTopK` (temperature 1 only: that is what it holds) the KL is over k + 1 outcomes, the teacher's top
    k tokens and the rest, each side's rest being its own mass outside those k (see `top_k_kl`)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    vocab = student_logits.shape[-1]
    if isinstance(teacher_logits, TeacherTopK):
        if temperature != 1:
            raise ValueError(f"temperature {temperature}: top-k teacher log-probabilities are at temperature 1 only")
        kl = top_k_kl(student_logits, teacher_logits)
    else:
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


def top_k_kl(student_logits: torch.Tensor, teacher: TeacherTopK) -> torch.Tensor:
    """KL(teacher ‖ student) per token over k + 1 outcomes: the teacher's top k tokens, and the rest as one bucket.

    The bucket makes it a proper KL between two distributions, never above the full KL (merging outcomes cannot
    raise it) and equal to it when k is the whole vocabulary. Its gradient on each top-k logit is the full KL's
    (q − p), and on the others it moves the student's rest mass towards the teacher's. Renormalising over the top k
    instead would ask the student to put no mass outside them, and would change every top-k gradient. The teacher's
    k + 1 probabilities are renormalised (a float16 cache rounds them by up to 5e-4 relative), so the KL is ≥ 0."""
    vocab, k = student_logits.shape[-1], teacher.token_ids.shape[-1]
    student = student_logits.float().reshape(-1, vocab)
    normaliser = student.logsumexp(dim=-1, keepdim=True)
    ids = teacher.token_ids.reshape(-1, k).long()
    student_side = student.gather(-1, ids) - normaliser
    teacher_side = teacher.log_probs.float().reshape(-1, k)
    if k < vocab:
        student_rest = student.scatter(-1, ids, float("-inf")).logsumexp(dim=-1, keepdim=True) - normaliser
        student_side = torch.cat([student_side, student_rest], dim=-1)
        teacher_side = torch.cat([teacher_side, teacher.rest_log_prob.float().reshape(-1, 1)], dim=-1)
    teacher_side = teacher_side - teacher_side.logsumexp(dim=-1, keepdim=True)
    terms = teacher_side.exp() * (teacher_side - student_side)
    terms = torch.where(torch.isneginf(teacher_side), torch.zeros_like(terms), terms)  # 0 · log 0 = 0
    return terms.sum() / student.shape[0]


class DistillationTrainer(LITTrainer):
    """HF Trainer whose loss is `distillation_loss` against a frozen teacher, run in eval mode under no_grad, or
    against a `TeacherCache` of its top-k log-probabilities (then each batch carries its blocks' `block_index`).

    Everything else is the Trainer's: optimiser, schedule, gradient accumulation, checkpoints, and distribution
    through accelerate (the teacher is placed on each process's device, never wrapped or sharded for training).
    """

    def __init__(
        self,
        *args: Any,
        teacher: nn.Module | None = None,
        temperature: float = 1.0,
        ce_weight: float = 0.0,
        teacher_cache: TeacherCache | None = None,
        **kwargs: Any,
    ) -> None:
        if (teacher is None) == (teacher_cache is None):
            raise ValueError("DistillationTrainer takes a teacher or a teacher_cache, one of them")
        super().__init__(*args, **kwargs)
        self.teacher = None if teacher is None else teacher.eval().requires_grad_(False)
        self.teacher_cache = teacher_cache
        self.temperature = temperature
        self.ce_weight = ce_weight
        self._parts: dict[str, list[float]] = {}

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False, **kwargs: Any
    ) -> Any:
        input_ids = inputs["input_ids"]
        teacher: torch.Tensor | TeacherTopK
        if self.teacher_cache is not None:
            teacher = self.teacher_cache.rows(inputs["block_index"], input_ids)
        else:
            assert self.teacher is not None
            if next(self.teacher.parameters()).device != input_ids.device:
                self.teacher.to(input_ids.device)
            with torch.no_grad():
                teacher = self.teacher(input_ids=input_ids).logits
        outputs = model(input_ids=input_ids)
        loss, parts = distillation_loss(outputs.logits, teacher, inputs.get("labels"), self.temperature, self.ce_weight)
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
