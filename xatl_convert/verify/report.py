"""One row per check, and the JSON and JUnit XML reports that CI reads."""

from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from xatl_convert.write_guard import report_marks

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
        data = {**report_marks("verify"), **self.to_dict()}
        return json.dumps(data, indent=2, default=_json_number) + "\n"

    def to_junit(self, seconds: float = 0.0) -> str:
        """The report as JUnit XML for CI test reporters (GitLab, Jenkins, GitHub): one testcase per check.

        A failed check is a `<failure>` whose message carries the measured value and the bound, with the check's
        details (per-layer errors, mismatched tensors) as its text; a skipped check is `<skipped>` with the reason.
        The testsuite's `xatl_report` property marks the file as xatl's, so that a later run may replace it.
        `seconds` is the run's wall time (the checks are not timed one by one).
        """
        failures = sum(check.status == "fail" for check in self.checks)
        totals = {"tests": str(len(self.checks)), "failures": str(failures), "errors": "0", "time": f"{seconds:.3f}"}
        skipped = str(sum(check.status == "skip" for check in self.checks))
        root = ElementTree.Element("testsuites", totals)
        name = _xml_text(f"xatl verify {self.output}")
        suite = ElementTree.SubElement(root, "testsuite", {"name": name, **totals, "skipped": skipped})
        properties = ElementTree.SubElement(suite, "properties")
        recorded = {**report_marks("verify"), "output": self.output}
        recorded.update({"source": self.source} if self.source is not None else {})
        recorded.update({f"sample.{key}": str(value) for key, value in self.sample.items()})
        for name, value in recorded.items():
            ElementTree.SubElement(properties, "property", {"name": name, "value": _xml_text(value)})
        for check in self.checks:
            case = ElementTree.SubElement(
                suite, "testcase", {"classname": "xatl.verify", "name": _xml_text(check.name)}
            )
            if check.status == "fail":
                message = f"{check.name}: measured {check.value}; bound {check.bound}"
                failure = ElementTree.SubElement(
                    case, "failure", {"message": _xml_text(message), "type": "CheckFailed"}
                )
                failure.text = _xml_text(json.dumps(check.details, indent=2, default=_json_number))
            elif check.status == "skip":
                ElementTree.SubElement(case, "skipped", {"message": _xml_text(check.value)})
            else:
                output = ElementTree.SubElement(case, "system-out")
                output.text = _xml_text(f"measured {check.value}; bound {check.bound}")
        ElementTree.indent(root)
        return '<?xml version="1.0" encoding="UTF-8"?>\n' + ElementTree.tostring(root, encoding="unicode") + "\n"


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return float(value)


# Characters XML 1.0 cannot hold at all, even escaped (a path or a message may carry one).
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _xml_text(text: str) -> str:
    return _NOT_XML.sub("\ufffd", text)
