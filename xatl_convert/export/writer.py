"""The one export writer: check the format fits, then write its config, renamed tensors, tokenizer, manifest and
card into a staged folder that appears at OUT only when complete."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from xatl_convert.errors import XatlError
from xatl_convert.export import bamba, granitemoehybrid, mamba_ssm

# Each format module: NAME, LOADS_WITH, refusals(config) -> [reason], target_config(config),
# tensors(name, value, config), and optionally fuse(state, config) with WEIGHTS_FILE (tensors that several xatl
# tensors make, all in one file; otherwise the export keeps the xatl folder's safetensors shards).
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


def mapped_shards(
    folder: Path, module: ModuleType, config: dict[str, Any]
) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """(file name, the format's tensors) for each weights file of the xatl folder, one file in memory at a time; a
    format that joins tensors across files (mamba-ssm's fused in_proj, one .bin) gets them all at once."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{folder}: no .safetensors weights to export")
    gathered: dict[str, torch.Tensor] = {}
    for file in files:
        mapped: dict[str, torch.Tensor] = {}
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118  (safe_open is not a mapping)
                for renamed, value in module.tensors(name, handle.get_tensor(name), config):
                    mapped[renamed] = value.contiguous()
        if hasattr(module, "fuse"):
            gathered.update(mapped)
        else:
            yield file.name, mapped
    if hasattr(module, "fuse"):
        yield module.WEIGHTS_FILE, module.fuse(gathered, config)


def export_folder(folder: str | Path, out: str | Path, format: str, force: bool = False) -> list[str]:
    """Write FOLDER (an xatl output) to OUT in `format`, shard by shard as FOLDER holds them; returns the names of
    the tensors written."""
    from xatl_convert.manifest import MANIFEST_NAME, read_manifest
    from xatl_convert.output_folder import staged_output
    from xatl_convert.verify.checks import read_output_config
    from xatl_convert.writer import SHARD_INDEX_NAME, save_shard

    folder = Path(folder)
    if format not in FORMATS:  # before reading anything
        raise ExportError(f"--format {format!r}: unknown (known: {', '.join(FORMATS)})")
    config = read_output_config(folder).to_dict()
    module = check_format(format, config, folder)
    manifest = read_manifest(folder)
    needed = sum(file.stat().st_size for file in folder.glob("*.safetensors"))
    weight_map: dict[str, str] = {}
    with staged_output(out, force, needed_bytes=needed) as staging:
        for file_name, tensors in mapped_shards(folder, module, config):
            if file_name.endswith(".safetensors"):
                save_shard(tensors, staging / file_name)
            else:  # mamba-ssm's from_pretrained reads pytorch_model.bin (plain tensors: loads with weights_only=True)
                torch.save(tensors, staging / file_name)
            weight_map.update(dict.fromkeys(tensors, file_name))
        if len(set(weight_map.values())) > 1:
            index = {"metadata": {"total_size": needed}, "weight_map": dict(sorted(weight_map.items()))}
            (staging / SHARD_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
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
    return sorted(weight_map)


class ExportedTensors:
    """The tensors an export holds (through its shard index, its one safetensors file, or its .bin, memory-mapped),
    read one at a time."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        from xatl_convert.writer import SHARD_INDEX_NAME

        self._state: dict[str, torch.Tensor] | None = None
        if (folder / SHARD_INDEX_NAME).is_file():
            weight_map = json.loads((folder / SHARD_INDEX_NAME).read_text())["weight_map"]
            self.files = {name: folder / file for name, file in weight_map.items()}
        elif (folder / SAFETENSORS).is_file():
            with safe_open(str(folder / SAFETENSORS), framework="pt") as handle:
                self.files = dict.fromkeys(handle.keys(), folder / SAFETENSORS)
        else:
            weights = folder / mamba_ssm.WEIGHTS_FILE
            self._state = torch.load(weights, weights_only=True, map_location="cpu", mmap=True)
            self.files = dict.fromkeys(self._state, weights)

    def read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if self._state is not None:
            return self._state[name]
        with safe_open(str(self.files[name]), framework="pt") as handle:
            return handle.get_tensor(name)
