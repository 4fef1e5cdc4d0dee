"""`xatl distill`: from a conversion to a working model, align then kd, written as a folder verify accepts.

Stages run in order on the student loaded in float32: `align` (each new mixer against its layer's attention, see
`align`), then `kd` (end to end against the teacher's logits with LIT, see `kd`). The held-out loss of student and
teacher is measured before and after on the data's held-out split; the output folder has the conversion's layout
(config, modeling files, tokenizer, model card) with the trained weights, and its manifest records each stage
(steps, tokens, losses, learning rates, the LIT step), the data and the starting loss that `xatl eval` needs for the
gap recovered. Each stage also writes its per-step losses as CSV into the output folder.
"""

from __future__ import annotations

import csv
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError

from xatl_convert.errors import OutputWriteError
from xatl_convert.manifest import MANIFEST_NAME, read_manifest
from xatl_convert.output_folder import ensure_writable, refuse_unsafe_output, staged_output
from xatl_convert.writer import failed_file, save_shard

from .align import Aligner
from .callback import LITCallback
from .controller import LITController
from .data import DataSpec, PackedBlocks
from .evaluate import held_out_loss
from .freeze import freeze_transferred, transferred_parameters
from .kd import DistillationTrainer
from .lit import LossImprovementThreshold

Stage = Literal["all", "align", "kd", "ce"]
Progress = Callable[[str, int, int, dict[str, float]], None]  # (stage, step, steps, latest losses)


@dataclass(frozen=True)
class DistillSettings:
    """Every knob of a distillation run, recorded as is in the manifest."""

    align_steps: int = 100
    kd_steps: int = 100
    batch_size: int = 4
    block_size: int = 256
    align_lr: float = 1e-3
    kd_lr: float = 1e-4
    unfreeze_lr: float = 1e-4
    temperature: float = 1.0
    ce_weight: float = 0.0
    lit_preset: str = "paper-1pct"
    lit_window: int = 20
    held_out: float = 0.05
    eval_blocks: int = 32  # as `xatl eval --max-blocks`, so that eval's gap uses the same blocks
    seed: int = 0


