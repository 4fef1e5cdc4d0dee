"""Checkpoints of a distillation run, so that an interrupted run resumes where it stopped, bit for bit.

One folder per run (by default `OUT.checkpoints` beside OUT): `xatl_distill.json` holds what the run has done (the
finished stages' records, every log row, the held-out curve, the training seconds) and what it was started with (the
student, teacher, data and settings, which a resume must match); `align/` holds the student's weights and the align
optimiser's state at the last align checkpoint; `kd/` (or `ce/`) is the HF Trainer's own output folder, whose
`checkpoint-N` folders the Trainer resumes from (with LIT's state, see `callback`). Tensors are read with
`weights_only=True` and safetensors: a checkpoint folder never runs code.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from xatl_convert.errors import XatlError
from xatl_convert.writer import safetensors_state

PROGRESS_NAME = "xatl_distill.json"


class ResumeError(XatlError):
    """A checkpoint folder that does not belong to this run (other settings, data, student or teacher)."""


class RunCheckpoints:
    """The checkpoint folder of one run; `None` folder means checkpoints are off (nothing is saved)."""

    def __init__(self, folder: Path | None, identity: dict[str, Any], resume: bool, main: bool = True) -> None:
        self.folder = folder
        self.identity = identity
        self.main = main  # only the main process writes; every process reads
        self.resumed = False
        self.progress: dict[str, Any] = {"identity": identity, "done": [], "logs": {}, "curve": [], "seconds": 0.0}
        if folder is None:
            return
        saved = folder / PROGRESS_NAME
        if resume and saved.is_file():
            progress = json.loads(saved.read_text())
            if progress.get("identity") != identity:
                changed = sorted(k for k in identity if progress.get("identity", {}).get(k) != identity[k])
                raise ResumeError(
                    f"{folder}: its checkpoints are of another run (differs in {', '.join(changed)}); "
                    "pass the same options, or drop --resume to start again"
                )
            self.progress, self.resumed = progress, True
        elif folder.exists() and not resume and any(folder.iterdir()):
            raise ResumeError(f"{folder}: holds checkpoints of an earlier run; pass --resume, or remove it")

    @property
    def enabled(self) -> bool:
        return self.folder is not None

    def stage_done(self, stage: str) -> dict[str, Any] | None:
        return next((record for record in self.progress["done"] if record["stage"] == stage), None)

    def trainer_folder(self, stage: str) -> Path | None:
        return None if self.folder is None else self.folder / stage

    def latest_trainer_checkpoint(self, stage: str) -> str | None:
        """The Trainer checkpoint with the most steps in the stage's folder, if any."""
        folder = self.trainer_folder(stage)
        if folder is None or not folder.is_dir():
            return None
        steps = [p.name.removeprefix("checkpoint-") for p in folder.glob("checkpoint-*")]
        found = sorted(int(step) for step in steps if step.isdigit())
        return str(folder / f"checkpoint-{found[-1]}") if found else None

    def save_progress(self) -> None:
        if self.folder is None or not self.main:
            return
        self.folder.mkdir(parents=True, exist_ok=True)  # at the first save: a run that fails earlier leaves none
        temporary = self.folder / f".{PROGRESS_NAME}.tmp"
        temporary.write_text(json.dumps(self.progress, indent=1) + "\n")
        temporary.replace(self.folder / PROGRESS_NAME)  # never a half-written progress file

    def save_align(self, student: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """The student's weights and the align optimiser's state after `step` align steps, replaced atomically."""
        if self.folder is None or not self.main:
            return
        staging = self.folder / ".align.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        save_file(safetensors_state(student), str(staging / "model.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "step": step}, staging / "optimizer.pt")
        final = self.folder / "align"
        shutil.rmtree(final, ignore_errors=True)
        staging.replace(final)

    def load_align(self, student: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
        """Restore the last align checkpoint into `student` (and `optimizer`); the align steps it had done, or 0."""
        folder = None if self.folder is None else self.folder / "align"
        if folder is None or not (folder / "model.safetensors").is_file():
            return 0
        _load_weights(student, folder / "model.safetensors")
        saved = torch.load(folder / "optimizer.pt", weights_only=True)
        if optimizer is not None:
            optimizer.load_state_dict(saved["optimizer"])
        return int(saved["step"])

    def load_final(self, student: torch.nn.Module, stage: str) -> None:
        """The weights at the end of a finished stage (align's last checkpoint, or the Trainer's final one)."""
        if stage == "align":
            self.load_align(student, None)
            return
        checkpoint = self.latest_trainer_checkpoint(stage)
        if checkpoint is None:
            raise ResumeError(f"{self.folder}: stage {stage} finished but its final checkpoint is missing")
        _load_weights(student, Path(checkpoint) / "model.safetensors")

    def discard_if_unresumable(self) -> None:
        """After a failure: a folder without a progress file holds nothing a resume could use (the Trainer creates
        its folder before its first checkpoint), so it goes; one with progress stays for `--resume`."""
        unresumable = self.folder is not None and not (self.folder / PROGRESS_NAME).is_file()
        if unresumable and self.main and self.folder.is_dir():
            shutil.rmtree(self.folder, ignore_errors=True)

    def remove(self) -> None:
        """Once OUT is written the checkpoints have served their purpose."""
        if self.folder is not None and self.main:
            shutil.rmtree(self.folder, ignore_errors=True)


def _load_weights(student: torch.nn.Module, file: Path) -> None:
    """Checkpointed weights into the student; only a tied head may be absent."""
    missing, unexpected = student.load_state_dict(load_file(str(file)), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ResumeError(f"{file}: its weights do not fit the student ({(unexpected or missing)[:3]})")
