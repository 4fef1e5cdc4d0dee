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

from xatl_convert.errors import OutputError, SourceError, XatlError
from xatl_convert.export import bamba, gguf, granitemoehybrid, mamba_ssm, qwen3_next
from xatl_convert.models.mixers_xatl import formats_refusing
from xatl_convert.sources.checkpoint import TOKENIZER_FILES, SourceCheckpoint, open_written_weights

# Each format module: NAME, LOADS_WITH, refusals(config) -> [reason], target_config(config),
# tensors(name, value, config), and optionally fuse(state, config) with WEIGHTS_FILE (tensors that several xatl
# tensors make, all in one file; otherwise the export keeps the xatl folder's safetensors shards). gguf writes one
# file of its own (`_export_gguf`).
FORMATS: dict[str, ModuleType] = {
    module.NAME: module for module in (granitemoehybrid, bamba, mamba_ssm, gguf, qwen3_next)
}
_CARRIED = (*TOKENIZER_FILES, "README.md")  # what a conversion copies from its source, and the card


_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")


class ExportError(XatlError):
    """The folder cannot be exported to the format without computing something else; says every reason."""


def check_format(format: str, config: dict[str, Any], where: str | Path) -> ModuleType:
    """The format's module, if the xatl config (as a dict) fits it exactly; else one ExportError with every reason."""
    if format not in FORMATS:
        raise ExportError(f"--format {format!r}: unknown (known: {', '.join(FORMATS)})")
    module = FORMATS[format]
    # The registry's allow-list first (a mixer that no entry says this format holds is refused), then the format's
    # own rules for the mixers it holds.
    reasons = formats_refusing(config["layer_types"], format) + module.refusals(config)
    if reasons:
        raise ExportError(f"{where}: cannot be exported as {format} without changing what it computes: "
                          + "; ".join(reasons))  # fmt: skip
    return module


def check_folder(module: ModuleType, folder: Path, config: dict[str, Any], gguf_type: str | None = None) -> None:
    """What the config alone does not say: the format's options, and (gguf) whether the folder's tokenizer fits;
    one ExportError before anything is written. `folder` is the xatl folder, or the source for `convert --format`."""
    if gguf_type is not None and module is not gguf:
        raise ExportError(f"--gguf-type is for --format gguf, not {module.NAME}")
    if module is not gguf:
        return
    from xatl_convert.export.gguf_file import require_gguf

    require_gguf()
    gguf.chosen_type(gguf_type, torch.float32)  # a bad --gguf-type is one line now, not after the work
    reasons = gguf.folder_refusals(folder, config)
    if reasons:
        raise ExportError(f"{folder}: cannot be exported as gguf: " + "; ".join(reasons))


def xatl_weights(folder: Path) -> SourceCheckpoint:
    """The xatl folder's weights, exactly as its shard index (or its one model.safetensors) names them: a missing,
    empty, stray or foreign shard is one OutputError that names the file, before anything is written."""
    try:
        return open_written_weights(folder)
    except SourceError as error:
        raise OutputError(f"{error}; convert again") from None


def mapped_shards(
    weights: SourceCheckpoint, module: ModuleType, config: dict[str, Any]
) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """(file name, the format's tensors) for each weights file of the xatl folder (`xatl_weights`), one file in
    memory at a time; a format that joins tensors across files (mamba-ssm's fused in_proj, one .bin) gets them all
    at once."""
    files: dict[str, list[str]] = {}
    for name, info in weights.tensors.items():
        files.setdefault(info.file, []).append(name)
    gathered: dict[str, torch.Tensor] = {}
    for file, names in files.items():
        mapped: dict[str, torch.Tensor] = {}
        for name in names:  # a copy, not a view of the file's memory map: the export owns what it writes
            for renamed, value in module.tensors(name, weights.read(name).clone(), config):
                mapped[renamed] = value.contiguous()
        if hasattr(module, "fuse"):
            gathered.update(mapped)
        else:
            yield file, mapped
    if hasattr(module, "fuse"):
        yield module.WEIGHTS_FILE, module.fuse(gathered, config)


