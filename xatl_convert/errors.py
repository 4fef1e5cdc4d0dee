"""Typed errors that the CLI turns into one clear line.

Each message names the file, YAML line or tensor at fault and, where possible, what to do next.
"""

from __future__ import annotations


class XatlError(Exception):
    """Base class for every error a user can cause; the CLI prints it without a traceback."""

    exit_code = 2


class SourceError(XatlError):
    """The source checkpoint cannot be found, read or understood."""


class UnsupportedModelError(SourceError):
    """No built-in mapping exists for the source's model_type and the requested target."""


class MappingError(XatlError):
    """A mapping file is malformed: bad YAML, unknown key, wrong type, or a bad expression."""


class PlanError(XatlError):
    """The mapping does not fit the source and target: missing coverage or mismatched shapes."""


class OutputExistsError(XatlError):
    """The output folder exists and --force was not given."""


class UnsafeOutputError(XatlError):
    """OUT is, contains or lies inside something the conversion must not touch (the source, the current folder)."""


class OutputWriteError(XatlError):
    """The output cannot be written: no space, no permission, a file where a folder should be."""


class OutputError(XatlError):
    """A converted folder cannot be checked: its config, weights or tokenizer are missing, damaged or inconsistent."""


class ManifestError(OutputError):
    """xatl_manifest.json is unreadable, not JSON, or lacks or mistypes what verify and training rely on."""


class ReportError(XatlError):
    """The verify report cannot be written where --json asks."""


def first_line(error: BaseException) -> str:
    """The first non-empty line of an error's text (or its type's name): messages must stay on one line."""
    for line in str(error).splitlines():
        if line.strip():
            return line.strip()
    return type(error).__name__