def distill(
    student_folder: str | Path,
    teacher_folder: str | Path,
    data: str,
    out: str | Path,
    settings: DistillSettings = DistillSettings(),
    stage: Stage = "all",
    force: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run the stages and write OUT; returns the manifest's `distillation` record."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from xatl_convert.sources import resolve_source

    student_folder, out = Path(student_folder), Path(out)
    with resolve_source(teacher_folder) as checkpoint:  # a local folder, a Hub id or an alias, as for convert
        teacher_path = checkpoint.path
        protected = {student_folder.resolve(): "the student folder", checkpoint.storage_root: "the teacher"}
    refuse_unsafe_output(out, protected)
    ensure_writable(out, force)
    torch.manual_seed(settings.seed)
    manifest = read_manifest(student_folder)
    tokenizer = AutoTokenizer.from_pretrained(student_folder)
    spec = DataSpec(data, block_size=settings.block_size, held_out=settings.held_out, seed=settings.seed)
    train, held_out = PackedBlocks.build(spec, tokenizer, "train"), PackedBlocks.build(spec, tokenizer, "held_out")
    student = AutoModelForCausalLM.from_pretrained(student_folder, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32, trust_remote_code=False)
    record: dict[str, Any] = {
        "teacher": str(teacher_folder),
        "data": {"source": data, "train_blocks": len(train), "held_out_blocks": len(held_out)},
        "settings": asdict(settings),
        "teacher_loss": held_out_loss(teacher, held_out, settings.batch_size, settings.eval_blocks).loss,
        "start_loss": held_out_loss(student, held_out, settings.batch_size, settings.eval_blocks).loss,
        "stages": [],
    }
    logs: dict[str, list[dict[str, float]]] = {}
    if stage in ("all", "align"):
        record["stages"].append(_align(student, teacher, manifest, train, settings, logs, progress))
    if stage in ("all", "kd"):
        record["stages"].append(_kd(student, teacher, manifest, train, settings, logs, progress, out))
    if stage == "ce":
        record["stages"].append(_ce(student, manifest, train, settings, logs, progress, out))
    record["end_loss"] = held_out_loss(student, held_out, settings.batch_size, settings.eval_blocks).loss
    _write(student, student_folder, out, manifest, record, logs, force)
    return record


def _batches(train: PackedBlocks, batch_size: int, start: int = 0) -> Callable[[int], torch.Tensor]:
    """Batch `step` of the training blocks, cycling through them in their (seeded) order."""
    count = len(train)

    def batch(step: int) -> torch.Tensor:
        first = (start + step * batch_size) % count
        indices = [(first + offset) % count for offset in range(batch_size)]
        return train.blocks[indices]

    return batch


def _align(student, teacher, manifest, train, settings, logs, progress) -> dict[str, Any]:
    aligner = Aligner(student, teacher, manifest)
    optimizer = torch.optim.AdamW(aligner.trainable(), lr=settings.align_lr)
    batch = _batches(train, settings.batch_size)
    rows, began = [], time.perf_counter()
    for step in range(settings.align_steps):
        losses = aligner.step(batch(step), optimizer)
        mean = sum(losses.values()) / max(len(losses), 1)
        rows.append({"step": step + 1, "mean": mean, **{f"layer_{i}": value for i, value in losses.items()}})
        if progress is not None:
            progress("align", step + 1, settings.align_steps, {"align": mean})
    for parameter in student.parameters():
        parameter.requires_grad_(True)
    logs["align"] = rows
    final = rows[-1]["mean"] if rows else None
    return _stage_record("align", settings.align_steps, settings.align_lr, settings, began, final_mean_loss=final)


def _kd(student, teacher, manifest, train, settings, logs, progress, out) -> dict[str, Any]:
    """End to end against the teacher's logits, transferred weights frozen until LIT (see `kd`)."""
    extra = {"teacher": teacher, "temperature": settings.temperature, "ce_weight": settings.ce_weight}
    record = _train_with_lit("kd", "kd/kl", DistillationTrainer, extra, student, manifest, train, settings, logs,
                             progress, out)  # fmt: skip
    return {**record, "temperature": settings.temperature, "ce_weight": settings.ce_weight}


def _ce(student, manifest, train, settings, logs, progress, out) -> dict[str, Any]:
    """The XATL paper's own recipe, for comparison: next-token loss, transferred weights frozen until LIT."""
    from transformers import Trainer

    return _train_with_lit("ce", "loss", Trainer, {}, student, manifest, train, settings, logs, progress, out)


def _train_with_lit(
    stage: str,
    key: str,
    trainer_class: Any,
    extra: dict[str, Any],
    student,
    manifest,
    train,
    settings,
    logs,
    progress,
    out,
) -> dict[str, Any]:
    """A Trainer run of `settings.kd_steps` steps with the transferred weights frozen until LIT unfreezes them,
    continuing in the training blocks where align stopped; its logged `key` is the stage's loss."""
    from transformers import PrinterCallback, TrainerCallback, TrainingArguments

    frozen = transferred_parameters(student, manifest)
    freeze_transferred(student, manifest)
    trigger = LossImprovementThreshold.preset(settings.lit_preset, window=settings.lit_window)
    lit = LITCallback(LITController(frozen, settings.unfreeze_lr, warmup_steps=10, trigger=trigger, weight_decay=0.0))
    skip = settings.align_steps * settings.batch_size if "align" in logs else 0  # continue where align stopped
    dataset = torch.utils.data.Subset(train, [(skip + index) % len(train) for index in range(len(train))])
    rows: list[dict[str, float]] = []

    class _Rows(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any):
            if logs and key in logs and "train_runtime" not in logs:
                rows.append({"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, float)}})
                if progress is not None:
                    progress(stage, state.global_step, settings.kd_steps, {key.split("/")[-1]: logs[key]})

    with tempfile.TemporaryDirectory(prefix="xatl-trainer-") as scratch:  # the Trainer's files, never kept
        arguments = TrainingArguments(
            output_dir=scratch, max_steps=settings.kd_steps, per_device_train_batch_size=settings.batch_size,
            learning_rate=settings.kd_lr, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
            report_to=[], seed=settings.seed, data_seed=settings.seed, disable_tqdm=True,
            dataloader_pin_memory=torch.cuda.is_available(),
        )  # fmt: skip
        trainer = trainer_class(model=student, args=arguments, train_dataset=dataset, callbacks=[lit, _Rows()], **extra)
        trainer.remove_callback(PrinterCallback)  # our progress and CSV log say it; no dicts on stdout
        began = time.perf_counter()
        trainer.train()
    logs[stage] = rows
    final = rows[-1].get(key) if rows else None
    return _stage_record(stage, settings.kd_steps, settings.kd_lr, settings, began, lit_unfrozen_at=lit.unfrozen_at,
                         final_loss=final)  # fmt: skip


def _stage_record(
    stage: str, steps: int, lr: float, settings: DistillSettings, began: float, **extra: Any
) -> dict[str, Any]:
    """What the manifest keeps of one stage: its steps, tokens, learning rate, time and final losses."""
    tokens = steps * settings.batch_size * settings.block_size
    return {"stage": stage, "steps": steps, "tokens": tokens, "lr": lr, **extra, "seconds": time.perf_counter() - began}


def _weights(name: str) -> bool:
    """The student's weight files, which the trained weights replace (the modeling code is kept)."""
    return name.endswith((".safetensors", ".bin")) or name == "model.safetensors.index.json"


def _write(student, student_folder, out, manifest, record, logs, force) -> None:
    """The conversion's layout with the trained weights, the manifest with the `distillation` record, CSV logs."""
    state = {name: tensor.detach().contiguous() for name, tensor in student.state_dict().items()}
    if student.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    dtype = getattr(torch, manifest["target"]["dtype"])
    state = {name: tensor.to(dtype) if tensor.is_floating_point() else tensor for name, tensor in state.items()}
    needed = sum(t.numel() * t.element_size() for t in state.values())
    with staged_output(out, force, needed) as staging:
        try:
            _write_folder(student_folder, staging, state, manifest, record, logs)
        except (OSError, SafetensorError) as error:
            raise OutputWriteError(f"{out}: cannot write {failed_file(error, staging)}; nothing was written") from None


def _write_folder(student_folder, staging, state, manifest, record, logs) -> None:
    """Into the staging folder: the student's files but its weights and manifest, then the new ones."""
    for file in student_folder.iterdir():
        if file.is_file() and not _weights(file.name) and file.name != MANIFEST_NAME:
            shutil.copy2(file, staging / file.name)
    save_shard(state, staging / "model.safetensors")
    (staging / MANIFEST_NAME).write_text(json.dumps({**manifest, "distillation": record}, indent=2) + "\n")
    for stage, rows in logs.items():
        if rows:
            with (staging / f"distill_{stage}.csv").open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(rows[-1]))
                writer.writeheader()
                writer.writerows(rows)
