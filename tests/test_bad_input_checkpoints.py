"""Careless and hostile checkpoint folders for `xatl distill --checkpoints/--resume`: xatl never deletes what it did
not write, two runs never share a folder, and a damaged checkpoint or a full disk is one line naming the file.

One real interrupted run (align finished, kd checkpointed at step 2) gives the checkpoint folder that each case copies
and damages; cases that need no training check `RunCheckpoints` directly.
"""

from __future__ import annotations

import errno
import json
import pathlib
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from tests.bad_input import error_line, invoke, tree_digest
from tests.conftest import DISTILL_TEXT, EXAMPLE_CHECKPOINT
from xatl_convert.errors import OutputWriteError, XatlError
from xatl_convert.training import checkpoints as checkpoints_module
from xatl_convert.training import distill as distill_module
from xatl_convert.training.checkpoints import (
    PROGRESS_NAME,
    ResumeError,
    RunCheckpoints,
    check_checkpoint_folder,
)

pytest.importorskip("datasets")
pytest.importorskip("accelerate")

STEPS = ["--align-steps", "2", "--kd-steps", "4", "--block-size", "16", "--batch-size", "2", "--save-every", "2"]
IDENTITY = {"student": "s", "teacher": "t", "data": "d", "stage": "all", "settings": {"seed": 0}}


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(DISTILL_TEXT[:6000])  # 139 training blocks of 16 tokens, 3 held out: quick to score
    return path


def _distill(student: Path, text: Path, out: Path, *extra: str | Path):
    return invoke("distill", student, "--teacher", EXAMPLE_CHECKPOINT, "--data", text, "--out", out, *STEPS, *extra)


