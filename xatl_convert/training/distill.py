"""`xatl distill`: from a conversion to a working model, align then kd, written as a folder verify accepts.

Stages run in order on the student loaded in float32: `align` (each new mixer against its layer's attention, see
`align`), then `kd` (end to end against the teacher's logits with LIT, see `kd`); `ce` is the XATL paper's recipe
(next-token loss with LIT, no teacher) for comparison. The held-out loss of student and teacher is measured before
and after on the data's held-out split (and every `eval_every` steps, for the curve); the output folder has the
conversion's layout (config, modeling files, tokenizer, model card) with the trained weights, and its manifest
records each stage (steps, tokens, losses, learning rates, the LIT step), the data and the starting loss that
`xatl eval` needs for the gap recovered. Each stage writes its per-step losses as CSV into the output folder, and the
held-out curve goes to `distill_curve.csv`.

Distribution comes from accelerate: under `accelerate launch`, kd and ce are the HF Trainer's (data parallel, FSDP
or DeepSpeed from the accelerate config) and align averages its gradients over the processes; `batch_size` is the
global batch (processes × per-process batch × `grad_accum`), so a run's losses do not depend on how many processes
share it. With `save_every`, checkpoints go to a folder beside OUT and `resume` continues from the last one.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, TrainerCallback

from xatl_convert.errors import OutputWriteError, XatlError
from xatl_convert.manifest import MANIFEST_NAME, read_manifest
from xatl_convert.model_card import MODEL_CARD_NAME, render_distilled_card
from xatl_convert.output_folder import staged_output
from xatl_convert.settings import DistillSettings, SettingsError
from xatl_convert.write_guard import CommandPaths, xatl_version
from xatl_convert.writer import copy_named_chat_templates, failed_file, safetensors_state, save_shard

from .align import Aligner, cosine_to_a_tenth
from .callback import LITCallback, LITTrainer
from .checkpoints import RunCheckpoints
from .controller import LITController
from .data import DataSpec, PackedBlocks, mix_blocks
from .evaluate import held_out_loss
from .freeze import freeze_transferred, transferred_parameters
from .kd import DistillationTrainer
from .lit import LossImprovementThreshold
from .pair import check_student, check_teacher, check_token_ids
from .teacher_cache import IndexedBlocks, TeacherCache, cache_key, ensure_teacher_cache

Stage = Literal["all", "align", "kd", "ce"]
STAGES = ("all", "align", "kd", "ce")
Progress = Callable[[str, int, int, dict[str, float]], None]  # (stage, step, steps, latest losses)


def distill(
    student_folder: str | Path,
    teacher_folder: str | Path,
    data: str,
    out: str | Path,
    settings: DistillSettings | None = None,
    stage: Stage = "all",
    force: bool = False,
    progress: Progress | None = None,
    checkpoints: str | Path | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Run the stages and write OUT (from the main process); returns the manifest's `distillation` record.

    `checkpoints` is the checkpoint folder (default `OUT.checkpoints` when `settings.save_every` is set); `resume`
    continues from it. Once OUT is written, the checkpoints xatl wrote there are removed."""
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from xatl_convert.sources import resolve_source

    settings = settings or DistillSettings()
    if stage not in STAGES:
        raise SettingsError(f"--stage {stage!r}: expected {', '.join(STAGES)}")
    if settings.teacher_cache is not None and stage in ("align", "ce"):
        raise SettingsError(f"--teacher-cache with --stage {stage}: only stage kd reads the teacher; leave it out")
    student_folder, out = Path(student_folder), Path(out)
    if checkpoints is None and (settings.save_every or resume):
        checkpoints = out.parent / f"{out.name}.checkpoints"
    paths = CommandPaths()
    paths.read(student_folder, "the student folder")
    paths.read(teacher_folder, "the teacher", hub="model")
    paths.read(data, "the --data text", hub="dataset")
    if settings.mix_data is not None:
        paths.read(settings.mix_data, "the --mix-data text", hub="dataset")
    paths.write(out, "--out", "folder")
    paths.write(checkpoints, "--checkpoints", "checkpoints")
    paths.write(settings.teacher_cache, "--teacher-cache", "teacher-cache")
    paths.check(force)
    student_facts = check_student(student_folder, settings, stage)
    with resolve_source(teacher_folder) as checkpoint:  # a local folder, a Hub id or an alias, as for convert
        teacher_path = checkpoint.path
    check_teacher(student_folder, teacher_path, student_facts)
    # Joins the process group under `accelerate launch` or torchrun (gloo on a machine without CUDA); one process
    # otherwise. The Trainer's own state is this shared one.
    processes = PartialState(cpu=not torch.cuda.is_available())
    settings.per_process_batch(processes.num_processes)
    identity = {"student": str(student_folder.resolve()), "teacher": str(teacher_folder), "data": data,
                "stage": stage, "settings": settings.identity()}  # fmt: skip
    saved = RunCheckpoints(Path(checkpoints) if checkpoints else None, identity, resume, processes.is_main_process)
    with saved:  # holds the folder's lock; a failure keeps only what --resume needs, and names a full disk
        processes.wait_for_everyone()  # the main process has checked the checkpoint folder
        torch.manual_seed(settings.seed)
        manifest = read_manifest(student_folder)
        tokenizer = AutoTokenizer.from_pretrained(student_folder)
        spec = DataSpec(data, block_size=settings.block_size, held_out=settings.held_out, seed=settings.seed)
        train, held_out = PackedBlocks.build(spec, tokenizer, "train"), PackedBlocks.build(spec, tokenizer, "held_out")
        teacher_vocab = getattr(AutoConfig.from_pretrained(teacher_path), "vocab_size", None)
        vocabularies = {"the student": student_facts["config"].vocab_size}
        if isinstance(teacher_vocab, int):
            vocabularies["the teacher"] = teacher_vocab
        for blocks in (train.blocks, held_out.blocks):
            check_token_ids(blocks, vocabularies, data)
        if settings.mix_data is not None:  # its own training split, spread through ours
            mixed = PackedBlocks.build(replace(spec, source=settings.mix_data), tokenizer, "train")
            check_token_ids(mixed.blocks, vocabularies, settings.mix_data)
            train = mix_blocks(train, mixed, settings.mix_share)
        student = AutoModelForCausalLM.from_pretrained(student_folder, dtype=torch.float32).to(processes.device)
        # The teacher only runs forward: bf16 on CUDA (half the memory, tensor cores), float32 on the CPU, where the
        # losses are computed in float32 either way.
        teacher_dtype = torch.bfloat16 if processes.device.type == "cuda" else torch.float32
        teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=teacher_dtype, trust_remote_code=False)
        teacher.to(processes.device).eval().requires_grad_(False)
        run = _Run(student, teacher, manifest, train, held_out, settings, saved, progress, processes, teacher_path)
        record = run.start_record(teacher_folder, data)
        for name in ("align", "kd") if stage == "all" else (stage,):
            record["stages"].append(saved.stage_done(name) or run.stage(name))
        run.restore_finished_weights()
        record["end_loss"] = run.evaluate("end", 0)
        record["seconds"] = round(saved.progress["seconds"], 3)
        if processes.is_main_process:
            _write(student, student_folder, out, manifest, record, saved.progress, force)
            saved.remove()
    processes.wait_for_everyone()
    return record


