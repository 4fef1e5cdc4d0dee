"""Bad options and mismatched models for the commands that train and score (distill, eval) or measure (convert
--attn-layers auto:K, select-layers): one line naming the option or the folder, before any model loads, and nothing
written. Options the commands share are tried on each."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.bad_input import error_line, invoke, tree_digest
from tests.conftest import DISTILL_TEXT, EXAMPLE_CHECKPOINT, save_neox
from xatl_convert.conversion import convert


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, distill_student: Path) -> Path:
    root = tmp_path_factory.mktemp("commands")
    shutil.copytree(EXAMPLE_CHECKPOINT, root / "teacher")
    shutil.copytree(distill_student, root / "student")
    (root / "text.txt").write_text(DISTILL_TEXT)
    return root


def _distill(world: Path, *options: str | Path) -> list[str | Path]:
    return ["distill", world / "student", "--teacher", world / "teacher", "--data", world / "text.txt",
            "--out", world / "out", *options]  # fmt: skip


def _eval(world: Path, *options: str | Path) -> list[str | Path]:
    return ["eval", world / "student", "--data", world / "text.txt", *options]


COMMANDS = {"distill": _distill, "eval": _eval}
SHARED = [  # (option, value, what the line says), for every command that has the option
    ("--batch-size", "0", "greater than or equal to 1"),
    ("--batch-size", "-3", "greater than or equal to 1"),
    ("--block-size", "1", "greater than or equal to 2"),
]
DISTILL_ONLY = [
    ("--align-steps", "-1", "greater than or equal to 0"),
    ("--kd-steps", "-2", "greater than or equal to 0"),
    ("--align-tokens", "-5", "0 or more"),
    ("--align-lr", "0", "greater than 0"),
    ("--kd-lr", "nan", "finite number"),
    ("--unfreeze-lr", "inf", "finite number"),
    ("--kd-lr", "-1e-4", "greater than 0"),
    ("--temperature", "0", "greater than 0"),
    ("--ce-weight", "-1", "greater than or equal to 0"),
    ("--seed", "-1", "greater than or equal to 0"),
    ("--seed", str(2**32), "less than 4294967296"),
    ("--grad-accum", "0", "greater than or equal to 1"),
    ("--grad-accum", "3", "does not divide --batch-size 4"),
    ("--eval-every", "-1", "greater than or equal to 0"),
    ("--save-every", "-1", "greater than or equal to 0"),
    ("--stage", "everything", "expected all, align, kd or ce"),
    ("--align-block-share", "1.5", "less than or equal to 1"),
    ("--lit-preset", "after-0", "choose from paper-1pct, paper-0.5pct, after-N"),
    ("--lit-preset", "paper", "choose from paper-1pct, paper-0.5pct, after-N"),
    ("--mix-share", "1", "less than 1"),
]
EVAL_ONLY = [
    ("--max-blocks", "0", "greater than or equal to 1"),
    ("--split", "train", "'held-out' or 'all'"),
]
CASES = [(command, *case) for command in COMMANDS for case in SHARED]
CASES += [("distill", *case) for case in DISTILL_ONLY] + [("eval", *case) for case in EVAL_ONLY]


@pytest.mark.parametrize(("command", "option", "value", "says"), CASES, ids=[f"{c[0]}{c[1]}={c[2]}" for c in CASES])
def test_a_bad_option_is_one_line_naming_it_before_any_work(
    world: Path, command: str, option: str, value: str, says: str
) -> None:
    before = tree_digest(world)
    line = error_line(invoke(*COMMANDS[command](world, f"{option}={value}")))
    assert line.startswith(f"error: {option} ") and says in line, line
    assert tree_digest(world) == before


def test_a_stage_of_zero_steps_is_skipped_and_recorded_as_zero(world: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    arguments = _distill(world, "--align-steps", "0", "--kd-steps", "0", "--block-size", "32", "--force")
    arguments[arguments.index(world / "out")] = out
    result = invoke(*arguments)
    assert result.exit_code == 0, result.output
    stages = json.loads((out / "xatl_manifest.json").read_text())["distillation"]["stages"]
    assert [(s["stage"], s["steps"], s["tokens"], s["skipped"]) for s in stages] == [
        ("align", 0, 0, True),
        ("kd", 0, 0, True),
    ]


@pytest.fixture(scope="module")
def other_models(world: Path) -> dict[str, Path]:
    """Teachers that do not fit the student, and students that cannot train."""
    root = world.parent / (world.name + "-others")
    root.mkdir()
    wide = save_neox(root / "wide-teacher", hidden_size=64, num_attention_heads=4, vocab_size=4096)
    shallow = save_neox(root / "shallow-teacher", num_hidden_layers=2, hidden_size=128, vocab_size=4096)
    small_vocab = save_neox(root / "small-vocab-teacher", hidden_size=128, intermediate_size=512, vocab_size=64)
    no_tokenizer = root / "student-without-tokenizer"
    shutil.copytree(world / "student", no_tokenizer)
    for file in no_tokenizer.glob("tokenizer*"):
        file.unlink()
    all_attention = root / "all-attention-student"
    convert(EXAMPLE_CHECKPOINT, all_attention, attn_layers="0,1,2,3")
    return {"wide": wide, "shallow": shallow, "small-vocab": small_vocab, "no-tokenizer": no_tokenizer,
            "all-attention": all_attention, "not-xatl": shallow}  # fmt: skip


PAIRS = {  # (student, teacher, extra options) -> what the line says
    "teacher-is-student": ("student", "student", [], "is the student folder"),
    "other-hidden-size": ("student", "wide", [], "hidden_size is 64, the student's is 128"),
    "other-layer-count": ("student", "shallow", [], "num_hidden_layers is 2, the student's is 4"),
    "teacher-vocab-too-small": ("student", "small-vocab", [], "beyond the teacher's vocab_size 64"),
    "student-without-tokenizer": ("no-tokenizer", "teacher", [], "has no tokenizer"),
    "student-not-an-xatl-folder": ("not-xatl", "teacher", [], "xatl_manifest.json"),
    "all-attention-student-align": ("all-attention", "teacher", [], "align has nothing to train"),
    "all-attention-student-frozen": ("all-attention", "teacher", ["--stage", "kd"], "nothing trains until LIT"),
}


@pytest.mark.parametrize("case", list(PAIRS))
def test_a_student_and_teacher_that_cannot_train_together_are_one_line(
    world: Path, other_models: dict[str, Path], tmp_path: Path, case: str
) -> None:
    student, teacher, extra, says = PAIRS[case]
    folders = {"student": world / "student", "teacher": world / "teacher", **other_models}
    before = tree_digest(world.parent)
    arguments = ["distill", folders[student], "--teacher", folders[teacher], "--data", world / "text.txt",
                 "--out", tmp_path / "out", "--block-size", "32", *extra]  # fmt: skip
    line = error_line(invoke(*arguments))
    assert says in line, line
    assert tree_digest(world.parent) == before and not (tmp_path / "out").exists()


LAYER_SELECTION = {  # arguments after SRC (the 4-layer example) -> what the line says
    "auto-without-data": (["convert", "--attn-layers", "auto:2", "--out", "OUT"],
                          "error: --attn-layers auto:2 needs --data TEXT"),
    "auto-keeps-none": (["convert", "--attn-layers", "auto:0", "--data", "TEXT", "--out", "OUT"],
                        "error: --attn-layers auto:0: K is the number of layers kept as attention; keep at least 1"),
    "auto-malformed": (["convert", "--attn-layers", "auto:x", "--data", "TEXT", "--out", "OUT"],
                       "error: --attn-layers auto:x: expected auto:K"),
    "auto-keeps-every-layer": (["convert", "--attn-layers", "auto:4", "--data", "TEXT", "--out", "OUT"],
                               "error: --attn-layers auto:4: the model has 4 layers, so at most 3 can be chosen"),
    "data-without-auto": (["convert", "--attn-layers", "1", "--data", "TEXT", "--out", "OUT"],
                          "error: --data: only --attn-layers auto:K measures layers on text"),
    "select-tokens-without-auto": (["convert", "--select-tokens", "4096", "--out", "OUT"],
                                   "error: --select-tokens: only --attn-layers auto:K measures layers on text"),
    "select-tokens-too-few": (["convert", "--attn-layers", "auto:1", "--data", "TEXT", "--select-tokens", "300",
                               "--out", "OUT"], "error: --select-tokens 300: too few to align once and score once"),
    "select-keeps-none": (["select-layers", "--keep", "0", "--data", "TEXT"],
                          "error: --keep 0: input should be greater than or equal to 1"),
    "select-keeps-every-layer": (["select-layers", "--keep", "4", "--data", "TEXT"],
                                 "error: --keep 4: the model has 4 layers, so at most 3 can be chosen"),
    "select-tokens-negative": (["select-layers", "--keep", "1", "--data", "TEXT", "--select-tokens", "-1"],
                               "error: --select-tokens -1: input should be greater than or equal to 2"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(LAYER_SELECTION))
def test_a_bad_layer_selection_is_one_line_before_any_measurement(world: Path, tmp_path: Path, case: str) -> None:
    arguments, says = LAYER_SELECTION[case]
    names = {"TEXT": world / "text.txt", "OUT": tmp_path / "out"}
    command, *rest = arguments
    before = tree_digest(world)
    line = error_line(invoke(command, world / "teacher", *(names.get(word, word) for word in rest)))
    assert line.startswith(says), line
    assert tree_digest(world) == before and not (tmp_path / "out").exists()