@pytest.fixture(scope="module")
def interrupted(distill_student: Path, text: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoint folder of a run stopped at kd step 3: progress, align/ and kd/checkpoint-2."""
    original = distill_module._Run._show

    def interrupt(run, stage, step, *args, **kwargs):
        if (stage, step) == ("kd", 3):
            raise KeyboardInterrupt
        return original(run, stage, step, *args, **kwargs)

    out = tmp_path_factory.mktemp("interrupted") / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(distill_module._Run, "_show", interrupt)
        assert _distill(distill_student, text, out).exit_code == 130
    folder = out.parent / "out.checkpoints"
    assert (folder / PROGRESS_NAME).is_file() and (folder / "align" / "model.safetensors").is_file()
    assert (folder / "kd" / "checkpoint-2" / "optimizer.pt").is_file()
    return folder


@pytest.fixture
def copied(interrupted: Path, tmp_path: Path) -> Path:
    """A private copy of the interrupted run's checkpoints, at the default place beside tmp_path/out."""
    folder = tmp_path / "out.checkpoints"
    shutil.copytree(interrupted, folder)
    return folder


@pytest.fixture(scope="module")
def student_model(distill_student: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(distill_student, dtype=torch.float32)


def _resume_fails(student: Path, text: Path, copied: Path) -> str:
    """Resume from the damaged copy: one line, exit 2, nothing changed, nothing written."""
    before = tree_digest(copied.parent)
    line = error_line(_distill(student, text, copied.parent / "out", "--resume"))
    assert tree_digest(copied.parent) == before
    return line


def _user_folder(tmp_path: Path) -> Path:
    keep = tmp_path / "KEEP"
    (keep / "sub").mkdir(parents=True)
    (keep / "notes.txt").write_text("mine")
    (keep / "sub" / "model.safetensors").write_bytes(b"not xatl's")
    return keep


# ---- never delete what xatl did not write ----------------------------------------------------------------------


@pytest.mark.parametrize("resume", [[], ["--resume"]], ids=["fresh", "resume"])
def test_a_folder_of_other_files_is_refused_up_front_and_kept(
    distill_student: Path, text: Path, tmp_path: Path, resume: list[str]
) -> None:
    keep = _user_folder(tmp_path)
    before = tree_digest(tmp_path)
    line = error_line(_distill(distill_student, text, tmp_path / "out", "--checkpoints", keep, *resume))
    assert f"{keep}: exists and holds files that are not xatl checkpoints; choose another --checkpoints" in line
    assert "remove" not in line
    assert tree_digest(tmp_path) == before


def test_earlier_checkpoints_without_resume_are_refused(distill_student: Path, text: Path, copied: Path) -> None:
    before = tree_digest(copied.parent)
    line = error_line(_distill(distill_student, text, copied.parent / "out"))
    assert f"{copied}: holds checkpoints of an earlier xatl distill run; pass --resume to continue it" in line
    assert tree_digest(copied.parent) == before


def test_a_file_and_a_dangling_link_are_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("mine")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ResumeError, match="is a file, not a folder"):
        check_checkpoint_folder(tmp_path / "file", resume=True)
    with pytest.raises(ResumeError, match="a symbolic link to nothing"):
        RunCheckpoints(tmp_path / "link", IDENTITY, resume=True)
    assert (tmp_path / "file").read_text() == "mine" and not (tmp_path / "nowhere").exists()


def _progress_with_user_files(folder: Path) -> None:
    saved = RunCheckpoints(folder, IDENTITY, resume=False)
    saved.save_progress()
    (folder / "kd" / "checkpoint-2").mkdir(parents=True)
    (folder / "kd" / "checkpoint-2" / "model.safetensors").write_bytes(b"x")
    (folder / "kd" / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2}')
    saved.release()
    (folder / "notes.txt").write_text("mine")


def test_success_removes_only_our_entries(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    _progress_with_user_files(folder)
    saved = RunCheckpoints(folder, IDENTITY, resume=True)
    assert saved.resumed
    saved.remove()
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]  # the folder stays: not empty
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no lock file left
    (folder / "notes.txt").unlink()
    _progress_with_user_files(folder)
    (folder / "notes.txt").unlink()
    RunCheckpoints(folder, IDENTITY, resume=True).remove()
    assert not folder.exists()  # then empty: gone


def test_a_failure_keeps_a_folder_it_did_not_create(tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    saved = RunCheckpoints(folder, IDENTITY, resume=True)
    (folder / "kd").mkdir()  # the Trainer's output folder, before its first checkpoint
    saved.discard_if_unresumable()
    assert folder.is_dir() and not any(folder.iterdir())


def test_a_failure_before_the_first_checkpoint_removes_a_folder_it_created(tmp_path: Path) -> None:
    folder = tmp_path / "new" / "ckpt"
    with pytest.raises(KeyboardInterrupt), RunCheckpoints(folder, IDENTITY, resume=False):
        (folder / "kd" / "checkpoint-1").mkdir(parents=True)
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []  # the folder, its created parent and the lock file are gone


def test_a_failure_keeps_what_a_resume_needs(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    _progress_with_user_files(folder)
    before = tree_digest(folder)
    with pytest.raises(RuntimeError), RunCheckpoints(folder, IDENTITY, resume=True):
        raise RuntimeError("a bug")
    assert tree_digest(folder) == before


# ---- a lock: one run per folder --------------------------------------------------------------------------------


def test_a_second_run_on_the_same_folder_fails_at_once(distill_student: Path, text: Path, tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    with RunCheckpoints(folder, IDENTITY, resume=False):
        before = tree_digest(tmp_path)
        line = error_line(_distill(distill_student, text, tmp_path / "out", "--checkpoints", folder))
        assert f"{folder}: another xatl distill run is using these checkpoints now" in line
        assert tree_digest(tmp_path) == before
        with pytest.raises(ResumeError, match="another xatl distill run"):
            RunCheckpoints(folder, IDENTITY, resume=True)
    assert list(tmp_path.iterdir()) == []  # released: the lock file is gone
    RunCheckpoints(folder, IDENTITY, resume=False).release()  # and can be taken again


# ---- a damaged checkpoint is one line naming the file ----------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"\x00garbage{", "damaged (not JSON"),
        (b"[1, 2]", "damaged (the file: Input should be"),
        (b'{"identity": {}, "done": "x", "logs": {}, "curve": [], "seconds": 0.0}', "damaged (done: Input should"),
    ],
    ids=["not-json", "a-list", "wrong-type"],
)
def test_a_damaged_progress_file_is_one_line(
    distill_student: Path, text: Path, copied: Path, content: bytes, says: str
) -> None:
    (copied / PROGRESS_NAME).write_bytes(content)
    line = _resume_fails(distill_student, text, copied)
    assert f"{copied / PROGRESS_NAME}: {says}" in line and "choose another --checkpoints" in line


def test_a_progress_file_missing_a_key_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    progress = {"identity": {}, "done": [{"stage": "align"}], "logs": {}, "curve": [], "seconds": 0.0}
    (folder / PROGRESS_NAME).write_text(json.dumps(progress))
    with pytest.raises(ResumeError, match=r"xatl_distill.json: damaged \(done.0.tokens: Field required\)"):
        check_checkpoint_folder(folder, resume=True)


def test_truncated_align_weights_are_one_line(distill_student: Path, text: Path, copied: Path) -> None:
    weights = copied / "align" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert f"{weights}: damaged (" in _resume_fails(distill_student, text, copied)


def test_a_pickled_trainer_optimizer_is_one_line(distill_student: Path, text: Path, copied: Path) -> None:
    optimizer = copied / "kd" / "checkpoint-2" / "optimizer.pt"
    torch.save({"state": {}, "param_groups": [], "code": pathlib.PurePosixPath("x")}, optimizer)
    line = _resume_fails(distill_student, text, copied)
    assert f"{optimizer}: damaged (holds more than tensors, which xatl does not load" in line


def _damage(copied: Path, where: str, how: str) -> Path:
    file = copied / where
    if how == "truncated":
        file.write_bytes(file.read_bytes()[: len(file.read_bytes()) // 2])
    elif how == "garbage":
        file.write_bytes(b"\xff\xfe not this")
    elif how == "pickled":
        torch.save({"optimizer": {}, "step": 2, "code": pathlib.PurePosixPath("x")}, file)
    elif how == "foreign":
        save_file({"backbone.embed.weight": torch.zeros(3, 3)}, str(file))
    elif how == "wrong-shape":
        from safetensors.torch import load_file

        state = load_file(str(file))
        name = next(name for name in state if name.endswith("out_proj.weight"))
        state[name] = torch.zeros(2, 2)
        save_file(state, str(file))
    return file


@pytest.mark.parametrize(
    ("where", "how", "says"),
    [
        ("align/model.safetensors", "foreign", "its weights do not fit the student (unexpected backbone.embed.weight"),
        ("align/model.safetensors", "wrong-shape", "its weights do not fit the student (shape of"),
        ("align/optimizer.pt", "truncated", "damaged ("),
        ("align/optimizer.pt", "pickled", "damaged (holds more than tensors"),
        ("kd/checkpoint-2/model.safetensors", "truncated", "damaged ("),
        ("kd/checkpoint-2/model.safetensors", "wrong-shape", "its weights do not fit the student (shape of"),
        ("kd/checkpoint-2/trainer_state.json", "garbage", "damaged (not JSON"),
        ("kd/checkpoint-2/optimizer.pt", "truncated", "damaged ("),
        ("kd/checkpoint-2/rng_state.pth", "garbage", "damaged ("),
        ("kd/checkpoint-2/xatl_lit.json", "garbage", "damaged (not JSON"),
    ],
)
def test_a_damaged_checkpoint_file_is_named(
    copied: Path, student_model: torch.nn.Module, where: str, how: str, says: str
) -> None:
    file = _damage(copied, where, how)
    before = tree_digest(copied)
    identity = json.loads((copied / PROGRESS_NAME).read_text())["identity"]
    with RunCheckpoints(copied, identity, resume=True) as saved, pytest.raises(ResumeError) as raised:
        if where.startswith("align"):
            optimizer = torch.optim.AdamW(student_model.parameters())
            saved.load_align(student_model, optimizer)
        else:
            saved.latest_trainer_checkpoint("kd", student_model)
    message = str(raised.value)
    assert message.startswith(f"{file}: {says}") and "\n" not in message
    assert tree_digest(copied) == before


def test_an_incomplete_trainer_checkpoint_is_skipped_and_cleared(copied: Path) -> None:
    """A run killed while the Trainer wrote checkpoint-4 (no trainer_state.json yet): resume from checkpoint-2."""
    partial = copied / "kd" / "checkpoint-4"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    identity = json.loads((copied / PROGRESS_NAME).read_text())["identity"]
    with RunCheckpoints(copied, identity, resume=True) as saved:
        assert not partial.exists()  # cleared under the lock, as the stale staging of a killed run
        assert saved.latest_trainer_checkpoint("kd") == str(copied / "kd" / "checkpoint-2")


# ---- a full disk -------------------------------------------------------------------------------------------------


def _disk_full(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_at_the_first_align_checkpoint_leaves_nothing(
    distill_student: Path, text: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checkpoints_module, "save_file", _disk_full)
    (tmp_path / "keep.txt").write_text("mine")
    before = tree_digest(tmp_path)
    line = error_line(_distill(distill_student, text, tmp_path / "out"))
    assert line == (
        f"error: {tmp_path / 'out.checkpoints'}: cannot write a checkpoint: No space left on device; "
        "free some space, or choose another --checkpoints"
    )
    assert tree_digest(tmp_path) == before  # no checkpoint folder, no staging, no lock, no OUT


def test_a_full_disk_keeps_the_last_good_checkpoint(
    copied: Path, student_model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    identity = json.loads((copied / PROGRESS_NAME).read_text())["identity"]
    before = tree_digest(copied)
    monkeypatch.setattr(checkpoints_module.torch, "save", _disk_full)
    full = pytest.raises(OutputWriteError, match="cannot write a checkpoint: No space left on device")
    with full, RunCheckpoints(copied, identity, resume=True) as saved:
        saved.save_align(student_model, torch.optim.SGD(student_model.parameters()), 2)
    assert tree_digest(copied) == before  # the staging folder went; align/ and the rest are untouched


def test_a_full_disk_while_the_trainer_saves_is_one_error_naming_the_folder(copied: Path) -> None:
    identity = json.loads((copied / PROGRESS_NAME).read_text())["identity"]
    before = tree_digest(copied)
    with pytest.raises(OutputWriteError) as raised, RunCheckpoints(copied, identity, resume=True):
        (copied / "kd" / "checkpoint-4").mkdir()
        (copied / "kd" / "checkpoint-4" / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert str(raised.value) == (
        f"{copied}: cannot write a checkpoint: the write failed (is the disk full?); free some space, or "
        "choose another --checkpoints"
    )
    assert isinstance(raised.value, XatlError) and tree_digest(copied) == before
