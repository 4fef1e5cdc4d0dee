"""Choose the layers a hybrid keeps as attention by measuring them on the user's text (`--attn-layers auto:K`).

The signal is GA-S2's idea without a training run per layer: convert every layer to the LCI mixer in memory, align
each new mixer briefly to its attention layer's output (stage `align`), then restore one layer at a time to the
source's own attention and measure how far the student's KL to the teacher falls, on blocks align never read. A
layer whose restoration closes more of the gap is worth more as attention. K layers are picked greedily, each pick
re-measured with the earlier ones restored, so two layers that mend the same thing are not both kept.

Everything stays in memory: nothing is written. The budget (`select_tokens`) bounds the text tokens read: 1/8 of it
scores, the rest aligns; the record says what was used. The training split of the data is read (as distill splits
it), so the held-out split that `xatl eval` and distill report on never informs the choice. A run is deterministic
for a seed: the seeded init of the conversion, the seeded order of the blocks, ties broken by layer index.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from xatl_convert.conversion import plan_conversion
from xatl_convert.errors import PlanError, XatlError, first_line
from xatl_convert.in_memory import model_from_plan, planned_modules
from xatl_convert.manifest import build_manifest
from xatl_convert.plan import ConversionPlan
from xatl_convert.settings import LayerSelectionSettings, SettingsError
from xatl_convert.sources import SourceCheckpoint, resolve_source
from xatl_convert.training.align import Aligner, AlignError, cosine_to_a_tenth
from xatl_convert.training.data import DataError, DataSpec, PackedBlocks

from .record import LayerSelection, SelectionBudget
from .restoration import Progress, RestorationKL, greedy_picks

SCORE_BATCH = 4  # blocks per scoring forward
EXACT_STRATEGIES = ("zeros", "ones")  # an initialised tensor that an exact attention layer may still have (a bias)


def select_layers(
    source: str | Path | SourceCheckpoint,
    data: str,
    settings: LayerSelectionSettings,
    to: str = "mamba2",
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    mapping: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    progress: Progress | None = None,
    asked: str | None = None,
) -> LayerSelection:
    """Measure every layer of `source` converted to `to` on `data` and pick `settings.keep` to keep as attention.

    `overrides` are convert's (`--set`, `--init`), so the student measured is the one the conversion makes; `asked`
    names how the user asked for K in messages (default `--keep K`)."""
    began = time.perf_counter()
    checkpoint = source if isinstance(source, SourceCheckpoint) else resolve_source(source, revision, cache_dir)
    try:
        options = {"to": to, "mapping": mapping, "overrides": overrides, "dtype": torch.float32, "seed": settings.seed}
        plan = plan_conversion(checkpoint, attn_layers="none", **options)
        layers = plan.target_config.num_hidden_layers
        check_keep(settings.keep, layers, asked or f"--keep {settings.keep}")
        twin = plan_conversion(checkpoint, attn_layers="all", **options)
        require_exact_attention(twin)
        score_ids, align_ids = _blocks(checkpoint, data, settings, plan.target_config.vocab_size)
        teacher = _teacher(checkpoint)
        student = model_from_plan(plan)
        names = {index: f"model.layers.{index}.mixer" for index in range(layers)}
        modules = planned_modules(twin, list(names.values()))
        attention = {index: modules[name] for index, name in names.items()}
        align_briefly(student, teacher, build_manifest(plan), align_ids, settings, progress)
        batches = teacher_log_probs(teacher, score_ids)
        del teacher
        measure = RestorationKL(student, attention, batches)
        baseline, scores, picks = greedy_picks(measure, list(range(layers)), settings.keep, settings.shortlist,
                                               progress)  # fmt: skip
    finally:
        if not isinstance(source, SourceCheckpoint):
            checkpoint.close()
    budget = SelectionBudget(
        select_tokens=settings.select_tokens,
        align_tokens=settings.align_steps * settings.batch_size * settings.block_size,
        score_tokens=score_ids.numel(),
        align_steps=settings.align_steps,
        score_forward_tokens=round(measure.forward_tokens),
    )
    return LayerSelection(settings.keep, layers, baseline, tuple(scores), tuple(picks), budget, data, settings.seed,
                          time.perf_counter() - began)  # fmt: skip


def check_keep(keep: int, layers: int, asked: str) -> None:
    """K leaves at least one layer to convert: keeping every layer is `--attn-layers all`, and measures nothing."""
    if keep >= layers:
        raise SettingsError(
            f"{asked}: the model has {layers} layers, so at most {layers - 1} can be chosen (to keep every layer as "
            "attention, use --attn-layers all)"
        )


def require_exact_attention(twin: ConversionPlan) -> None:
    """Restoring a layer gives it the source's attention: the mapping must transfer every attention tensor."""
    for tensor in twin.by_status("initialised"):
        if ".mixer." in tensor.name and tensor.strategy not in EXACT_STRATEGIES and not tensor.parts:
            raise PlanError(
                f"--attn-layers auto: mapping {twin.mapping.name!r} initialises {tensor.name} of a kept attention "
                "layer, so a restored layer would not be the source's; choose the layers by index instead"
            )


