"""Reading the JSON files around a checkpoint (config, shard index, manifest) with one-line errors.

Every failure names the file (with line:column for a syntax error) and ends with what to do, as the caller words it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from xatl_convert.errors import XatlError, first_line


def json_type(value: object) -> str:
    """The JSON name of a parsed value's type, for messages ("a list", "null")."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def read_json(path: Path, error_type: type[XatlError], remedy: str, expect_object: bool = False) -> Any:
    """Parse a UTF-8 JSON file; a missing, unreadable, non-UTF-8, malformed or (optionally) non-object file raises
    `error_type` with one line that names it and ends in `remedy`."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise error_type(f"{path}: missing; {remedy}") from None
    except OSError as error:
        reason = error.strerror or first_line(error)
        raise error_type(f"{path}: cannot read it ({reason}); check that you may read it, and the disk") from None
    except UnicodeDecodeError as error:
        byte = error.object[error.start]
        raise error_type(f"{path}: not UTF-8 text (byte {error.start} is 0x{byte:02x}); {remedy}") from None
    if not text.strip():
        raise error_type(f"{path}: the file is empty; {remedy}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise error_type(f"{path}:{error.lineno}:{error.colno}: invalid JSON: {error.msg}; {remedy}") from None
    except RecursionError:
        raise error_type(f"{path}: invalid JSON: nested too deeply; {remedy}") from None
    if expect_object and not isinstance(data, dict):
        raise error_type(f"{path}: expected a JSON object, got {json_type(data)}; {remedy}")
    return data
