"""One row per check and the JSON report that CI reads."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from xatl_convert.errors import ReportError

Status = Literal["pass", "fail", "skip"]


@dataclass(frozen=True)
class CheckResult:
    """A verify check: what was measured, against which bound, and whether it held."""

    name: str
    status: Status
    value: str
    bound: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class VerifyReport:
    """All checks of one verify run; it passes when no check fails."""

    output: str
    source: str | None
    checks: list[CheckResult] = field(default_factory=list)
    sample: dict[str, Any] = field(default_factory=dict)  # what was scored: tokens, and the text file or "built-in"

    @property
    def passed(self) -> bool:
        return all(check.status != "fail" for check in self.checks)

    def check(self, name: str) -> CheckResult:
        return next(check for check in self.checks if check.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "source": self.source,
            "passed": self.passed,
            "sample": self.sample,
            "checks": [asdict(check) for check in self.checks],
        }

    def write_json(self, path: str | Path) -> None:
        """Write the report for CI; an unwritable path is a ReportError naming it and the OS reason."""
        text = json.dumps(self.to_dict(), indent=2, default=_json_number) + "\n"
        try:
            Path(path).write_text(text)
        except OSError as error:
            raise ReportError(f"{path}: cannot write the verify report ({_reason(error)}); {_CHOOSE}") from None


_CHOOSE = "choose a writable file path for --json"


def check_report_destination(path: str | Path) -> Path:
    """Refuse an unwritable --json path before the checks run, not after minutes of forward passes.

    Nothing is created: the folder must exist, and the file (or, when new, its folder) must be writable.
    """
    path = Path(path)
    if path.is_dir():
        raise ReportError(f"{path}: is a folder, not a file; {_CHOOSE}, e.g. {path / 'verify.json'}")
    folder = path.parent
    if not folder.exists():
        raise ReportError(f"{path}: folder {folder} does not exist; create it or {_CHOOSE}")
    if not folder.is_dir():
        raise ReportError(f"{path}: {folder} is a file, not a folder; {_CHOOSE}")
    writable = os.access(path, os.W_OK) if path.exists() else os.access(folder, os.W_OK | os.X_OK)
    if not writable:
        where = path if path.exists() else folder
        raise ReportError(f"{path}: permission denied ({where} is not writable); {_CHOOSE}")
    return path


def _reason(error: OSError) -> str:
    return error.strerror or str(error)


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return float(value)
