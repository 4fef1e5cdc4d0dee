"""`xatl verify` on an exported folder: its tensors against the xatl folder it came from (bit for bit, through the
format's own renaming), and its logits, computed by transformers' own class with no remote code, against the xatl
model's on the same text."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from xatl_convert.errors import OutputError
from xatl_convert.export.writer import FORMATS, ExportedTensors, mapped_shards, xatl_weights
from xatl_convert.json_files import json_type
from xatl_convert.verify.report import CheckResult, VerifyReport

LOGIT_BOUND = 1e-5


def is_export(folder: Path) -> bool:
    """Whether the folder holds an export: its manifest has the `export` record that `xatl export` writes (mamba-ssm's
    config.json has no model_type to tell it by). A malformed record counts: `verify_export` says what is wrong."""
    from xatl_convert.manifest import MANIFEST_NAME

    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "export" in manifest


def verify_export(folder: Path, text: str | Path | None = None, max_tokens: int = 256) -> VerifyReport:
    """Two checks: "tensors as exported" and "logits = xatl model" (relative ≤ 1e-5, float32)."""
    from transformers import AutoModelForCausalLM

    from xatl_convert.manifest import read_manifest
    from xatl_convert.verify.checks import read_output_config, sample_input_ids
    from xatl_convert.verify.streaming import relative_error

    origin, module = _export_record(folder, read_manifest(folder))
    if not (origin / "config.json").is_file():
        raise OutputError(f"{folder}: exported from {origin}, which is gone; verify needs that xatl folder")
    config = read_output_config(origin)
    report = VerifyReport(output=str(folder), source=str(origin))
    found = ExportedTensors(folder)
    expected: set[str] = set()
    differ: list[str] = []
    with xatl_weights(origin) as weights:
        for _, tensors in mapped_shards(weights, module, config.to_dict()):  # one xatl shard in memory at a time
            for name, value in tensors.items():
                expected.add(name)
                if name not in found.files or not torch.equal(found.read(name), value):
                    differ.append(name)
    differ.sort()
    extra = sorted(set(found.files) - expected)
    status = "pass" if not differ and not extra else "fail"
    value = f"{len(expected) - len(differ)}/{len(expected)} equal" + (f", {len(extra)} unexpected" if extra else "")
    report.checks.append(CheckResult("tensors as exported", status, value, "bit-for-bit from the xatl folder",
                                     {"differ": differ[:20], "unexpected": extra[:20]}))  # fmt: skip
    ids = sample_input_ids(origin, config, text, max_tokens)
    report.sample = {"tokens": int(ids.shape[1]), "text": str(text) if text is not None else "built-in"}
    logits_check = f"logits = xatl model ({module.NAME}, no remote code)"
    if module.NAME == "mamba-ssm":  # not a transformers class; its kernels need CUDA
        report.checks.append(CheckResult(logits_check, "skip", "mamba-ssm runs on CUDA only",
                                         "benchmarks/gpu_check.sh compares it there"))  # fmt: skip
        return report
    logits: dict[str, Any] = {}
    for name, path, remote in (("xatl", origin, True), (module.NAME, folder, False)):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=remote).eval()
        with torch.no_grad():
            logits[name] = model(ids, use_cache=False).logits
        del model
    error = relative_error(logits[module.NAME], logits["xatl"])
    report.checks.append(CheckResult(logits_check,
                                     "pass" if error <= LOGIT_BOUND else "fail", f"{error:.1e}",
                                     f"relative ≤ {LOGIT_BOUND:g}", {"relative_error": error}))  # fmt: skip
    return report


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
