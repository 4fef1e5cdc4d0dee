"""What every bad-input case asserts: one `error: …` line on stderr, the exit code, no traceback, nothing lost.

Shared by the `test_bad_input_*.py` files. A case runs the CLI in-process (CliRunner) unless it needs a real
process (signals, ulimit), and checks the user's files byte for byte before and after.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from typer.testing import CliRunner

from xatl_convert.cli import app

runner = CliRunner()

BAD_INPUT = 2  # exit code for input the user can fix
CHECK_FAILED = 1  # exit code when verify ran and a check failed


def invoke(*arguments: str | Path, env: dict[str, str] | None = None):
    """Run `xatl ARGUMENTS` in-process, with a wide terminal so that lines are not wrapped."""
    return runner.invoke(app, [str(argument) for argument in arguments], env=env, terminal_width=400, prog_name="xatl")


def error_line(result, exit_code: int = BAD_INPUT) -> str:
    """The single line on stderr, checked: the exit code, `error: ` prefix, no traceback, nothing else printed."""
    assert result.exit_code == exit_code, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output + result.stderr
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` (symlinks as their target text) with a hash of its bytes: 'unchanged' means equal."""
    digest: dict[str, str] = {}
    if not folder.exists() and not folder.is_symlink():
        return digest
    if folder.is_file() or folder.is_symlink():
        return {folder.name: _entry_digest(folder)}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink() or path.is_file():
            digest[str(path.relative_to(folder))] = _entry_digest(path)
        elif path.is_dir():
            digest[str(path.relative_to(folder)) + "/"] = "dir"
    return digest


def _entry_digest(path: Path) -> str:
    if path.is_symlink():
        return "link:" + str(path.readlink())
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(folder: Path) -> list[str]:
    """Temporary files of a conversion (staging folders, retired outputs, locks) left beside an output."""
    return sorted(path.name for path in folder.iterdir() if ".xatl-" in path.name)
