"""`xatl verify` on an exported folder: its tensors against the xatl folder it came from (bit for bit, through the
format's own renaming), and its logits, computed by transformers' own class with no remote code, against the xatl
model's on the same text."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from xatl_convert.errors import OutputError
from xatl_convert.export.writer import FORMATS, ExportedTensors, mapped_shards, xatl_weights
from xatl_convert.json_files import json_type
from xatl_convert.verify.export_logits import check_export_logits, check_name
from xatl_convert.verify.passes import Progress, Run
from xatl_convert.verify.report import CheckResult, VerifyReport


def is_export(folder: Path) -> bool:
    """Whether the folder holds an export: its manifest has the `export` record that `xatl export` writes (mamba-ssm's
    config.json has no model_type to tell it by). A malformed record counts: `verify_export` says what is wrong."""
    from xatl_convert.manifest import MANIFEST_NAME

    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "export" in manifest


def verify_export(
    folder: Path,
    text: str | Path | None = None,
    max_tokens: int | None = None,
    dtype: torch.dtype = torch.float32,
    progress: Progress | None = None,
) -> VerifyReport:
    """Two checks: "tensors as exported" (bit for bit) and "logits = xatl model": the export in transformers' own
    class against the xatl model, both streamed block by block, in `dtype` (float32 or float64), on the CPU's
    reference paths, over the first `max_tokens` tokens (default 1024: the rounding bound is measured there)."""
    from xatl_convert.manifest import read_manifest
    from xatl_convert.verify.checks import EXPORT_SAMPLE_TOKENS, read_output_config, sample_input_ids

    max_tokens = EXPORT_SAMPLE_TOKENS if max_tokens is None else max_tokens
    manifest = read_manifest(folder)
    origin, module = _export_record(folder, manifest)
    if not (origin / "config.json").is_file():
        raise OutputError(f"{folder}: exported from {origin}, which is gone; verify needs that xatl folder")
    if module.NAME == "gguf":  # one llama.cpp file: its own checks (xatl_convert/export/gguf_verify.py)
        from xatl_convert.export.gguf_verify import verify_gguf_export

        return verify_gguf_export(folder, origin, manifest["export"], text, max_tokens)
    config = read_output_config(origin)
    report = VerifyReport(output=str(folder), source=str(origin))
    report.checks.append(_tensors_as_exported(folder, origin, module, config.to_dict()))
    ids = sample_input_ids(origin, config, text, max_tokens)
    report.sample = {"tokens": int(ids.shape[1]), "text": str(text) if text is not None else "built-in"}
    if module.NAME == "mamba-ssm":  # not a transformers class; its kernels need CUDA
        report.checks.append(CheckResult(check_name(module.NAME), "skip", "mamba-ssm runs on CUDA only",
                                         "benchmarks/gpu_check.sh compares it there"))  # fmt: skip
        return report
    run = Run(config, ids, dtype, torch.device("cpu"), None, progress)  # the CPU paths the bound was measured on
    with xatl_weights(origin) as weights:
        report.checks.append(check_export_logits(run, weights, folder, module.NAME))
    return report


def _tensors_as_exported(folder: Path, origin: Path, module: ModuleType, config: dict[str, Any]) -> CheckResult:
    """Every tensor the format makes from the xatl folder, equal bit for bit to the export's, and no other. Its own
    function, so that the last xatl shard it holds is freed before the logits are streamed."""
    found = ExportedTensors(folder)
    expected: set[str] = set()
    differ: list[str] = []
    with xatl_weights(origin) as weights:
        for _, tensors in mapped_shards(weights, module, config):  # one xatl shard in memory at a time
            for name, value in tensors.items():
                expected.add(name)
                if name not in found.files or not torch.equal(found.read(name), value):
                    differ.append(name)
    return tensors_as_exported(expected, differ, found.files, "bit-for-bit from the xatl folder")


def tensors_as_exported(
    expected: set[str],
    differ: list[str],
    stored: Iterable[str],
    bound: str,
    details: dict[str, Any] | None = None,
    within_bound: bool = True,
) -> CheckResult:
    """The "tensors as exported" row of every format: how many expected tensors are equal, which differ, and which
    the export holds that the xatl folder does not make."""
    extra = sorted(set(stored) - expected)
    status = "pass" if not differ and not extra and within_bound else "fail"
    value = f"{len(expected) - len(differ)}/{len(expected)} equal" + (f", {len(extra)} unexpected" if extra else "")
    return CheckResult("tensors as exported", status, value, bound,
                       {"differ": sorted(differ)[:20], "unexpected": extra[:20], **(details or {})})  # fmt: skip


def _export_record(folder: Path, manifest: dict[str, Any]) -> tuple[Path, ModuleType]:
    """The xatl folder an export came from and its format's module, from the manifest's `export` record."""
    from xatl_convert.manifest import MANIFEST_NAME

    where = f"{folder / MANIFEST_NAME}: its export record"
    record = manifest.get("export")
    if not isinstance(record, dict):
        raise OutputError(f"{where} is {json_type(record)}, not an object with format and from; export again")
    if not isinstance(record.get("from"), str) or not record["from"]:
        raise OutputError(f'{where} has no "from" (the xatl folder it was exported from); export again')
    format = record.get("format")
    if not isinstance(format, str) or format not in FORMATS:
        raise OutputError(
            f"{where} names format {format!r}, which xatl does not export (known: {', '.join(FORMATS)}); export again"
        )
    return Path(record["from"]), FORMATS[format]
