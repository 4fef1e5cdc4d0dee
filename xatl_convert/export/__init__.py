"""Export a converted (or trained) xatl folder to a format that engines load natively (issue 13).

One writer for every format: each format module says whether the xatl config fits it (every reason it does not,
so nothing is written that computes something else), gives the format's config.json, and renames (and where a
layout differs, reorders) each tensor. The tokenizer, manifest and model card come along, so training can still
freeze by manifest.
"""

from __future__ import annotations

from xatl_convert.export.writer import FORMATS, ExportError, check_format, export_folder

__all__ = ["FORMATS", "ExportError", "check_format", "export_folder"]
