"""The write guard, proved over the Typer app itself: every command, every path option, every dangerous target.

The commands and their options are enumerated from the app, not listed by hand. Each path option must declare a
role (`Reads` or `Writes`), so a new option cannot be forgotten; each writing option is then tried against each input
of its command, an input's parent and inside, the current and home folders, the command's other outputs, and an
unrelated folder or file with and without --force. Every case must exit 2 with one `error:` line naming the option,
and leave every byte of the user's files as it was.
"""

from __future__ import annotations

import inspect
import shutil
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import typer.main

from tests.bad_input import error_line, invoke, tree_digest
from tests.conftest import DISTILL_TEXT, EXAMPLE_CHECKPOINT
from xatl_convert.cli import XatlCommand, app, path_roles
from xatl_convert.write_guard import Reads, Writes

try:
    from typer import _click as click
except ImportError:  # pragma: no cover
    import click

# Options whose values are never paths, by metavar; any other string or path option must declare a role.
NOT_PATHS = {"MIXER", "REV", "SPEC", "KEY=VALUE", "METHOD", "DTYPE", "BYTES", "FORMAT", "STAGE", "SPLIT", "P",
             "DEVICE", "NAME", "PRESET"}  # fmt: skip


def all_commands(group: Any = None, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, click.Command]]:
    group = group or typer.main.get_command(app)
    for name, command in group.commands.items():
        if hasattr(command, "commands"):  # a group of commands (xatl mappings)
            yield from all_commands(command, (*prefix, name))
        else:
            yield " ".join((*prefix, name)), command


COMMANDS = dict(all_commands())


def _is_path_like(command: click.Command, parameter: click.Parameter) -> bool:
    """A str or Path parameter (or a list or optional of one) whose metavar does not say it is something else."""
    if parameter.name == "context":
        return False
    hint = typing.get_type_hints(inspect.unwrap(command.callback), include_extras=True)[parameter.name]
    kinds = {str(arg) for arg in _flatten(hint)}
    if not kinds & {str(str), str(Path)}:
        return False
    return (parameter.metavar or "") not in NOT_PATHS


def _flatten(hint: Any) -> Iterator[Any]:
    arguments = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Annotated:
        arguments = arguments[:1]
    if not arguments:
        yield hint
    for argument in arguments:
        yield from _flatten(argument)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_goes_through_the_guard_and_every_path_option_has_a_role(name: str) -> None:
    command = COMMANDS[name]
    assert isinstance(command, XatlCommand), f"xatl {name}: register it with cls=XatlCommand"
    roles = path_roles(command)
    for parameter in command.params:
        if not _is_path_like(command, parameter):
            continue
        assert parameter.name in roles, (
            f"xatl {name} {parameter.opts[0]}: cannot tell whether it reads or writes a path; declare Reads(...) or "
            "Writes(...) in its Annotated type (or add its metavar to NOT_PATHS if it is no path)"
        )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, distill_student: Path) -> Path:
    """The user's files: a teacher, a converted student, text as a file and as a folder, a mapping, a cache."""
    root = tmp_path_factory.mktemp("world")
    shutil.copytree(EXAMPLE_CHECKPOINT, root / "teacher")
    shutil.copytree(distill_student, root / "student")
    (root / "corpus").mkdir()
    (root / "corpus" / "docs.txt").write_text(DISTILL_TEXT)
    (root / "text.txt").write_text(DISTILL_TEXT[:4000])
    shutil.copy(Path(__file__).parents[1] / "mappings" / "gpt-neox.yaml", root / "mapping.yaml")
    (root / "cache").mkdir()
    (root / "cache" / "keep.txt").write_text("a cached file")
    (root / "home").mkdir()
    (root / "work").mkdir()
    (root / "work" / "notes.txt").write_text("the user's own notes")
    (root / "unrelated").mkdir()
    (root / "unrelated" / "keep.txt").write_text("not xatl's")
    (root / "unrelated.json").write_text('{"mine": true}')
    return root


# Each writing command's invocation with every input given; {option: TARGET} marks where targets go.
Invocation = Callable[[Path], list[str | Path]]
INVOCATIONS: dict[str, Invocation] = {
    "convert": lambda w: ["convert", w / "teacher", "--to", "mamba", "--mapping", w / "mapping.yaml",
                          "--cache-dir", w / "cache", "--attn-layers", "auto:1", "--data", w / "text.txt",
                          "--out", "TARGET"],
    "select-layers": lambda w: ["select-layers", w / "teacher", "--keep", "1", "--data", w / "corpus",
                                "--mapping", w / "mapping.yaml", "--cache-dir", w / "cache", "--json", "TARGET"],
    "verify": lambda w: ["verify", w / "student", "--source", w / "teacher", "--text", w / "text.txt",
                         "--json", "TARGET:--json", "--junit", "TARGET:--junit"],
    "distill": lambda w: ["distill", w / "student", "--teacher", w / "teacher", "--data", w / "corpus",
                          "--out", "TARGET:--out", "--checkpoints", "TARGET:--checkpoints",
                          "--teacher-cache", "TARGET:--teacher-cache"],
    "eval": lambda w: ["eval", w / "student", "--data", w / "text.txt", "--teacher", w / "teacher",
                       "--json", "TARGET"],
    "export": lambda w: ["export", w / "student", "--format", "bamba", "--out", "TARGET"],
    "mappings new": lambda w: ["mappings", "new", "--source", w / "teacher", "--out", "TARGET"],
}  # fmt: skip
FORMAT_VARIANTS = {"convert": ["--format", "granitemoehybrid"]}  # the same option through another writer