class TrainingDivergedError(XatlError):
    """A loss became NaN or infinite: the run stops, and nothing is written."""


def check_finite_loss(stage: str, step: int, loss: float) -> None:
    """Stop at the first non-finite loss, naming the stage and step (the usual cause: a learning rate too high)."""
    if not math.isfinite(loss):
        option = "--align-lr" if stage == "align" else "--kd-lr"
        raise TrainingDivergedError(
            f"{stage} step {step}: the loss is {loss}; the run stopped and wrote nothing; lower {option}"
        )


class _Run:
    """One distillation run's models, data, clock and logs; each stage is a method."""

    def __init__(
        self, student, teacher, manifest, train, held_out, settings, saved, progress, processes, teacher_path=None
    ) -> None:
        self.student, self.teacher, self.manifest = student, teacher, manifest
        self.teacher_path = teacher_path  # the resolved teacher folder, which a teacher cache is keyed by
        self.train, self.held_out, self.settings = train, held_out, settings
        self.saved, self.report, self.processes = saved, progress, processes
        self.log = saved.progress  # logs, curve and seconds: kept in the checkpoint, so a resume continues them
        self._since = time.perf_counter()
        self._weights_current = not saved.progress["done"]  # a resumed run restores finished stages' weights

    def seconds(self) -> float:
        """Training time so far, across resumes, without the held-out evaluations."""
        return self.log["seconds"] + time.perf_counter() - self._since

    @contextmanager
    def _paused(self) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self._since += time.perf_counter() - began

    def tokens_before(self, stage: str) -> int:
        return sum(r["tokens"] for r in self.log["done"] if r["stage"] != stage)

    def evaluate(self, stage: str, step: int) -> float:
        """Held-out loss now, added to the curve (tokens and training seconds so far)."""
        with self._paused():
            training = self.student.training
            loss = held_out_loss(self.student, self.held_out, self.settings.batch_size, self.settings.eval_blocks).loss
            self.student.train(training)
        tokens = self.tokens_before(stage) + step * self.settings.tokens_per_step
        self.log["curve"].append({"stage": stage, "step": step, "tokens": tokens, "seconds": round(self.seconds(), 3),
                                  "held_out_loss": loss})  # fmt: skip
        return loss

    def start_record(self, teacher_folder, data) -> dict[str, Any]:
        if "start" not in self.log:
            with self._paused():
                settings = self.settings
                teacher = held_out_loss(self.teacher, self.held_out, settings.batch_size, settings.eval_blocks)
            self.log["start"] = {"teacher_loss": teacher.loss, "start_loss": self.evaluate("start", 0)}
        return {
            "teacher": str(teacher_folder),
            "data": {
                "source": data,
                "train_blocks": len(self.train),
                "held_out_blocks": len(self.held_out),
                "mixed_blocks": self.train.mixed,
            },
            "settings": self.settings.model_dump(),
            "xatl_convert_version": xatl_version(),
            **self.log["start"],
            "stages": [],
        }

    def restore_finished_weights(self) -> None:
        """A resumed run whose stages had all finished: the last one's final checkpoint holds the weights."""
        if not self._weights_current and self.log["done"]:
            self.saved.load_final(self.student, self.log["done"][-1]["stage"])
            self._weights_current = True

    def stage(self, name: str) -> dict[str, Any]:
        if not self._weights_current:  # a resumed run whose align finished before: its weights are checkpointed
            self.saved.load_align(self.student, None)
            self._weights_current = True
        steps, lr = (self.settings.align_steps, self.settings.align_lr) if name == "align" else (
            self.settings.kd_steps, self.settings.kd_lr)  # fmt: skip
        if steps == 0:  # a stage of 0 steps is skipped, and recorded as such
            record = _stage_record(name, 0, lr, self.settings, skipped=True)
        else:
            record = self.align() if name == "align" else self.train_with_lit(name)
        self.log["done"].append(record)
        self._save_progress()
        return record

    def _save_progress(self) -> None:
        self.log["seconds"], self._since = self.seconds(), time.perf_counter()
        self.saved.save_progress()

    def _show(self, stage: str, step: int, steps: int, losses: dict[str, float], stage_began: tuple[float, int]):
        if self.report is None or not self.processes.is_main_process:
            return
        seconds, first = stage_began
        elapsed = self.seconds() - seconds
        rate = (step - first) * self.settings.tokens_per_step / elapsed if elapsed > 0 else 0.0
        self.report(stage, step, steps, {**losses, "tok/s": rate})

    def align(self) -> dict[str, Any]:
        settings, rows = self.settings, self.log["logs"].setdefault("align", [])
        aligner = Aligner(self.student, self.teacher, self.manifest, train_w_o=settings.align_w_o)
        optimizer = torch.optim.AdamW(aligner.trainable(), lr=settings.align_lr)
        done = self.saved.load_align(self.student, optimizer) if self.saved.resumed else 0
        del rows[done:]
        self.log["curve"] = [p for p in self.log["curve"] if p["stage"] != "align" or p["step"] <= done]
        batch, began = _batches(self.train, settings.batch_size), (self.seconds(), done)
        rank, world = self.processes.process_index, self.processes.num_processes
        block_steps = round(settings.align_block_share * settings.align_steps)
        for step in range(done, settings.align_steps):
            aligner.target = "block" if step >= settings.align_steps - block_steps else "mixer"
            share = batch(step).chunk(world)[rank].to(self.processes.device)
            for group in optimizer.param_groups:  # stateless, so a resumed run is on the same schedule
                group["lr"] = settings.align_lr * cosine_to_a_tenth(step, settings.align_steps)
            losses = aligner.step(share, optimizer, micro_batches=settings.grad_accum)
            mean = sum(losses.values()) / max(len(losses), 1)
            check_finite_loss("align", step + 1, mean)
            rows.append({"step": step + 1, "mean": mean, **{f"layer_{i}": value for i, value in losses.items()}})
            self._show("align", step + 1, settings.align_steps, {"align": mean}, began)
            self._align_points(step + 1, optimizer)
        for parameter in self.student.parameters():
            parameter.requires_grad_(True)
        final = rows[-1]["mean"] if rows else None
        return _stage_record("align", settings.align_steps, settings.align_lr, settings, final_mean_loss=final,
                             lr_schedule="cosine to 0.1 × lr", w_o_trained=settings.align_w_o,
                             block_steps=block_steps)  # fmt: skip

    def _align_points(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """After an align step: the curve's held-out point and the checkpoint, when their step comes. The last step
        is always checkpointed (when checkpoints are on): a later stage resumes from those weights."""
        settings = self.settings
        if settings.eval_every and step % settings.eval_every == 0:
            self.evaluate("align", step)
        last = step == settings.align_steps
        if self.saved.enabled and (last or (settings.save_every and step % settings.save_every == 0)):
            self.saved.save_align(self.student, optimizer, step)
            self._save_progress()

    def train_with_lit(self, stage: str) -> dict[str, Any]:
        """A Trainer run of `settings.kd_steps` steps (kd: against the teacher's logits; ce: next-token loss), the
        transferred weights frozen until LIT unfreezes them (unless `freeze` is off), continuing in the training
        blocks where align stopped; resumed from the stage's last Trainer checkpoint when there is one."""
        from transformers import PrinterCallback, TrainingArguments

        settings, student = self.settings, self.student
        key = "kd/kl" if stage == "kd" else "loss"
        lit = None
        if settings.freeze:
            frozen = transferred_parameters(student, self.manifest)
            freeze_transferred(student, self.manifest)
            trigger = LossImprovementThreshold.preset(settings.lit_preset, window=settings.lit_window)
            controller = LITController(frozen, settings.unfreeze_lr, warmup_steps=10, trigger=trigger, weight_decay=0.0)
            lit = LITCallback(controller)
        skip = settings.align_steps * settings.batch_size if self.saved.stage_done("align") else 0
        dataset = torch.utils.data.Subset(self.train, [(skip + i) % len(self.train) for i in range(len(self.train))])
        resume_from = self.saved.latest_trainer_checkpoint(stage, self.student)
        rows = self.log["logs"].setdefault(stage, [])
        done = int(resume_from.rsplit("-", 1)[-1]) if resume_from else 0
        del rows[done:]
        self.log["curve"] = [p for p in self.log["curve"] if p["stage"] != stage or p["step"] <= done]
        callbacks: list[Any] = [] if lit is None else [lit]
        callbacks.append(_StageCallback(self, stage, key, began=(self.seconds(), done)))
        extra: dict[str, Any] = {}
        trainer_class: Any = LITTrainer
        cached = None
        if stage == "kd":
            trainer_class = DistillationTrainer
            extra = {"temperature": settings.temperature, "ce_weight": settings.ce_weight}
            if settings.teacher_cache is None:
                extra["teacher"] = self.teacher
            else:
                dataset, extra["teacher_cache"], cached = self.cached_teacher(skip)
        with _trainer_folder(self.saved.trainer_folder(stage)) as output_dir:
            arguments = TrainingArguments(
                output_dir=str(output_dir), max_steps=settings.kd_steps,
                per_device_train_batch_size=settings.per_process_batch(self.processes.num_processes),
                gradient_accumulation_steps=settings.grad_accum, learning_rate=settings.kd_lr,
                lr_scheduler_type="constant", logging_steps=1, report_to=[], seed=settings.seed,
                data_seed=settings.seed, disable_tqdm=True, dataloader_pin_memory=torch.cuda.is_available(),
                use_cpu=not torch.cuda.is_available(),  # so that processes without CUDA join a gloo group
                ddp_find_unused_parameters=False,  # every trainable parameter is used; frozen ones are not in DDP
                save_strategy="steps" if settings.save_every else "no", save_steps=settings.save_every or 500,
                save_total_limit=2,
                remove_unused_columns=False,  # compute_loss takes what it needs; a cache's block_index must reach it
            )  # fmt: skip
            trainer = trainer_class(model=student, args=arguments, train_dataset=dataset, callbacks=callbacks, **extra)
            trainer.remove_callback(PrinterCallback)  # our progress and CSV log say it; no dicts on stdout
            trainer.train(resume_from_checkpoint=resume_from)
        for parameter in student.parameters():
            parameter.requires_grad_(True)
        final = rows[-1].get(key) if rows else None
        record = _stage_record(stage, settings.kd_steps, settings.kd_lr, settings, final_loss=final,
                               lit_unfrozen_at=None if lit is None else lit.unfrozen_at)  # fmt: skip
        if stage == "kd":
            record.update(temperature=settings.temperature, ce_weight=settings.ce_weight)
        if cached is not None:
            record["teacher_cache"] = cached
        return record

    def cached_teacher(self, skip: int) -> tuple[IndexedBlocks, TeacherCache, dict[str, Any]]:
        """kd's blocks and the teacher cache over them, built first unless it is there (by the main process, off the
        training clock). With a cache, kd trains on the kd_steps × batch_size blocks after align's, each once (all of
        them, cycled, when there are fewer), so that the blocks the cache needs are known before kd starts."""
        settings, count = self.settings, len(self.train)
        used = min(count, settings.kd_steps * settings.batch_size)
        blocks = self.train.blocks[[(skip + i) % count for i in range(used)]]
        assert settings.teacher_cache is not None and self.teacher_path is not None
        key = cache_key(self.teacher_path, blocks, settings.held_out, settings.teacher_top_k)
        report = self.report

        def progress(done: int, total: int) -> None:
            if report is not None:
                report("teacher cache", done, total, {})

        began, built = time.perf_counter(), False
        with self._paused():
            if self.processes.is_main_process:
                micro = settings.per_process_batch(self.processes.num_processes)
                built = ensure_teacher_cache(
                    settings.teacher_cache, self.teacher, key, blocks, micro, progress=progress
                )
            self.processes.wait_for_everyone()
        seconds = round(time.perf_counter() - began, 3) if built else 0.0
        record = {"path": str(Path(settings.teacher_cache).resolve()), "top_k": settings.teacher_top_k, "blocks": used,
                  "built": built, "build_seconds": seconds, "loss": "top-k KL with a rest bucket",
                  "log_probs": "float16"}  # fmt: skip
        return IndexedBlocks(blocks), TeacherCache(settings.teacher_cache, key), record


class _StageCallback(TrainerCallback):
    """Rows of the stage's CSV log, progress with tokens/s, the held-out curve and the run's progress file, from the
    Trainer's own events (its checkpoints hold the weights, optimiser and LIT state)."""

    def __init__(self, run: _Run, stage: str, key: str, began: tuple[float, int]) -> None:
        self.run, self.stage, self.key = run, stage, key
        self.began = began  # (training seconds, step) when this stage (re)started, for tokens/s

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any):
        if logs and self.key in logs and "train_runtime" not in logs:
            check_finite_loss(self.stage, state.global_step, float(logs[self.key]))
            row = {"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}
            self.run.log["logs"][self.stage].append(row)
            losses = {self.key.split("/")[-1]: logs[self.key]}
            self.run._show(self.stage, state.global_step, args.max_steps, losses, self.began)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any):
        every = self.run.settings.eval_every
        if every and state.global_step % every == 0:
            self.run.evaluate(self.stage, state.global_step)
        return control

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any):
        self.run._save_progress()
        return control


