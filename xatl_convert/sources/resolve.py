"""Turn what the user typed (a local folder, for now) into an opened SourceCheckpoint."""

from __future__ import annotations

from pathlib import Path

from xatl_convert.errors import SourceError
from xatl_convert.sources.checkpoint import SourceCheckpoint, open_checkpoint


def resolve_source(reference: str | Path) -> SourceCheckpoint:
    """Open a source given as a local checkpoint folder.

    Hub ids and aliases arrive with a later version; until then a reference that is not a folder is an error
    that says so.
    """
    path = Path(reference).expanduser()
    if path.exists():
        return open_checkpoint(path, reference=str(reference))
    raise SourceError(f"{reference}: no such local checkpoint folder")