def writing_options() -> list[tuple[str, str]]:
    found = []
    for name, command in sorted(COMMANDS.items()):
        for parameter, role in path_roles(command).items():
            if isinstance(role, Writes):
                option = next(p for p in command.params if p.name == parameter).opts[0]
                found.append((name, option))
    return found


def test_every_writing_command_is_tried() -> None:
    untried = {name for name, _ in writing_options()} - set(INVOCATIONS)
    assert not untried, f"add an invocation to INVOCATIONS for: {', '.join(sorted(untried))}"


def _dangerous_targets(world: Path, inputs: list[Path], kind: str) -> dict[str, Path | str]:
    targets: dict[str, Path | str] = {"current folder": ".", "current folder by path": world / "work",
                                      "home folder": world / "home", "parent of the current folder": world}  # fmt: skip
    for path in inputs:
        targets[f"input {path.name}"] = path
        targets[f"parent of {path.name}"] = path.parent
        if path.is_dir():
            targets[f"inside {path.name}"] = path / "sub"
        else:
            targets[f"beside-inside {path.name}"] = path / "sub"
    targets["unrelated folder"] = world / "unrelated"
    if kind == "report":
        targets["unrelated file"] = world / "unrelated.json"
    targets["dangling link"] = world / "dangling"
    return targets


def _invocation(name: str, world: Path, option: str, target: Path | str, extra: list[str]) -> list[str | Path]:
    words = INVOCATIONS[name](world) + extra
    result: list[str | Path] = []
    for word in words:
        if word == "TARGET" or word == f"TARGET:{option}":
            result.append(target)
        elif isinstance(word, str) and word.startswith("TARGET:"):
            result.append(world / "work" / f"fresh-{word.removeprefix('TARGET:--')}")  # other outputs: new paths
        else:
            result.append(word)
    return result


CASES = [(name, option, variant) for name, option in writing_options()
         for variant in ("plain", *(["format"] if name in FORMAT_VARIANTS else []))]  # fmt: skip


@pytest.mark.parametrize(("name", "option", "variant"), CASES, ids=[f"{n}-{o}-{v}" for n, o, v in CASES])
def test_no_writing_option_touches_an_input_or_a_folder_it_did_not_write(
    world: Path, monkeypatch: pytest.MonkeyPatch, name: str, option: str, variant: str
) -> None:
    monkeypatch.chdir(world / "work")
    monkeypatch.setenv("HOME", str(world / "home"))
    monkeypatch.setenv("HF_HOME", str(world / "cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(world / "cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HOME", str(world / "cache"))
    dangling = world / "dangling"
    if not dangling.is_symlink():
        dangling.symlink_to(world / "nowhere")
    command = COMMANDS[name]
    roles = path_roles(command)
    kind = next(role.kind for p, role in roles.items() if isinstance(role, Writes) and _opt(command, p) == option)
    base = _invocation(name, world, option, "TARGET", [])
    inputs = [Path(word) for word in base if isinstance(word, Path) and word.exists()]
    assert inputs or name == "mappings new"
    extra = FORMAT_VARIANTS.get(name, []) if variant == "format" else []
    has_force = any(p.name == "force" for p in command.params)
    before = tree_digest(world)
    tried = 0
    for what, target in _dangerous_targets(world, inputs, kind).items():
        for force in (["--force"], []) if has_force else ([],):
            result = invoke(*_invocation(name, world, option, target, extra), *force)
            line = error_line(result)
            assert f"{option} " in line, (what, line)
            assert tree_digest(world) == before, (what, force, line)
            assert not list((world / "work").glob("fresh-*")), (what, line)
            tried += 1
    assert tried >= 8


def _opt(command: click.Command, parameter: str) -> str:
    return next(p for p in command.params if p.name == parameter).opts[0]


def test_two_outputs_of_one_command_never_overlap(world: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--out o --checkpoints o --save-every 1 --force` once printed "wrote o" and o did not exist."""
    monkeypatch.chdir(world / "work")
    before = tree_digest(world)
    for checkpoints in ("o", "o/checkpoints"):
        arguments = [*INVOCATIONS["distill"](world)[:6], "--out", "o", "--checkpoints", checkpoints]
        line = error_line(invoke(*arguments, "--save-every", "1", "--force"))
        assert "--checkpoints target" in line or "the --out target" in line
    assert tree_digest(world) == before and not (world / "work" / "o").exists()


@pytest.mark.parametrize(
    "arguments",
    [
        ["convert", "org/model", "--out", "TARGET"],
        ["distill", "STUDENT", "--teacher", "org/model", "--data", "TEXT", "--out", "TARGET"],
        ["eval", "STUDENT", "--data", "org/dataset", "--json", "TARGET"],
    ],
    ids=["convert-source", "distill-teacher", "eval-data"],
)
def test_a_hub_input_protects_the_hugging_face_cache(
    world: Path, monkeypatch: pytest.MonkeyPatch, arguments: list[str]
) -> None:
    monkeypatch.chdir(world / "work")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(world / "cache" / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HOME", str(world / "cache"))
    names = {"STUDENT": world / "student", "TEXT": world / "text.txt"}
    before = tree_digest(world)
    for target in (world / "cache", world / "cache" / "hub" / "out.json"):
        words = [target if word == "TARGET" else names.get(word, word) for word in arguments]
        line = error_line(invoke(*words, "--force") if arguments[0] != "eval" else invoke(*words))
        assert "the Hugging Face cache" in line or "HF_HOME" in line, line
    assert tree_digest(world) == before


def test_roles_name_what_is_read_in_messages() -> None:
    roles = path_roles(COMMANDS["distill"])
    assert roles["teacher"] == Reads("the teacher", hub="model")
    assert roles["checkpoints"] == Writes("checkpoints")