@contextmanager
def _trainer_folder(folder: Path | None) -> Iterator[Path]:
    """The Trainer's output folder: the run's checkpoint folder for the stage, or a scratch one that is removed."""
    if folder is not None:
        yield folder  # the Trainer creates it
        return
    with tempfile.TemporaryDirectory(prefix="xatl-trainer-") as scratch:
        yield Path(scratch)


def _batches(train: PackedBlocks, batch_size: int, start: int = 0) -> Callable[[int], torch.Tensor]:
    """Batch `step` of the training blocks, cycling through them in their (seeded) order."""
    count = len(train)

    def batch(step: int) -> torch.Tensor:
        first = (start + step * batch_size) % count
        indices = [(first + offset) % count for offset in range(batch_size)]
        return train.blocks[indices]

    return batch


def _stage_record(stage: str, steps: int, lr: float, settings: DistillSettings, **extra: Any) -> dict[str, Any]:
    """What the manifest keeps of one stage: its steps, tokens, learning rate and final losses."""
    return {"stage": stage, "steps": steps, "tokens": steps * settings.tokens_per_step, "lr": lr, **extra}


def _weights(name: str) -> bool:
    """The student's weight files, which the trained weights replace (the modeling code is kept)."""
    return name.endswith((".safetensors", ".bin")) or name == "model.safetensors.index.json"


