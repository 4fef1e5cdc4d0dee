"""A source checkpoint: its config, its tokenizer files and a lazy index of its tensors.

Listing a safetensors file reads only its JSON header, so names, shapes and byte offsets cost nothing. A tensor is
read when the writer asks for it, through a memory map of that tensor's bytes alone. We do not map whole files (as
`safe_open` does): every page touched through a mapping stays in the process's resident set until the mapping
closes, so converting through `safe_open` grows RSS to the size of the whole source (measured: a 1 GiB file read
tensor by tensor through safe_open peaked at 1.25 GB RSS), which breaks the memory budget of a streamed conversion.
A ``pytorch_model.bin`` is read with ``torch.load(weights_only=True)``, which refuses any pickled code.
"""

from __future__ import annotations

import json
import math
import mmap
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from xatl_convert.errors import SourceError

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_SINGLE = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "generation_config.json",
)

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape and dtype of one source tensor, known without reading its data."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str
    offset: int | None = None  # absolute byte offset of the data in a safetensors file

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class SourceCheckpoint:
    """An opened source: config dict, tensor inventory and a way to read one tensor at a time."""

    path: Path
    reference: str
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    revision: str | None = None
    _torch_state: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))

    def tokenizer_files(self) -> list[Path]:
        """Tokenizer and generation files present in the source folder, to copy beside the output."""
        return [self.path / name for name in TOKENIZER_FILES if (self.path / name).is_file()]

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor. From safetensors it is a read-only view of a memory map: clone it before editing."""
        info = self.tensors.get(name)
        if info is None:
            raise SourceError(f"{self.path}: no tensor named {name!r}")
        if info.offset is not None:
            return _read_range(self.path / info.file, info)
        state = self._torch_state.get(info.file)
        if state is None:
            state = _torch_load(self.path / info.file)
            self._torch_state = {info.file: state}  # keep one .bin shard in memory at a time
        return state[name]

    def iter_names(self) -> Iterator[str]:
        return iter(self.tensors)

    def close(self) -> None:
        self._torch_state.clear()

    def __enter__(self) -> SourceCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_checkpoint(path: Path, reference: str | None = None, revision: str | None = None) -> SourceCheckpoint:
    """Open a local checkpoint folder: config.json plus weights in safetensors (single or sharded) or .bin."""
    path = Path(path)
    if not path.is_dir():
        raise SourceError(f"{path}: not a folder (expected a checkpoint folder with config.json)")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise SourceError(f"{path}: no config.json; is this a transformers checkpoint folder?")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise SourceError(f"{config_path}:{error.lineno}:{error.colno}: invalid JSON: {error.msg}") from None
    if not isinstance(config, dict):
        raise SourceError(f"{config_path}: expected a JSON object")
    return SourceCheckpoint(
        path=path,
        reference=reference or str(path),
        config=config,
        tensors=_index_tensors(path),
        revision=revision,
    )


def _index_tensors(path: Path) -> dict[str, TensorInfo]:
    """Find the weight files in their order of preference and list every tensor in them."""
    if (path / SAFETENSORS_INDEX).is_file():
        return _index_safetensors(path, _shard_files(path / SAFETENSORS_INDEX))
    if (path / SAFETENSORS_SINGLE).is_file():
        return _index_safetensors(path, [SAFETENSORS_SINGLE])
    loose = sorted(p.name for p in path.glob("*.safetensors"))
    if loose:
        return _index_safetensors(path, loose)
    if (path / TORCH_INDEX).is_file():
        return _index_torch(path, _shard_files(path / TORCH_INDEX))
    if (path / TORCH_SINGLE).is_file():
        return _index_torch(path, [TORCH_SINGLE])
    raise SourceError(f"{path}: no weights found (model.safetensors, its sharded index, or pytorch_model.bin)")


def _shard_files(index_path: Path) -> list[str]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise SourceError(f"{index_path}: not a valid shard index ({error})") from None
    files = list(dict.fromkeys(weight_map.values()))
    for name in files:
        if not (index_path.parent / name).is_file():
            raise SourceError(f"{index_path}: names shard {name!r}, which is missing")
    return files


def _index_safetensors(path: Path, files: list[str]) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        for info in _read_safetensors_header(path / file):
            tensors[info.name] = info
    return tensors


def _read_safetensors_header(file: Path) -> list[TensorInfo]:
    """Parse a safetensors header (8-byte little-endian length, then JSON) into names, shapes and offsets."""
    try:
        with file.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if not 2 <= length <= min(100 * 1024 * 1024, file.stat().st_size - 8):
                raise ValueError(f"header length {length} does not fit the file")
            header = json.loads(handle.read(length))
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise SourceError(f"{file}: not a readable safetensors file ({error})") from None
    infos = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise SourceError(f"{file}: tensor {name!r} has unsupported dtype {entry.get('dtype')}")
        start, end = entry["data_offsets"]
        info = TensorInfo(name, tuple(entry["shape"]), dtype, file.name, offset=8 + length + start)
        if end - start != info.nbytes:
            raise SourceError(f"{file}: tensor {name!r} has {end - start} bytes, its shape needs {info.nbytes}")
        infos.append(info)
    return infos


def _read_range(file: Path, info: TensorInfo) -> torch.Tensor:
    """Map just this tensor's bytes, read-only, and view them as a tensor (treat it as read-only: clone to edit).

    The mapping lives exactly as long as the tensor: once the writer has flushed the shard that holds it, the
    pages leave the resident set, so RSS stays near one shard; and a plain copy is written straight from the page
    cache to the output, with no copy through anonymous memory. (A private copy-on-write mapping measured about
    1.5x slower to write from than this shared read-only one.)
    """
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.dtype)
    offset = info.offset or 0
    aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
    with file.open("rb") as handle:
        try:
            mapping = mmap.mmap(
                handle.fileno(), offset - aligned + info.nbytes, offset=aligned, access=mmap.ACCESS_READ
            )
        except (OSError, ValueError) as error:
            raise SourceError(f"{file}: cannot read tensor {info.name!r} ({error})") from None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        data = torch.frombuffer(mapping, dtype=torch.uint8, count=info.nbytes, offset=offset - aligned)
    return data.view(info.dtype).reshape(info.shape)


def _torch_load(file: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # weights_only refuses pickled code with an UnpicklingError
        raise SourceError(f"{file}: refused or unreadable with torch.load(weights_only=True): {error}") from None
    if not isinstance(state, dict):
        raise SourceError(f"{file}: expected a state dict of tensors")
    return {name: value for name, value in state.items() if isinstance(value, torch.Tensor)}


def _index_torch(path: Path, files: list[str]) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        for name, value in _torch_load(path / file).items():
            tensors[name] = TensorInfo(name, tuple(value.shape), value.dtype, file)
    return tensors
