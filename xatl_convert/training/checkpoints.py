"""Checkpoints of a distillation run, so that an interrupted run resumes where it stopped, bit for bit.

One folder per run (by default `OUT.checkpoints` beside OUT): `xatl_distill.json` holds what the run has done (the
finished stages' records, every log row, the held-out curve, the training seconds) and what it was started with (the
student, teacher, data and settings, which a resume must match); `align/` holds the student's weights and the align
optimiser's state at the last align checkpoint; `kd/` (or `ce/`) is the HF Trainer's own output folder, whose
`checkpoint-N` folders the Trainer resumes from (with LIT's state, see `callback`). Tensors are read with
`weights_only=True` and safetensors: a checkpoint folder never runs code.

The user's files are safe:
- A folder is used only when it is absent, empty, or holds a valid progress file (`check_checkpoint_folder`, also
  the CLI's pre-flight); anything else is refused before any work, and never deleted.
- xatl removes only the entries it writes (`OUR_ENTRIES`), and the folder itself only once it is empty; a failed
  run keeps a resumable folder, and removes a folder it created that holds nothing resumable.
- A lock file beside the folder (`output_folder.exclusive_lock`) keeps two runs from sharing it.
- A damaged checkpoint (progress file, weights, optimiser state, Trainer state) is one error naming the file, found
  before training starts; a failed write (a full disk) is one OutputWriteError, and leaves no half-written entry.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from xatl_convert.errors import OutputWriteError, XatlError, first_line
from xatl_convert.output_folder import exclusive_lock, remove_entry
from xatl_convert.writer import safetensors_state

PROGRESS_NAME = "xatl_distill.json"
STAGE_FOLDERS = ("align", "kd", "ce")  # align: ours; kd, ce: the Trainer's output folders
PROGRESS_TEMPORARY = f".{PROGRESS_NAME}.tmp"
ALIGN_STAGING = ".align.tmp"
OUR_ENTRIES = (PROGRESS_NAME, *STAGE_FOLDERS, PROGRESS_TEMPORARY, ALIGN_STAGING)  # all that xatl writes in the folder
TRAINER_STATE_NAME = "trainer_state.json"  # written last into a Trainer checkpoint: without it, one is incomplete
LIT_STATE_NAME = "xatl_lit.json"  # also callback.LIT_STATE_NAME (not imported: that module imports transformers)
CHOOSE_ANOTHER = "choose another --checkpoints"
# Errors that reading a damaged tensor file raises: torch's weights-only unpickler, a truncated zip, safetensors.
_READ_ERRORS = (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError, SafetensorError)
# Errors that writing to a full disk raises: OSError (json, rename), SafetensorError, RuntimeError (torch.save).
_WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class ResumeError(XatlError):
    """A checkpoint folder that cannot be used: not xatl's, another run's, in use, or damaged (the file is named)."""


# ---- the progress file, validated: the keys and types that distill relies on ----------------------------------


class _Record(BaseModel):
    """A finished stage's record (the manifest keeps it as it is: more keys are allowed)."""

    model_config = ConfigDict(strict=True, extra="allow")
    stage: str = Field(pattern="^(align|kd|ce)$")
    tokens: int = Field(ge=0)


