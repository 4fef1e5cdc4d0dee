"""One row per check and the JSON report that CI reads."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from xatl_convert.write_guard import REPORT_KEY

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

    def to_json(self) -> str:
        """The report as CI reads it, marked as an xatl report (so that a later run may replace the file)."""
        return json.dumps({REPORT_KEY: "verify", **self.to_dict()}, indent=2, default=_json_number) + "\n"


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return float(value)
