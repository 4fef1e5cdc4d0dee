"""Refusing an input that is not a regular file, before anything opens it.

Opening a FIFO for reading blocks until some other process writes to it, and a character device (/dev/zero,
/dev/urandom) never ends: either would hang a command that meant to read a text, mapping, data or weights file. So
every input file is checked with `os.stat` (which follows links and never blocks) first, and anything else is one
error line that names it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from xatl_convert.errors import XatlError

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def file_kind(mode: int) -> str:
    """What a file mode is, in words ("a FIFO", "a character device", ...), for messages."""
    return next((kind for test, kind in _KINDS if test(mode)), "not a file")


def require_regular_file(path: str | Path, error_type: type[XatlError], remedy: str, name: str | None = None) -> None:
    """Raise `error_type` with one line (`NAME: not a regular file (a FIFO); REMEDY`) unless `path` is a regular file
    or a link to one; a path that is missing or cannot be examined raises too. `name` is how the message names the
    file (default: the path)."""
    name = name or str(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise error_type(f"{name}: no such file; {remedy}") from None
    except (OSError, ValueError) as error:  # ValueError: a NUL in the path
        reason = getattr(error, "strerror", None) or str(error)
        raise error_type(f"{name}: cannot read it ({reason}); check that it exists and that you may read it") from None
    if not stat.S_ISREG(mode):
        raise error_type(f"{name}: not a regular file ({file_kind(mode)}); {remedy}")