def export_folder(
    folder: str | Path, out: str | Path, format: str, force: bool = False, gguf_type: str | None = None
) -> list[str]:
    """Write FOLDER (an xatl output) to OUT in `format`, shard by shard as FOLDER holds them; returns the names of
    the tensors written. `gguf_type` (auto, f32, f16, bf16, q8_0) is for --format gguf only."""
    from xatl_convert.manifest import MANIFEST_NAME, read_manifest
    from xatl_convert.output_folder import ensure_writable, staged_output
    from xatl_convert.verify.checks import read_output_config
    from xatl_convert.write_guard import CommandPaths, xatl_version
    from xatl_convert.writer import SHARD_INDEX_NAME, copy_named_chat_templates, save_shard

    folder = Path(folder)
    paths = CommandPaths()
    paths.read(folder, "the folder to export")
    ensure_writable(out, force, paths.inputs)  # the write guard, for callers from Python too
    if format not in FORMATS:  # before reading anything
        raise ExportError(f"--format {format!r}: unknown (known: {', '.join(FORMATS)})")
    config = _with_token_ids(read_output_config(folder).to_dict(), folder)
    module = check_format(format, config, folder)
    check_folder(module, folder, config, gguf_type)
    manifest = read_manifest(folder)
    weights = xatl_weights(folder)
    if module is gguf:
        return _export_gguf(folder, out, force, config, manifest, weights, gguf_type)
    needed = sum((folder / file).stat().st_size for file in {info.file for info in weights.tensors.values()})
    weight_map: dict[str, str] = {}
    with staged_output(out, force, needed_bytes=needed) as staging, weights:
        for file_name, tensors in mapped_shards(weights, module, config):
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
        copy_named_chat_templates(folder, staging)
        if not target.get("use_cache", True):  # generate() reads its own config: without a cache it runs
            generation = staging / "generation_config.json"
            settings = json.loads(generation.read_text()) if generation.is_file() else {}
            generation.write_text(json.dumps({**settings, "use_cache": False}, indent=2) + "\n")
        manifest["export"] = {"format": format, "from": str(folder), "xatl_convert_version": xatl_version()}
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return sorted(weight_map)


def _export_gguf(
    folder: Path, out: str | Path, force: bool, config: dict[str, Any], manifest: dict[str, Any],
    weights: SourceCheckpoint, gguf_type: str | None,
) -> list[str]:  # fmt: skip
    """OUT holds one model.gguf (llama.cpp), the manifest with its export record, and the model card."""
    from xatl_convert.export import gguf_file
    from xatl_convert.manifest import MANIFEST_NAME
    from xatl_convert.output_folder import staged_output
    from xatl_convert.write_guard import xatl_version

    matrices = [info.dtype for info in weights.tensors.values() if len(info.shape) == 2]
    chosen = gguf.chosen_type(gguf_type, matrices[0] if matrices else torch.float32)
    planned = gguf_file.plan_tensors(weights, config, chosen)
    provenance = {"version": xatl_version(), "exported_from": str(folder),
                  "source": str((manifest.get("source") or {}).get("reference", "")),
                  "mapping": str((manifest.get("mapping") or {}).get("name", ""))}  # fmt: skip
    with staged_output(out, force, needed_bytes=gguf_file.planned_bytes(planned)) as staging, weights:
        pre = gguf_file.write_gguf(staging / gguf.FILE_NAME, folder, weights, config, planned, chosen,
                                   Path(out).name, provenance)  # fmt: skip
        if (folder / "README.md").is_file():
            shutil.copyfile(folder / "README.md", staging / "README.md")
        manifest["export"] = {"format": gguf.NAME, "from": str(folder), "xatl_convert_version": xatl_version(),
                              "file": gguf.FILE_NAME, "gguf_type": chosen, "tokenizer_pre": pre,
                              "architecture": gguf.ARCHITECTURE}  # fmt: skip
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return [tensor.name for tensor in planned]


def _with_token_ids(config: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The config, its missing pad/bos/eos token ids taken from the folder's generation_config.json (the source's):
    folders converted before the mappings carried pad_token_id have it there only."""
    try:
        generation = json.loads((folder / "generation_config.json").read_text())
    except (OSError, ValueError):
        return config
    if not isinstance(generation, dict):
        return config
    missing = {
        key: generation[key] for key in _TOKEN_IDS if config.get(key) is None and _is_token_id(generation.get(key))
    }
    return {**config, **missing}


def _is_token_id(value: Any) -> bool:
    """An id or a list of ids (eos may be several), as config.json holds them."""
    ids = value if isinstance(value, list) else [value]
    return bool(ids) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)


class ExportedTensors:
    """The tensors an export holds (through its shard index, its one safetensors file, or its .bin), read one at a
    time; the files are checked as `xatl_weights` checks an xatl folder's."""

    def __init__(self, folder: Path) -> None:
        try:
            self._weights = open_written_weights(folder)
        except SourceError as error:
            raise OutputError(f"{error}; export again") from None
        self.files = {name: folder / info.file for name, info in self._weights.tensors.items()}

    def read(self, name: str) -> torch.Tensor:
        return self._weights.read(name)