def _write(student, student_folder, out, manifest, record, log, force) -> None:
    """The conversion's layout with the trained weights, the manifest with the `distillation` record, CSV logs."""
    state = safetensors_state(student, getattr(torch, manifest["target"]["dtype"]))
    needed = sum(t.numel() * t.element_size() for t in state.values())
    with staged_output(out, force, needed) as staging:
        try:
            _write_folder(student_folder, staging, state, manifest, record, log)
        except (OSError, SafetensorError) as error:
            raise OutputWriteError(f"{out}: cannot write {failed_file(error, staging)}; nothing was written") from None


def _write_folder(student_folder, staging, state, manifest, record, log) -> None:
    """Into the staging folder: the student's files but its weights and manifest (new files, with the mode the umask
    gives), its named chat templates, then the new ones."""
    for file in student_folder.iterdir():
        if file.is_file() and not _weights(file.name) and file.name not in (MANIFEST_NAME, MODEL_CARD_NAME):
            shutil.copyfile(file, staging / file.name)
    copy_named_chat_templates(student_folder, staging)
    card = student_folder / MODEL_CARD_NAME
    (staging / MODEL_CARD_NAME).write_text(
        render_distilled_card(card.read_text(errors="replace") if card.is_file() else "", record)
    )
    save_shard(state, staging / "model.safetensors")
    (staging / MANIFEST_NAME).write_text(json.dumps({**manifest, "distillation": record}, indent=2) + "\n")
    tables = {f"distill_{stage}.csv": rows for stage, rows in log["logs"].items()}
    for name, rows in {**tables, "distill_curve.csv": log["curve"]}.items():
        if rows:
            with (staging / name).open("w", newline="") as handle:
                fields = list(dict.fromkeys(key for row in rows for key in row))
                writer = csv.DictWriter(handle, fieldnames=fields)
                writer.writeheader()
                writer.writerows(rows)