class _LogRow(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    step: int = Field(ge=0)


class _CurvePoint(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    stage: str
    step: int = Field(ge=0)
    tokens: int = Field(ge=0)
    seconds: float
    held_out_loss: float


class _Start(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    teacher_loss: float
    start_loss: float


class _Progress(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    identity: dict[str, Any]
    done: list[_Record]
    logs: dict[str, list[_LogRow]]
    curve: list[_CurvePoint]
    seconds: float = Field(ge=0)
    start: _Start | None = None


class _LITState(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    trigger: dict[str, Any]
    steps: int = Field(ge=0)
    unfrozen_at: int | None


def read_progress(file: Path) -> dict[str, Any]:
    """A progress file's contents, checked; a damaged one is a ResumeError naming it."""
    try:
        data = json.loads(file.read_bytes().decode("utf-8"))
    except OSError as error:
        raise ResumeError(f"{file}: cannot be read ({error.strerror or error}); {CHOOSE_ANOTHER}") from None
    except ValueError as error:  # not UTF-8, not JSON
        raise _damaged(file, f"not JSON: {first_line(error)}") from None
    try:
        _Progress.model_validate(data)
    except ValidationError as error:
        raise _damaged(file, _first_problem(error)) from None
    return data


def check_checkpoint_folder(folder: str | Path, resume: bool) -> dict[str, Any] | None:
    """Refuse, before any work, a checkpoint folder this run must not use; return its progress when it has one.

    Usable: an absent or empty folder, or one holding a valid progress file (`resume` must then be given). Anything
    else (a file, a folder with other files, a damaged progress file) is refused, and never touched.
    """
    path = Path(folder)
    if path.is_symlink() and not path.exists():
        raise ResumeError(f"{folder}: a symbolic link to nothing; xatl does not write through it; {CHOOSE_ANOTHER}")
    if not path.exists():
        return None
    if not path.is_dir():
        raise ResumeError(f"{folder}: exists and is a file, not a folder; {CHOOSE_ANOTHER}")
    progress_file = path / PROGRESS_NAME
    if progress_file.exists() or progress_file.is_symlink():
        if progress_file.is_symlink() or not progress_file.is_file():
            raise _damaged(progress_file, "not a regular file")
        progress = read_progress(progress_file)
        if not resume:
            raise ResumeError(
                f"{folder}: holds checkpoints of an earlier xatl distill run; pass --resume to continue it, "
                f"or {CHOOSE_ANOTHER}"
            )
        return progress
    try:
        holds_files = any(path.iterdir())
    except OSError as error:
        raise ResumeError(f"{folder}: cannot be read ({error.strerror or error}); {CHOOSE_ANOTHER}") from None
    if holds_files:
        raise ResumeError(f"{folder}: exists and holds files that are not xatl checkpoints; {CHOOSE_ANOTHER}")
    return None


class RunCheckpoints:
    """The checkpoint folder of one run; `None` folder means checkpoints are off (nothing is saved).

    The main process holds the folder's lock from construction until `remove()` (success),
    `discard_if_unresumable()` (failure) or `release()`; as a context manager, leaving the block does the right one
    of these (and names a full disk that a Trainer checkpoint hit).
    """

    def __init__(self, folder: Path | None, identity: dict[str, Any], resume: bool, main: bool = True) -> None:
        self.folder = folder
        self.identity = identity
        self.main = main  # only the main process writes and locks; every process reads
        self.resumed = False
        self.progress: dict[str, Any] = {"identity": identity, "done": [], "logs": {}, "curve": [], "seconds": 0.0}
        self._lock = contextlib.ExitStack()
        self._created_parents: list[Path] = []
        self._created = False  # whether this run created the folder: only then may a failure remove it
        if folder is None:
            return
        check_checkpoint_folder(folder, resume)  # before the lock: its file goes beside a folder that is fine to use
        try:
            if main:
                self._acquire()
            progress = check_checkpoint_folder(folder, resume)  # again, now that no other run can change it
            self._created = not (folder.exists() or folder.is_symlink())
            if progress is not None:
                if progress["identity"] != identity:
                    changed = sorted(k for k in identity if progress["identity"].get(k) != identity[k])
                    raise ResumeError(
                        f"{folder}: its checkpoints are of another run (differs in {', '.join(changed) or 'keys'}); "
                        f"pass the same options to continue it, or {CHOOSE_ANOTHER}"
                    )
                self.progress, self.resumed = progress, True
                if main:
                    self._remove_unfinished()  # of a run that was killed: we hold the lock, so none is running
        except BaseException:
            self.release()
            raise

    # ---- the lock --------------------------------------------------------------------------------------------

    def _acquire(self) -> None:
        assert self.folder is not None
        location = Path(os.path.abspath(self.folder))
        missing = [parent for parent in location.parents if not parent.exists()]
        try:
            for parent in reversed(missing):
                parent.mkdir()
                self._created_parents.insert(0, parent)  # innermost first, the order they are removed in
        except OSError as error:
            raise OutputWriteError(
                f"{self.folder}: cannot create folder {parent}: {error.strerror or error}; {CHOOSE_ANOTHER}"
            ) from None
        busy = ResumeError(
            f"{self.folder}: another xatl distill run is using these checkpoints now; wait for it, or {CHOOSE_ANOTHER}"
        )
        self._lock.enter_context(exclusive_lock(location, self.folder, busy))

    def release(self) -> None:
        """Let go of the folder's lock (and remove parent folders created for it, if still empty). Idempotent."""
        self._lock.close()
        for parent in self._created_parents:
            with contextlib.suppress(OSError):
                parent.rmdir()
        self._created_parents = []

    def __enter__(self) -> RunCheckpoints:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if error is None:
            self.release()
            return
        cut_short = self.discard_if_unresumable()
        if cut_short and isinstance(error, _WRITE_ERRORS) and not isinstance(error, XatlError):
            raise _write_failed(self.folder, error) from None  # the Trainer hit a full disk while checkpointing

    # ---- reading ---------------------------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self.folder is not None

    def stage_done(self, stage: str) -> dict[str, Any] | None:
        return next((record for record in self.progress["done"] if record["stage"] == stage), None)

    def trainer_folder(self, stage: str) -> Path | None:
        return None if self.folder is None else self.folder / stage

    def latest_trainer_checkpoint(self, stage: str, student: torch.nn.Module | None = None) -> str | None:
        """The complete Trainer checkpoint with the most steps in the stage's folder, if any, checked before the
        Trainer reads it (its weights against `student`, when given); a damaged one is a ResumeError naming the file.
        One without `trainer_state.json`, which the Trainer writes last, is incomplete and skipped."""
        folder = self.trainer_folder(stage)
        if folder is None or not folder.is_dir():
            return None
        complete = [path for path in _trainer_checkpoints(folder) if (path / TRAINER_STATE_NAME).exists()]
        if not complete:
            return None
        check_trainer_checkpoint(complete[-1], student)
        return str(complete[-1])

    def load_align(self, student: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
        """Restore the last align checkpoint into `student` (and `optimizer`); the align steps it had done, or 0."""
        folder = None if self.folder is None else self.folder / "align"
        if folder is None or not (folder / "model.safetensors").exists():
            if self.stage_done("align") and folder is not None:
                raise ResumeError(
                    f"{folder / 'model.safetensors'}: missing, but stage align finished; this checkpoint cannot be "
                    f"resumed; {CHOOSE_ANOTHER}"
                )
            return 0
        saved = _load_torch(folder / "optimizer.pt")
        if not (isinstance(saved, dict) and isinstance(saved.get("optimizer"), dict) and _is_count(saved.get("step"))):
            raise _damaged(folder / "optimizer.pt", "not an align optimiser state")
        _load_weights(student, folder / "model.safetensors")
        if optimizer is not None:
            try:
                optimizer.load_state_dict(saved["optimizer"])
            except (ValueError, KeyError, RuntimeError, TypeError) as error:
                raise _damaged(folder / "optimizer.pt", f"does not fit the student: {first_line(error)}") from None
        return int(saved["step"])

    def load_final(self, student: torch.nn.Module, stage: str) -> None:
        """The weights at the end of a finished stage (align's last checkpoint, or the Trainer's final one)."""
        if stage == "align":
            self.load_align(student, None)
            return
        checkpoint = self.latest_trainer_checkpoint(stage, student)
        if checkpoint is None:
            raise ResumeError(f"{self.folder}: stage {stage} finished but its final checkpoint is missing")
        _load_weights(student, Path(checkpoint) / "model.safetensors")

    # ---- writing ---------------------------------------------------------------------------------------------

    def save_progress(self) -> None:
        if self.folder is None or not self.main:
            return
        text = json.dumps(self.progress, indent=1) + "\n"
        temporary = self.folder / PROGRESS_TEMPORARY
        with self._writing(temporary):
            self.folder.mkdir(parents=True, exist_ok=True)  # at the first save: a run that fails earlier leaves none
            temporary.write_text(text)
            temporary.replace(self.folder / PROGRESS_NAME)  # never a half-written progress file

    def save_align(self, student: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """The student's weights and the align optimiser's state after `step` align steps, replaced atomically."""
        if self.folder is None or not self.main:
            return
        state = safetensors_state(student)
        staging = self.folder / ALIGN_STAGING
        with self._writing(staging):
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            save_file(state, str(staging / "model.safetensors"))
            torch.save({"optimizer": optimizer.state_dict(), "step": step}, staging / "optimizer.pt")
            final = self.folder / "align"
            shutil.rmtree(final, ignore_errors=True)
            staging.replace(final)

    @contextlib.contextmanager
    def _writing(self, temporary: Path) -> Iterator[None]:
        """A failed write (a full disk) is one OutputWriteError naming the folder, and leaves no temporary entry."""
        try:
            yield
        except _WRITE_ERRORS as error:
            remove_entry(temporary)
            raise _write_failed(self.folder, error) from None
        except BaseException:
            remove_entry(temporary)
            raise

    # ---- the end of the run ----------------------------------------------------------------------------------

    def discard_if_unresumable(self) -> bool:
        """After a failure: keep what a resume can use, remove the rest that this run wrote, release the lock.

        Temporary entries and Trainer checkpoints cut short go. Without a valid progress file nothing is resumable:
        our entries go, and the folder too if this run created it (and it is then empty). Returns whether a Trainer
        checkpoint was cut short (the failure happened while it was written).
        """
        cut_short = False
        try:
            if self.folder is not None and self.main and self.folder.is_dir():
                cut_short = self._remove_unfinished()
                if not self._resumable():
                    self._remove_ours(remove_folder=self._created)
        finally:
            self.release()
        return cut_short

    def remove(self) -> None:
        """Once OUT is written the checkpoints have served their purpose: our entries go, then the folder if empty."""
        try:
            if self.folder is not None and self.main and self.folder.is_dir():
                self._remove_ours(remove_folder=True)
        finally:
            self.release()

    def _resumable(self) -> bool:
        assert self.folder is not None
        try:
            read_progress(self.folder / PROGRESS_NAME)
        except ResumeError:
            return False
        return True

    def _remove_unfinished(self) -> bool:
        """Remove temporary entries and Trainer checkpoints without their trainer_state.json; whether any was."""
        assert self.folder is not None
        for name in (PROGRESS_TEMPORARY, ALIGN_STAGING):
            remove_entry(self.folder / name)
        cut_short = False
        for stage in STAGE_FOLDERS[1:]:
            folder = self.folder / stage
            if folder.is_dir() and not folder.is_symlink():
                for checkpoint in _trainer_checkpoints(folder):
                    if not (checkpoint / TRAINER_STATE_NAME).exists():
                        remove_entry(checkpoint)
                        cut_short = True
        return cut_short

    def _remove_ours(self, remove_folder: bool) -> None:
        assert self.folder is not None
        for name in OUR_ENTRIES:
            remove_entry(self.folder / name)
        if remove_folder and not self.folder.is_symlink():
            with contextlib.suppress(OSError):
                self.folder.rmdir()  # only if nothing else is left in it


def check_trainer_checkpoint(checkpoint: Path, student: torch.nn.Module | None = None) -> None:
    """What the Trainer reads from a checkpoint, checked first, so that a damaged file is one line naming it: the
    Trainer state, the weights (against `student` when given), LIT's state and the weights-only tensor files."""
    state_file = checkpoint / TRAINER_STATE_NAME
    state = _read_json(state_file)
    if not (isinstance(state, dict) and _is_count(state.get("global_step"))):
        raise _damaged(state_file, "not a Trainer state (no global_step)")
    weights = checkpoint / "model.safetensors"
    if not weights.exists():
        raise _damaged(weights, "missing")
    shapes = _safetensors_shapes(weights)
    if student is not None:
        _check_fit(weights, shapes, student)
    lit_file = checkpoint / LIT_STATE_NAME
    if lit_file.exists():
        try:
            _LITState.model_validate(_read_json(lit_file))
        except ValidationError as error:
            raise _damaged(lit_file, _first_problem(error)) from None
    for file in sorted([*checkpoint.glob("*.pt"), *checkpoint.glob("*.pth")]):
        _load_torch(file, mmap=True)


# ---- helpers ---------------------------------------------------------------------------------------------------


def _trainer_checkpoints(folder: Path) -> list[Path]:
    """The stage folder's `checkpoint-N` folders, by step."""
    steps = {path: path.name.removeprefix("checkpoint-") for path in folder.glob("checkpoint-*")}
    found = sorted((int(step), path) for path, step in steps.items() if step.isdigit() and path.is_dir())
    return [path for _, path in found]


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_bytes().decode("utf-8"))
    except OSError as error:
        raise _damaged(file, f"cannot be read: {error.strerror or error}") from None
    except ValueError as error:
        raise _damaged(file, f"not JSON: {first_line(error)}") from None


def _load_torch(file: Path, mmap: bool = False) -> Any:
    """A weights-only torch file (numpy's arrays allowed, as the Trainer allows them for its RNG state)."""
    if not file.exists():
        raise _damaged(file, "missing")
    try:
        with _numpy_allowed():
            return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        raise _damaged(file, f"holds more than tensors, which xatl does not load: {first_line(error)}") from None
    except _READ_ERRORS as error:
        raise _damaged(file, first_line(error)) from None


def _numpy_allowed() -> contextlib.AbstractContextManager[Any]:
    try:
        from transformers.trainer_pt_utils import safe_globals
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    return safe_globals()


def _safetensors_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape, from the header (which safetensors checks against the file's length)."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118
    except _READ_ERRORS as error:
        raise _damaged(file, first_line(error)) from None


def _check_fit(file: Path, shapes: dict[str, tuple[int, ...]], student: torch.nn.Module) -> None:
    """Checkpointed weights must be the student's: the same names and shapes; only a tied head may be absent."""
    expected = {name: tuple(tensor.shape) for name, tensor in student.state_dict().items()}
    unexpected = sorted(set(shapes) - set(expected))
    missing = sorted(set(expected) - set(shapes) - {"lm_head.weight"})
    wrong = [f"{name} {list(shapes[name])} (the student's is {list(expected[name])})"
             for name in sorted(set(shapes) & set(expected)) if shapes[name] != expected[name]]  # fmt: skip
    problems = (
        ([f"unexpected {', '.join(unexpected[:3])}"] if unexpected else [])
        + ([f"missing {', '.join(missing[:3])}"] if missing else [])
        + ([f"shape of {wrong[0]}"] if wrong else [])
    )
    if problems:
        raise ResumeError(
            f"{file}: its weights do not fit the student ({'; '.join(problems)}); this checkpoint cannot be resumed; "
            f"{CHOOSE_ANOTHER}"
        )


def _load_weights(student: torch.nn.Module, file: Path) -> None:
    """Checkpointed weights into the student, checked first (names and shapes); only a tied head may be absent."""
    _check_fit(file, _safetensors_shapes(file), student)
    try:
        state = load_file(str(file))
    except _READ_ERRORS as error:
        raise _damaged(file, first_line(error)) from None
    student.load_state_dict(state, strict=False)


def _damaged(file: Path, reason: str) -> ResumeError:
    return ResumeError(f"{file}: damaged ({reason}); this checkpoint cannot be resumed; {CHOOSE_ANOTHER}")


def _first_problem(error: ValidationError) -> str:
    problem = error.errors()[0]
    where = ".".join(str(part) for part in problem["loc"]) or "the file"
    return f"{where}: {problem['msg']}"


def _write_failed(folder: Path | None, error: BaseException) -> OutputWriteError:
    """A failed checkpoint write as one line: the OS's reason where there is one, and what to do."""
    code = getattr(error, "errno", None)
    found = re.search(r"os error (\d+)", str(error))  # safetensors' I/O errors carry only the OS text
    if code is None and found:
        code = int(found.group(1))
    if code is not None:
        reason = os.strerror(code)
    elif isinstance(error, RuntimeError):  # torch.save's writer says only "unexpected pos" on a full disk
        reason = "the write failed (is the disk full?)"
    else:
        reason = first_line(error)
    advice = "free some space, or " + CHOOSE_ANOTHER if code in _DISK_FULL or code is None else CHOOSE_ANOTHER
    return OutputWriteError(f"{folder}: cannot write a checkpoint: {reason}; {advice}")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
