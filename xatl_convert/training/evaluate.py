"""Held-out loss of a model (and its teacher) on the user's text: what `xatl eval` reports.

The held-out split of `data` never trains (see `data`), so the number is comparable across runs, stages and arms.
"Gap recovered" says how far a student has come from where it started towards its teacher:
(start − now) / (start − teacher).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from xatl_convert.settings import EvalSettings
from xatl_convert.write_guard import report_marks

from .data import DataError, DataSpec, PackedBlocks, Split


@dataclass(frozen=True)
class HeldOutLoss:
    """Mean next-token loss per predicted token over the held-out blocks, and its perplexity."""

    loss: float
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf


@torch.no_grad()
def held_out_loss(
    model: nn.Module, blocks: PackedBlocks, batch_size: int = 4, max_blocks: int | None = None
) -> HeldOutLoss:
    """The model's loss on the first `max_blocks` blocks (all when None), computed in float32 batch by batch."""
    model.eval()
    data = blocks.blocks if max_blocks is None else blocks.blocks[:max_blocks]
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        ids = data[start : start + batch_size].to(device)
        logits = model(input_ids=ids).logits.float()
        vocab = logits.shape[-1]
        total += F.cross_entropy(logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1), reduction="sum").item()
        count += ids[:, 1:].numel()
    return HeldOutLoss(total / count, count)


def gap_recovered(start: float, now: float, teacher: float) -> float | None:
    """(start − now) / (start − teacher): 0 at the start, 1 at the teacher; None when start is not above it."""
    if not start > teacher:
        return None
    return (start - now) / (start - teacher)


def gap_meaning(gap: float) -> str:
    """What a gap recovered outside 0–100% means, as a clause to follow the number ('' within it)."""
    if gap > 1:
        return ": above 100%, the student's loss is below its own teacher's on this split (it beat its teacher here)"
    if gap < 0:
        return ": below 0%, the student's loss is above where it started"
    return ""


@dataclass
class Evaluation:
    """What `xatl eval` prints and writes: each model's held-out loss, and the gap recovered when known."""

    model: str
    data: str
    losses: dict[str, HeldOutLoss]
    start: float | None = None
    no_start: str = ""  # why there is no starting loss to measure the gap from
    split: Split = "held_out"
    teacher: str | None = None  # the teacher as the user named it (folder, Hub id or alias)

    @property
    def gap(self) -> float | None:
        if self.start is None or "teacher" not in self.losses:
            return None
        return gap_recovered(self.start, self.losses["model"].loss, self.losses["teacher"].loss)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "data": self.data,
            "split": self.split,
            "losses": {
                name: {"loss": r.loss, "perplexity": r.perplexity, "tokens": r.tokens}
                for name, r in self.losses.items()
            },
            "start": self.start,
            "gap_recovered": self.gap,
        }

    def to_json(self) -> str:
        """The results as JSON, marked as an xatl report (so that a later run may replace the file)."""
        return json.dumps({**report_marks("eval"), **self.to_dict()}, indent=2) + "\n"


def evaluate_folder(
    folder: Path, data: str, teacher: str | None = None, settings: EvalSettings | None = None
) -> Evaluation:
    """Score a converted (or trained) folder, and optionally its teacher, on the held-out split of `data` (or, with
    `split="all"`, on all of it: for text that never trained), tokenised with the folder's own tokenizer. The starting
    loss for the gap comes from the manifest's `distillation.start_loss`, which `xatl distill` records on the
    held-out split of its own data."""
    settings = settings or EvalSettings()
    block_size, max_blocks, batch_size = settings.block_size, settings.max_blocks, settings.batch_size
    split: Split = "all" if settings.split == "all" else "held_out"
    from transformers import AutoModelForCausalLM

    from xatl_convert.manifest import read_manifest
    from xatl_convert.sources import resolve_source
    from xatl_convert.verify.checks import load_output_tokenizer, read_output_config

    config = read_output_config(folder)
    manifest = read_manifest(folder)
    tokenizer = load_output_tokenizer(folder)
    blocks = PackedBlocks.build(DataSpec(data, block_size=block_size), tokenizer, split)
    if int(blocks.blocks.max()) >= config.vocab_size:
        raise DataError(f"{folder}: its tokenizer gives ids beyond the model's vocab_size {config.vocab_size}")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    losses = {"model": held_out_loss(model, blocks, batch_size, max_blocks)}
    del model
    if teacher is not None:
        with resolve_source(teacher) as checkpoint:
            source = AutoModelForCausalLM.from_pretrained(checkpoint.path, dtype=torch.float32, trust_remote_code=False)
        losses["teacher"] = held_out_loss(source, blocks, batch_size, max_blocks)
    start, why = _recorded_start(manifest, data, block_size, max_blocks)
    if split == "all" and start is not None:
        start, why = None, "the start was measured on the held-out split, not on all of the text"
    return Evaluation(str(folder), data, losses, start, why, split, teacher)


def _recorded_start(manifest: dict[str, Any], data: str, block_size: int, max_blocks: int) -> tuple[float | None, str]:
    """The student's starting loss from the distillation record, when it was measured on these same blocks."""
    record = manifest.get("distillation")
    if not isinstance(record, dict) or not isinstance(record.get("start_loss"), (int, float)):
        return None, "no starting loss in the manifest"
    settings, source = record.get("settings") or {}, (record.get("data") or {}).get("source")
    measured = (source, settings.get("block_size"), settings.get("eval_blocks"))
    if measured != (data, block_size, max_blocks):
        return None, (
            f"the start was measured on other blocks (--data {source} --block-size {measured[1]} "
            f"--max-blocks {measured[2]})"
        )
    return float(record["start_loss"]), ""