def _blocks(
    checkpoint: SourceCheckpoint, data: str, settings: LayerSelectionSettings, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks to score, blocks to align on) from the training split: the first `score_blocks` of its seeded order
    score, the rest align (cycled when the text is short)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint.path)
    except Exception as error:  # transformers raises OSError, ValueError, its own errors
        raise DataError(
            f"{checkpoint.reference}: its tokenizer cannot be loaded ({first_line(error)}); --attn-layers auto "
            "tokenises --data with the source's tokenizer"
        ) from None
    spec = DataSpec(data, block_size=settings.block_size, held_out=settings.held_out, seed=settings.seed)
    train = PackedBlocks.build(spec, tokenizer, "train").blocks
    needed = settings.score_blocks + settings.batch_size
    if len(train) < needed:
        raise DataError(
            f"{data}: its training split has {len(train)} block(s) of {settings.block_size} tokens; selecting layers "
            f"with --select-tokens {settings.select_tokens} needs at least {needed} ({settings.score_blocks} to score, "
            f"{settings.batch_size} to align on); give more text or a smaller --select-tokens"
        )
    highest = int(train.max())
    if highest >= vocab_size:
        raise DataError(f"{data}: the source's tokenizer gives id {highest}, beyond its vocab_size {vocab_size}")
    return train[: settings.score_blocks], train[settings.score_blocks :]


def _teacher(checkpoint: SourceCheckpoint) -> torch.nn.Module:
    """The source in transformers' own class, in float32 (never remote code)."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(checkpoint.path, dtype=torch.float32, trust_remote_code=False)
    except Exception as error:  # transformers raises ValueError, OSError, KeyError for a class it lacks
        raise XatlError(
            f"{checkpoint.reference}: transformers cannot load it as a teacher ({first_line(error)}); choose the "
            "layers by index instead of auto"
        ) from None
    return model.eval().requires_grad_(False)


def align_briefly(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    manifest: dict[str, Any],
    blocks: torch.Tensor,
    settings: LayerSelectionSettings,
    progress: Progress | None = None,
) -> None:
    """Stage align on `blocks` (cycled), as distill runs it: AdamW, peak `align_lr`, cosine to a tenth."""
    try:
        aligner = Aligner(student, teacher, manifest)
    except AlignError as error:
        raise XatlError(f"--attn-layers auto: {error}") from None
    optimizer = torch.optim.AdamW(aligner.trainable(), lr=settings.align_lr)
    steps, batch = settings.align_steps, settings.batch_size
    student.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = settings.align_lr * cosine_to_a_tenth(step, steps)
        indices = [(step * batch + offset) % len(blocks) for offset in range(batch)]
        losses = aligner.step(blocks[indices], optimizer)
        if progress is not None:
            progress("align", step + 1, steps, {"align": sum(losses.values()) / max(len(losses), 1)})
    student.eval().requires_grad_(False)


@torch.no_grad()
def teacher_log_probs(teacher: torch.nn.Module, blocks: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ids, the teacher's log-probabilities) per scoring batch, computed once for every restoration."""
    return [(ids, F.log_softmax(teacher(input_ids=ids).logits.float(), dim=-1)) for ids in blocks.split(SCORE_BATCH)]
