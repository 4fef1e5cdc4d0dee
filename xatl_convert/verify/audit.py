"""The two tensor checks of verify, made while the converted model streams: each output tensor is checked the
first time it is read (finite; where transferred, bit-equal to its sources after the recorded transform).

The converted pass reads every tensor anyway; checking there saves two more passes over the output's files and
one over the source's, which on a 7B model is tens of gigabytes of reading. `finish()` reads what the pass did
not (with `--layers N`, the later blocks), so both checks always cover every tensor.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from xatl_convert.errors import SourceError, first_line
from xatl_convert.sources import SourceCheckpoint
from xatl_convert.transforms import parse_transform
from xatl_convert.verify.report import CheckResult
from xatl_convert.writer import all_finite

PLANNED, EXACT = "tensors as planned", "transfers exact"
LISTED = 20  # problems listed in the report, per check


class TensorAudit:
    """A tensor reader over the converted folder that checks each tensor on its first read."""

    def __init__(self, manifest: dict[str, Any], tensors: SourceCheckpoint, source: SourceCheckpoint | None) -> None:
        self.entries: dict[str, Any] = manifest["tensors"]
        self.tensors = tensors
        self.source = source
        self.planned_problems: dict[str, str] = {}  # by tensor name, so the report keeps the manifest's order
        self.exact_problems: dict[str, str] = {}
        self.mismatched: dict[str, str] = {}
        self.pieces = 0
        self._seen: set[str] = set()
        self._check_headers()

    def _check_headers(self) -> None:
        """Presence, shape and dtype, from the safetensors headers alone."""
        for name, entry in self.entries.items():
            info = self.tensors.tensors.get(name)
            if info is None:
                self.planned_problems[name] = f"{name}: missing"
            elif list(info.shape) != entry["shape"] or str(info.dtype).removeprefix("torch.") != entry["dtype"]:
                self.planned_problems[name] = (
                    f"{name}: {list(info.shape)} {info.dtype}, planned {entry['shape']} {entry['dtype']}"
                )
        for name in sorted(set(self.tensors.tensors) - set(self.entries)):
            self.planned_problems[name] = f"{name}: not in the plan"

    def __call__(self, name: str) -> torch.Tensor:
        tensor = self.tensors.read(name)
        if name not in self._seen:
            self._seen.add(name)
            self._audit(name, tensor)
        return tensor

    def prefetch(self, names: Iterable[str]) -> None:
        """Start reading these output tensors and, for the comparison, the source tensors they came from."""
        names = list(names)
        self.tensors.prefetch(names)
        if self.source is not None:
            self.source.prefetch(source for name in names for source in _sources(self.entries.get(name)))

    def finish(self) -> None:
        """Check every tensor the streamed passes did not read."""
        for name in self.entries:
            if name not in self._seen and name in self.tensors.tensors:
                self(name)

    def _audit(self, name: str, tensor: torch.Tensor) -> None:
        entry = self.entries.get(name)
        if entry is None:
            return
        if name not in self.planned_problems and tensor.is_floating_point() and not all_finite(tensor):
            self.planned_problems[name] = f"{name}: non-finite values"
        if self.source is not None:
            self._compare_with_source(name, entry, tensor)

    def _compare_with_source(self, name: str, entry: dict[str, Any], tensor: torch.Tensor) -> None:
        """A piece that cannot be recomputed (its source tensor is gone, or no longer fits the transform) fails the
        check by name rather than stopping verify: it is what a user swapping or editing a source needs to see."""
        assert self.source is not None
        pieces = [(None, entry)] if entry["status"] == "transferred" else []
        pieces += [(tuple(part["rows"]), part) for part in entry.get("parts", [])]
        for rows, piece in pieces:
            self.pieces += 1
            label = name if rows is None else f"{name}[{piece['part']}]"
            try:
                expected = parse_transform(piece["transform"]).apply([self.source.read(s) for s in piece["sources"]])
            except SourceError as error:  # the recorded source tensor is absent or unreadable
                self.exact_problems[label] = f"{label}: {error}"
                continue
            except (RuntimeError, IndexError) as error:  # torch: the source tensor no longer fits the transform
                self.exact_problems[label] = (
                    f"{label}: cannot apply {piece['transform']} to the source: {first_line(error)}"
                )
                continue
            actual = tensor if rows is None else tensor[rows[0] : rows[1]]
            if not torch.equal(expected.to(actual.dtype), actual):
                self.mismatched[label] = label

    def planned_result(self) -> CheckResult:
        """(a) Every planned tensor is present with its planned shape and dtype, and every value is finite."""
        problems = list(self.planned_problems.values())
        return CheckResult(
            name=PLANNED,
            status="fail" if problems else "pass",
            value=f"{len(self.entries) - len(problems)}/{len(self.entries)} ok",
            bound="all present, planned shape and dtype, finite",
            details={"problems": problems[:LISTED]},
        )

    def exact_result(self) -> CheckResult:
        """(b) Every transferred tensor (and transferred row block) equals its sources after the recorded transform,
        bit for bit. A planned piece whose tensor is missing from the output counts as a problem."""
        missing = [
            f"{label}: missing from the output"
            for name, entry in self.entries.items()
            if name not in self.tensors.tensors
            for label in _labels(name, entry)
        ]
        problems = missing + list(self.exact_problems.values())
        mismatched = list(self.mismatched)
        checked = self.pieces + len(missing)
        failed = len(mismatched) + len(problems)
        return CheckResult(
            name=EXACT,
            status="fail" if failed else "pass",
            value=f"{checked - failed}/{checked} equal",
            bound="bit-for-bit",
            details={"mismatched": mismatched[:LISTED], "problems": problems[:LISTED]},
        )


def _sources(entry: dict[str, Any] | None) -> list[str]:
    if entry is None:
        return []
    return [*entry.get("sources", []), *(name for part in entry.get("parts", []) for name in part["sources"])]


def _labels(name: str, entry: dict[str, Any]) -> list[str]:
    labels = [name] if entry["status"] == "transferred" else []
    return labels + [f"{name}[{part['part']}]" for part in entry.get("parts", [])]
