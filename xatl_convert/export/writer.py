"""The one export writer: check the format fits, then write its config, renamed tensors, tokenizer, manifest and
card into a staged folder that appears at OUT only when complete."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from xatl_convert.errors import XatlError
from xatl_convert.export import bamba, granitemoehybrid, mamba_ssm

# Each format module: NAME, LOADS_WITH, refusals(config) -> [reason], target_config(config),
# tensors(name, value, config), and optionally fuse(state, config) (tensors that several xatl tensors make) and
# WEIGHTS_FILE (default safetensors).
FORMATS: dict[str, ModuleType] = {module.NAME: module for module in (granitemoehybrid, bamba, mamba_ssm)}
SAFETENSORS = "model.safetensors"
_CARRIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
            "tokenizer.model", "generation_config.json", "chat_template.jinja", "README.md")  # fmt: skip


class ExportError(XatlError):
    """The folder cannot be exported to the format without computing something else; says every reason."""


def check_format(format: str, config: dict[str, Any], where: str | Path) -> ModuleType:
    """The format's module, if the xatl config (as a dict) fits it exactly; else one ExportError with every reason."""
    if format not in FORMATS:
        raise ExportError(f"--format {format!r}: unknown (known: {', '.join(FORMATS)})")
    module = FORMATS[format]
    reasons = module.refusals(config)
    if reasons:
        raise ExportError(f"{where}: cannot be exported as {format} without changing what it computes: "
                          + "; ".join(reasons))  # fmt: skip
    return module


def export_folder(folder: str | Path, out: str | Path, format: str, force: bool = False) -> list[str]:
    """Write FOLDER (an xatl output) to OUT in `format`; returns the names of the tensors written."""
    from safetensors import safe_open

    from xatl_convert.manifest import MANIFEST_NAME, read_manifest
    from xatl_convert.output_folder import staged_output
    from xatl_convert.verify.checks import read_output_config
    from xatl_convert.writer import save_shard

    folder = Path(folder)
    if format not in FORMATS:  # before reading anything
        raise ExportError(f"--format {format!r}: unknown (known: {', '.join(FORMATS)})")
    config = read_output_config(folder).to_dict()
    module = check_format(format, config, folder)
    manifest = read_manifest(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{folder}: no .safetensors weights to export")
    tensors: dict[str, Any] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118  (safe_open is not a mapping)
                for renamed, value in module.tensors(name, handle.get_tensor(name), config):
                    tensors[renamed] = value.contiguous()
    with staged_output(out, force, needed_bytes=sum(file.stat().st_size for file in files)) as staging:
        if hasattr(module, "fuse"):
            tensors = module.fuse(tensors, config)
        weights = getattr(module, "WEIGHTS_FILE", SAFETENSORS)
        if weights == SAFETENSORS:
            save_shard(tensors, staging / weights)
        else:  # mamba-ssm's from_pretrained reads pytorch_model.bin (plain tensors: loads with weights_only=True)
            torch.save(tensors, staging / weights)
        target = module.target_config(config)
        (staging / "config.json").write_text(json.dumps(target, indent=2) + "\n")
        for name in _CARRIED:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, staging / name)
        if not target.get("use_cache", True):  # generate() reads its own config: without a cache it runs
            generation = staging / "generation_config.json"
            settings = json.loads(generation.read_text()) if generation.is_file() else {}
            generation.write_text(json.dumps({**settings, "use_cache": False}, indent=2) + "\n")
        manifest["export"] = {"format": format, "from": str(folder)}
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return sorted(tensors)


def exported_tensors(folder: Path, module: ModuleType) -> dict[str, torch.Tensor]:
    """The tensors an export holds, from its weights file."""
    from safetensors.torch import load_file

    weights = folder / getattr(module, "WEIGHTS_FILE", SAFETENSORS)
    if weights.name == SAFETENSORS:
        return load_file(weights)
    return torch.load(weights, weights_only=True, map_location="cpu")
