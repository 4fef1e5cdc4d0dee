"""The one write guard: every path any command writes is checked against every path that command reads.

Each command declares its paths once: a CLI parameter carries `Reads(...)` or `Writes(...)` in its `Annotated`
type, and the library function it calls passes the same roles to `check_write_targets`. The rules, for every
write target (an output folder, a checkpoint folder, a report file, a new mapping file):
- it is never, never contains and never lies inside an input of the same command (source, student, teacher, data,
  mapping, a Hub input's cache folder, the source an xatl folder records), nor another output of the command;
- it is never and never contains the current folder or the home folder;
- a dangling symbolic link is not written through, and a link to an input is not written either;
- an existing target is replaced only when this tool wrote it: an output folder holds `xatl_manifest.json`, a
  checkpoint folder `xatl_distill.json`, a report file is an xatl report (a teacher cache, which holds
  `xatl_teacher_cache.json`, is reused or refused by its key, never replaced). A folder output needs `--force` as well,
  and is replaced only once the new one is complete (see `output_folder.staged_output`); a report file is written
  to a temporary file beside it and renamed into place (`write_report_file`).
A new command gets all of this by declaring its paths; tests/test_write_guard.py walks the Typer app and tries every
writing option against every input, so an option without a role fails the suite.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from xatl_convert.errors import OutputExistsError, OutputWriteError, UnsafeOutputError

MANIFEST_NAME = "xatl_manifest.json"  # proves an output folder is xatl's (also manifest.MANIFEST_NAME)
PROGRESS_NAME = "xatl_distill.json"  # proves a checkpoint folder is xatl's (also training.checkpoints)
TEACHER_CACHE_NAME = "xatl_teacher_cache.json"  # proves a teacher cache is xatl's (also training.teacher_cache)
REPORT_KEY = "xatl_report"  # every JSON report xatl writes names its command under this key
TargetKind = Literal["folder", "checkpoints", "teacher-cache", "report", "new-file"]
HubKind = Literal["model", "dataset"]


@dataclass(frozen=True)
class Reads:
    """Role of a CLI parameter whose path the command reads (`what` names it in messages). With `hub`, a value that
    is not a local path is a Hub id, and the Hugging Face cache it is read from is protected instead."""

    what: str
    hub: HubKind | None = None


@dataclass(frozen=True)
class Writes:
    """Role of a CLI parameter whose path the command writes: an output folder, a checkpoint folder, a teacher cache,
    a report file, or a new file that is never replaced."""

    kind: TargetKind
    what: str = "the output"


@dataclass(frozen=True)
class WriteTarget:
    """One path a command will write, with the option that named it (for messages)."""

    option: str
    path: Path
    kind: TargetKind = "folder"


@dataclass
class CommandPaths:
    """What one command reads and writes, gathered from its parameters or given by a library function."""

    inputs: dict[Path, str] = field(default_factory=dict)
    targets: list[WriteTarget] = field(default_factory=list)

    def read(self, value: str | Path | None, what: str, hub: HubKind | None = None, cache_dir: Path | None = None):
        """Add an input: a local path as it is (and an xatl folder's recorded source), else a Hub id's cache."""
        if value is None:
            return
        local = Path(value).expanduser()
        if local.exists() or local.is_symlink():
            self.inputs[_absolute(local)] = what
            self.inputs[storage_root(local)] = what
            self.inputs.update(_recorded_source(local))
        elif hub is not None:
            self.inputs.update(hub_caches(cache_dir))

    def write(self, value: str | Path | None, option: str, kind: TargetKind) -> None:
        if value is not None:
            self.targets.append(WriteTarget(option, Path(value), kind))

    def check(self, force: bool = False) -> None:
        check_write_targets(self.targets, self.inputs, force)


def xatl_version() -> str:
    """The installed xatl-convert's version, which every manifest, report and export record carries."""
    from xatl_convert import __version__

    return __version__


def report_marks(command: str) -> dict[str, str]:
    """What opens every report xatl writes: the command (so a later run may replace the file) and the version."""
    return {REPORT_KEY: command, "xatl_convert_version": xatl_version()}


def hub_caches(cache_dir: str | Path | None = None) -> dict[Path, str]:
    """The folders a Hub input is read from: the model cache (or --cache-dir) and HF_HOME with the datasets cache."""
    from huggingface_hub import constants

    caches = {Path(constants.HF_HUB_CACHE): "the Hugging Face cache", Path(constants.HF_HOME): "HF_HOME"}
    if cache_dir is not None:
        caches[Path(cache_dir)] = "the Hugging Face cache (--cache-dir)"
    return {_absolute(path): what for path, what in caches.items()}


def check_write_targets(
    targets: Iterable[WriteTarget],
    inputs: dict[Path, str],
    force: bool = False,
    current_dir: Path | None = None,
    home: Path | None = None,
) -> None:
    """Refuse, before any work, a write target that would touch an input, another target, the current or the home
    folder, or something this tool did not write. Raises UnsafeOutputError or OutputExistsError, one line each."""
    targets = list(targets)
    protected = {_resolved(path): what for path, what in inputs.items()}
    places = {
        _resolved(current_dir or Path.cwd()): "the current folder",
        _resolved(home or Path.home()): "your home folder",
    }
    for target in targets:
        location = target_location(target)
        _refuse_links(target, location, protected)
        for path, what in protected.items():
            _refuse_overlap(target, location, path, what)
        for path, what in places.items():
            if path.is_relative_to(location):  # lying inside the current folder is the usual case
                relation = "is" if path == location else "contains"
                raise UnsafeOutputError(f"{_named(target)}: {relation} {what} ({path}); choose another {target.option}")
        for other in targets:
            if other is not target and other.option != target.option:
                _refuse_overlap(target, location, target_location(other), f"the {other.option} target", other.option)
        _refuse_existing(target, location, force)


def target_location(target: WriteTarget) -> Path:
    """The target as an absolute path with its parent's symlinks resolved: the entry that is created or replaced."""
    path = Path(os.path.abspath(target.path.expanduser()))
    if path.name in ("", ".", ".."):
        raise UnsafeOutputError(f"{_named(target)}: not a name that can be created or replaced; choose another")
    return _resolved(path.parent) / path.name


def _refuse_links(target: WriteTarget, location: Path, protected: dict[Path, str]) -> None:
    """A dangling link is not written through; a link to an input is not replaced as if it were the input."""
    if not location.is_symlink():
        return
    pointee = Path(os.path.realpath(location))
    if not pointee.exists():
        raise UnsafeOutputError(
            f"{_named(target)}: a symbolic link to {pointee}, which does not exist; xatl does not write through it; "
            f"choose another {target.option}"
        )
    for path, what in protected.items():
        if pointee == path or pointee.is_relative_to(path) or path.is_relative_to(pointee):
            raise UnsafeOutputError(
                f"{_named(target)}: a symbolic link to {pointee}, which is or holds {what}; "
                f"choose another {target.option}"
            )


def _refuse_overlap(target: WriteTarget, location: Path, path: Path, what: str, other: str | None = None) -> None:
    if location == path:
        relation = "is"
    elif path.is_relative_to(location):
        relation = "contains"
    elif location.is_relative_to(path):
        relation = "lies inside"
    else:
        return
    raise UnsafeOutputError(f"{_named(target)}: {relation} {what} ({path}); choose another {target.option}")


def _refuse_existing(target: WriteTarget, location: Path, force: bool) -> None:
    """An existing target is replaced only when this tool wrote it (and, for folders, only with --force)."""
    name = _named(target)
    if target.kind in ("report", "new-file"):
        _check_file_folder(target, location)
    if not (location.exists() or location.is_symlink()):
        return
    if target.kind == "new-file":
        raise OutputExistsError(f"{name}: already exists; choose another {target.option}")
    if target.kind == "report":
        if location.is_dir():
            raise UnsafeOutputError(f"{name}: is a folder, not a file; choose a file path for {target.option}")
        if not is_xatl_report(location):
            raise UnsafeOutputError(
                f"{name}: exists and is not a report xatl wrote; xatl replaces only its own reports; "
                f"choose another {target.option}"
            )
        return
    if not location.is_dir():
        raise UnsafeOutputError(f"{name}: exists and is a file, not a folder; choose another {target.option}")
    if target.kind == "checkpoints":
        if _is_empty(location) or (location / PROGRESS_NAME).is_file():
            return  # resuming, or refusing to start over, is the checkpoint folder's own rule
        raise UnsafeOutputError(
            f"{name}: exists and holds files that are not xatl checkpoints; choose another {target.option}"
        )
    if target.kind == "teacher-cache":
        if _is_empty(location) or (location / TEACHER_CACHE_NAME).is_file():
            return  # reused if its key matches the run, else refused: the cache's own rule
        raise UnsafeOutputError(
            f"{name}: exists and is not an xatl teacher cache (no {TEACHER_CACHE_NAME}); choose another {target.option}"
        )
    if not (_is_empty(location) or is_xatl_folder(location)):
        raise UnsafeOutputError(
            f"{name}: exists and was not written by xatl (no {MANIFEST_NAME}); --force replaces only xatl output "
            f"folders; choose another {target.option}"
        )
    if not force:
        raise OutputExistsError(f"{name}: already exists; pass --force to replace it")


def _check_file_folder(target: WriteTarget, location: Path) -> None:
    """A file is written into an existing, writable folder (nothing is created for it), checked before any work."""
    folder, name = location.parent, _named(target)
    if not folder.exists():
        raise OutputWriteError(f"{name}: folder {folder} does not exist; create it or choose another {target.option}")
    if not folder.is_dir():
        raise OutputWriteError(f"{name}: {folder} is a file, not a folder; choose another {target.option}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputWriteError(f"{name}: permission denied ({folder} is not writable); choose another {target.option}")


def is_xatl_folder(folder: Path) -> bool:
    """Whether a folder is an output of this tool (a conversion, a distillation, an export): it has our manifest."""
    return (folder / MANIFEST_NAME).is_file()


def is_xatl_report(path: Path) -> bool:
    """Whether a file is a report this tool wrote, JSON or JUnit XML (read only when it is a small regular file)."""
    try:
        if not path.is_file() or path.is_symlink() or path.stat().st_size > 64 * 1024**2:
            return False
        text = path.read_bytes().decode("utf-8")
        if text.startswith("<?xml"):
            return _is_xatl_junit(text)
        data = json.loads(text)
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict):
        return False
    legacy = {"output", "passed", "checks"} <= data.keys() or {"model", "data", "losses"} <= data.keys()
    return REPORT_KEY in data or legacy


def _is_xatl_junit(text: str) -> bool:
    """A JUnit file is xatl's when a testsuite records the `xatl_report` property (see VerifyReport.to_junit)."""
    import xml.etree.ElementTree as ElementTree

    if "<!DOCTYPE" in text or "<!ENTITY" in text:  # xatl writes neither, so no entity is ever expanded
        return False
    try:
        root = ElementTree.fromstring(text)
    except ElementTree.ParseError:
        return False
    if root.tag != "testsuites":
        return False
    recorded = root.findall(f"./testsuite/properties/property[@name='{REPORT_KEY}']")
    return any(element.get("value") for element in recorded)


def write_report_file(path: str | Path, text: str, option: str = "--json") -> None:
    """Write a report atomically: into a temporary file beside it, renamed over it only if it is still ours."""
    target = WriteTarget(option, Path(path), "report")

    def replace_if_ours(temporary: Path, location: Path) -> None:
        if location.exists() and not is_xatl_report(location):  # appeared while the command ran
            raise UnsafeOutputError(
                f"{_named(target)}: appeared while the command ran and is not an xatl report; it was left as it is"
            )
        os.replace(temporary, location)

    _write_file_atomically(target, text, replace_if_ours)


def write_new_file(path: str | Path, text: str, option: str = "--out") -> None:
    """Write a file that must not exist yet (a scaffolded mapping): staged beside it, renamed without replacing."""
    from xatl_convert.output_folder import rename_without_replacing

    target = WriteTarget(option, Path(path), "new-file")

    def rename_if_new(temporary: Path, location: Path) -> None:
        try:
            rename_without_replacing(temporary, location)
        except FileExistsError:
            raise OutputExistsError(f"{_named(target)}: appeared while the command ran; it was left as it is") from None

    _write_file_atomically(target, text, rename_if_new)


def _write_file_atomically(target: WriteTarget, text: str, move: Callable[[Path, Path], None]) -> None:
    """Write `text` into a temporary file beside the target, then `move` it into place; nothing half-written stays."""
    location = target_location(target)
    temporary = location.parent / f".{location.name}.xatl-partial-{os.getpid()}"
    try:
        temporary.write_text(text)
        move(temporary, location)
    except OSError as error:
        raise OutputWriteError(f"{_named(target)}: cannot write it ({error.strerror or error})") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


def storage_root(folder: Path) -> Path:
    """The resolved checkpoint folder, or for a folder in a Hub snapshot (models--ORG--NAME/snapshots/<sha>[/sub])
    the repo's cache folder: a snapshot's files are links into ../../blobs, so its bytes live in the whole repo folder.
    """
    resolved = Path(folder).resolve()
    for ancestor in (resolved, *resolved.parents):
        if ancestor.parent.name == "snapshots" and ancestor.parent.parent.name.startswith("models--"):
            return ancestor.parent.parent
    return resolved


def _recorded_source(folder: Path) -> dict[Path, str]:
    """An xatl folder's recorded source (a local path in its manifest), which verify and training read too."""
    manifest = folder / MANIFEST_NAME
    try:
        if not manifest.is_file() or manifest.stat().st_size > 64 * 1024**2:
            return {}
        source = json.loads(manifest.read_bytes()).get("source", {})
        recorded = Path(source["path"]) if isinstance(source, dict) and isinstance(source.get("path"), str) else None
    except (OSError, ValueError, AttributeError):
        return {}
    if recorded is None or not recorded.is_absolute() or not recorded.exists():
        return {}
    return {_absolute(recorded): f"the source recorded in {manifest}"}


def _is_empty(folder: Path) -> bool:
    try:
        return not any(folder.iterdir())
    except OSError:
        return False


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path.expanduser()))


def _resolved(path: Path) -> Path:
    return Path(os.path.realpath(path.expanduser()))


def _named(target: WriteTarget) -> str:
    return f"{target.option} {target.path}"
