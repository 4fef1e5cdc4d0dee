"""A source checkpoint: its config, its tokenizer files and a lazy index of its tensors.

Listing a safetensors file reads only its JSON header, so names, shapes and byte offsets cost nothing. A tensor is
read when the writer asks for it, through a memory map of that tensor's bytes alone. We do not map whole files (as
`safe_open` does): every page touched through a mapping stays in the process's resident set until the mapping
closes, so converting through `safe_open` grows RSS to the size of the whole source (measured: a 1 GiB file read
tensor by tensor through safe_open peaked at 1.25 GB RSS), which breaks the memory budget of a streamed conversion.
A ``pytorch_model.bin`` is read with ``torch.load(weights_only=True)``, which refuses any pickled code.

Every file read must lie inside the source's storage root (the checkpoint folder, or a Hub snapshot's repo cache
folder, whose snapshot files are links into its blobs): a shard name or a link cannot make xatl read elsewhere.
Every way a file can be damaged ends in a SourceError that names the file (and the tensor) on one line.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import pickle
import re
import struct
import warnings
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from xatl_convert.errors import SourceError, first_line
from xatl_convert.json_files import json_type, read_json
from xatl_convert.regular_files import require_regular_file
from xatl_convert.sources.transformers_config import transformers_config
from xatl_convert.write_guard import storage_root

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
    "chat_template.jinja",  # transformers 5 saves the chat template here, not in tokenizer_config.json
)
CHAT_TEMPLATES_FOLDER = "additional_chat_templates"  # named chat templates (tool use, RAG), one NAME.jinja each

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


# A damaged weights file cannot be repaired here: the fix is always to fetch or save it again.
_DAMAGED = "re-download or re-save the checkpoint"
_MAX_HEADER_BYTES = 100 * 1024 * 1024

# What torch.load raises on a damaged .bin besides OSError and UnpicklingError (measured by fuzzing legacy and zip
# files: flipped bytes, truncations), so that each ends in one line rather than a traceback.
_TORCH_LOAD_ERRORS = (
    RuntimeError,
    EOFError,
    ValueError,
    IndexError,
    KeyError,
    TypeError,
    AttributeError,
    AssertionError,
    RecursionError,
    struct.error,
    zipfile.BadZipFile,
)
# weights_only's refusals of a global (a function or class to call) as opposed to plain damage.
_PICKLED_CODE = re.compile(r"GLOBAL|Can only (?:create|build)")


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

    @property
    def storage_root(self) -> Path:
        """The resolved folder holding the source's bytes, which an output must never be, hold or lie inside."""
        return storage_root(self.path)

    def tokenizer_files(self) -> list[Path]:
        """Tokenizer and generation files to copy beside the output: regular files inside the storage root only."""
        root = self.storage_root
        named = sorted((self.path / CHAT_TEMPLATES_FOLDER).glob("*.jinja"))
        candidates = [self.path / name for name in TOKENIZER_FILES] + named
        return [file for file in candidates if _is_regular_file_inside(file, root)]

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
        if info.name not in state:
            raise SourceError(
                f"{self.path / info.file}: tensor {info.name!r} is gone; the file changed while xatl read it"
            )
        return state[info.name]

    def iter_names(self) -> Iterator[str]:
        return iter(self.tensors)

    def prefetch(self, names: Iterable[str]) -> None:
        """Ask the OS to start reading these tensors' bytes into the page cache, and return at once.

        A layer-streamed reader calls this for the next block while the current one computes, so that a model
        larger than the page cache is read from disk in the background rather than between blocks. A hint only:
        nothing is mapped or held, and a .bin shard (read whole) or a platform without fadvise is skipped.
        """
        if not hasattr(os, "posix_fadvise"):
            return
        ranges: dict[str, list[tuple[int, int]]] = {}
        for name in names:
            info = self.tensors.get(name)
            if info is not None and info.offset is not None and info.nbytes:
                ranges.setdefault(info.file, []).append((info.offset, info.nbytes))
        for file, spans in ranges.items():
            try:
                descriptor = os.open(self.path / file, os.O_RDONLY)
            except OSError:
                continue  # the read itself will say what is wrong
            try:
                for offset, length in spans:
                    os.posix_fadvise(descriptor, offset, length, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass
            finally:
                os.close(descriptor)

    def close(self) -> None:
        self._torch_state.clear()

    def __enter__(self) -> SourceCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_checkpoint(path: Path, reference: str | None = None, revision: str | None = None) -> SourceCheckpoint:
    """Open a local checkpoint folder: config.json plus weights in safetensors (single or sharded) or .bin."""
    path = Path(path)
    try:
        return _open(path, reference, revision)
    except OSError as error:  # a stat that failed where no read was expected (permissions on a parent folder)
        raise SourceError(_os_message(Path(error.filename or path), error)) from None


def _open(path: Path, reference: str | None, revision: str | None) -> SourceCheckpoint:
    if not path.is_dir():
        raise SourceError(f"{path}: not a folder (expected a checkpoint folder with config.json)")
    root = storage_root(path)
    config_path = path / "config.json"
    if not config_path.exists():
        raise SourceError(f"{path}: no config.json; is this a transformers checkpoint folder?")
    config = _read_json(config_path, root)
    if not isinstance(config, dict):
        raise SourceError(f"{config_path}: expected a JSON object, got {json_type(config)}")
    for name in TOKENIZER_FILES:  # copied beside the output later: refuse a FIFO or device now, not then
        if (path / name).exists():
            _require_regular(path / name)
    transformers_config(config, config_path)  # a value transformers refuses is one line here, for every command
    return SourceCheckpoint(
        path=path,
        reference=reference or str(path),
        config=config,
        tensors=with_model_prefix(_index_tensors(path, root), config),
        revision=revision,
    )


def with_model_prefix(tensors: dict[str, TensorInfo], config: dict[str, Any]) -> dict[str, TensorInfo]:
    """The tensors under the names transformers' causal-LM class gives them. Some Hub checkpoints were saved from
    the base model (the `gpt2` repo: `h.0.attn...`, not `transformer.h.0.attn...`); transformers adds the class's
    `base_model_prefix` when it loads them, and so do we, so that one mapping fits both layouts. Each TensorInfo
    keeps its name in the file."""
    prefix = _base_model_prefix(str(config.get("model_type", "")))
    if not prefix or not tensors or any(name.startswith(f"{prefix}.") for name in tensors):
        return tensors
    return {(name if name.startswith("lm_head.") else f"{prefix}.{name}"): info for name, info in tensors.items()}


def _base_model_prefix(model_type: str) -> str:
    """transformers' base_model_prefix of the model_type's causal-LM class ("" when transformers does not know it)."""
    try:
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # pragma: no cover
        return ""
    model_class = getattr(transformers, str(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, "")), None)
    return str(getattr(model_class, "base_model_prefix", "") or "")


def _index_tensors(path: Path, root: Path) -> dict[str, TensorInfo]:
    """Find the weight files in their order of preference and list every tensor in them."""
    # exists(), not is_file(): a FIFO or a folder under a weights name is refused by name, not passed over
    if (path / SAFETENSORS_INDEX).exists():
        return _index_safetensors(path, root, _shard_files(path / SAFETENSORS_INDEX, root))
    if (path / SAFETENSORS_SINGLE).exists():
        return _index_safetensors(path, root, [SAFETENSORS_SINGLE])
    loose = sorted(p.name for p in path.glob("*.safetensors"))
    if loose:
        return _index_safetensors(path, root, loose)
    if (path / TORCH_INDEX).exists():
        return _index_torch(path, root, _shard_files(path / TORCH_INDEX, root))
    if (path / TORCH_SINGLE).exists():
        return _index_torch(path, root, [TORCH_SINGLE])
    raise SourceError(f"{path}: no weights found (model.safetensors, its sharded index, or pytorch_model.bin)")


def open_written_weights(folder: Path) -> SourceCheckpoint:
    """The weights of a folder that xatl wrote (a conversion or an export), exactly as written, or a SourceError.

    Through model.safetensors.index.json when present: every shard it names must exist and hold exactly the tensors
    it assigns to that shard. Else the one model.safetensors, else the one pytorch_model.bin (a mamba-ssm export).
    Never a glob: a .safetensors file that none of these names is refused, since reading around it would export or
    check a model that silently lacks (or mixes in) tensors.
    """
    folder = Path(folder)
    root = storage_root(folder)
    index_path = folder / SAFETENSORS_INDEX
    if index_path.is_file():
        weight_map = _weight_map(index_path, root)
        files = _checked_shards(index_path, root, weight_map)
        named = f"{index_path.name} does not name it"
    elif (folder / SAFETENSORS_SINGLE).is_file():
        weight_map, files, named = None, [SAFETENSORS_SINGLE], f"there is no {SAFETENSORS_INDEX} to name it"
    elif (folder / TORCH_SINGLE).is_file():
        weight_map, files, named = None, [], f"there is no {SAFETENSORS_INDEX} to name it"
    elif any(folder.glob("*.safetensors")):
        raise SourceError(f"{index_path}: missing, and without it the folder's .safetensors shards cannot be read")
    else:
        raise SourceError(f"{folder}: no weights ({SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX} or {TORCH_SINGLE})")
    for stray in sorted(path.name for path in folder.glob("*.safetensors")):
        if stray not in files:
            raise SourceError(f"{folder / stray}: not part of the model: {named} (move it out of the folder)")
    if not files:
        return SourceCheckpoint(folder, str(folder), {}, _index_torch(folder, root, [TORCH_SINGLE]))
    assigned: dict[str, set[str]] = {}
    for name, shard in (weight_map or {}).items():
        assigned.setdefault(shard, set()).add(name)
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        _inside(folder / file, root)
        held = _read_safetensors_header(folder / file, file)
        if weight_map is not None:
            _check_shard_holds_its_tensors(folder / file, index_path.name, assigned[file], held, weight_map)
        tensors.update((info.name, info) for info in held)
    return SourceCheckpoint(folder, str(folder), {}, tensors)


def _check_shard_holds_its_tensors(
    file: Path, index_name: str, assigned: set[str], held: list[TensorInfo], weight_map: dict[str, str]
) -> None:
    """A shard holds exactly the tensors the index assigns to it: one copied from another model (or another
    sharding) would otherwise be read as if it belonged."""
    names = {info.name for info in held}
    foreign, lacking = sorted(names - assigned), sorted(assigned - names)
    if foreign:
        where = f"assigns it to {weight_map[foreign[0]]}" if foreign[0] in weight_map else "does not list it"
        raise SourceError(f"{file}: a foreign shard: it holds tensor {_short(foreign[0])}, but {index_name} {where}")
    if lacking:
        raise SourceError(
            f"{file}: a foreign shard: it lacks tensor {_short(lacking[0])}, which {index_name} assigns to it "
            f"({len(lacking)} missing)"
        )


def _shard_files(index_path: Path, root: Path) -> list[str]:
    """The shard files a sharded index names, each checked to be a file inside the checkpoint."""
    return _checked_shards(index_path, root, _weight_map(index_path, root))


def _weight_map(index_path: Path, root: Path) -> dict[str, str]:
    """A sharded index's weight_map (tensor name → shard file name), checked to be one."""
    index = _read_json(index_path, root)
    if not isinstance(index, dict):
        raise SourceError(f"{index_path}: not a valid shard index: expected a JSON object, got {json_type(index)}")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        found = "an empty object" if weight_map == {} else json_type(weight_map)
        raise SourceError(
            f'{index_path}: not a valid shard index: "weight_map" should be an object of tensor name to shard '
            f"file, got {found}; {_DAMAGED}"
        )
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise SourceError(
                f"{index_path}: weight_map maps tensor {_short(tensor)} to {json_type(shard)} {_short(shard)}, "
                f"not a shard file name; {_DAMAGED}"
            )
    return weight_map


def _checked_shards(index_path: Path, root: Path, weight_map: dict[str, str]) -> list[str]:
    """The weight_map's shard files, in order of first mention, each a file inside the checkpoint."""
    files = list(dict.fromkeys(weight_map.values()))
    for name in files:
        _check_shard_name(index_path, name)
        _inside(index_path.parent / name, root)
        if not (index_path.parent / name).exists():
            raise SourceError(f"{index_path}: names shard {_short(name)}, which is missing")
        _require_regular(index_path.parent / name)
    return files


def _check_shard_name(index_path: Path, name: str) -> None:
    """Refuse a shard name that climbs out of the checkpoint folder, before anything is opened through it."""
    if "\\" in name or "\0" in name:
        raise SourceError(
            f"{index_path}: names shard {_short(name)}, which is not a file name (a backslash or NUL in it); {_DAMAGED}"
        )
    pure = PurePosixPath(name)
    if pure.is_absolute() or Path(name).is_absolute() or ".." in pure.parts:
        raise SourceError(
            f"{index_path}: names shard {_short(name)}, which lies outside the checkpoint folder; a shard must be a "
            "file inside the folder, named relative to it"
        )


def _index_safetensors(path: Path, root: Path, files: list[str]) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        _inside(path / file, root)
        _require_regular(path / file)
        for info in _read_safetensors_header(path / file, file):
            tensors[info.name] = info
    return tensors


def _read_safetensors_header(file: Path, relative: str | None = None) -> list[TensorInfo]:
    """Parse a safetensors header (8-byte little-endian length, then JSON) into names, shapes and offsets.

    Every entry is checked against the file, so that no later read can fall outside it or alias another tensor.
    """
    length, data_size, raw = _read_header_bytes(file)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        reason = "nested too deeply" if isinstance(error, RecursionError) else first_line(error)
        raise SourceError(
            f"{file}: not a readable safetensors file (invalid JSON header: {reason}); {_DAMAGED}"
        ) from None
    if not isinstance(header, dict):
        raise SourceError(f"{file}: safetensors header is {json_type(header)}, not a JSON object; {_DAMAGED}")
    entries = [
        _header_entry(file, relative or file.name, name, entry, 8 + length, data_size)
        for name, entry in header.items()
        if name != "__metadata__"
    ]
    _check_no_overlap(file, entries)
    return [info for info, _, _ in entries]


def _read_header_bytes(file: Path) -> tuple[int, int, bytes]:
    """The header's length, the size of the data after it, and the header's raw JSON bytes."""
    try:
        with file.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            length = int.from_bytes(prefix, "little")
            if len(prefix) < 8 or not 2 <= length <= min(_MAX_HEADER_BYTES, size - 8):
                raise SourceError(
                    f"{file}: not a readable safetensors file (header length {length} does not fit a file of "
                    f"{size} bytes: truncated or not safetensors); {_DAMAGED}"
                )
            raw = handle.read(length)
    except OSError as error:
        raise SourceError(_os_message(file, error)) from None
    if len(raw) < length:
        raise SourceError(f"{file}: not a readable safetensors file (truncated while read); {_DAMAGED}")
    return length, size - 8 - length, raw


def _header_entry(
    file: Path, relative: str, name: str, entry: object, base: int, data_size: int
) -> tuple[TensorInfo, int, int]:
    """One header entry as a TensorInfo, with its data range (start, end) relative to the data section."""
    where = f"{file}: tensor {_short(name)}"
    if not isinstance(entry, dict):
        raise SourceError(f"{where}: its header entry is {json_type(entry)}, not a JSON object; {_DAMAGED}")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise SourceError(f"{where}: its header entry has no {key}; {_DAMAGED}")
    dtype = _SAFETENSORS_DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise SourceError(
            f"{where} has unsupported dtype {_short(entry['dtype'])} (supported: {', '.join(_SAFETENSORS_DTYPES)})"
        )
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(_is_count(size) for size in shape):
        raise SourceError(f"{where}: shape {_short(shape)} is not a list of non-negative integers; {_DAMAGED}")
    offsets = entry["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(offset) for offset in offsets)):
        raise SourceError(f"{where}: data_offsets {_short(offsets)} is not [start, end] in bytes; {_DAMAGED}")
    start, end = offsets
    if start > end:
        raise SourceError(f"{where}: data_offsets {_short(offsets)} end before they start; {_DAMAGED}")
    if end > data_size:
        raise SourceError(
            f"{where}: its data (bytes {start}..{end}) runs past the end of the file ({data_size} bytes of data); "
            f"the file is truncated: {_DAMAGED}"
        )
    info = TensorInfo(name, tuple(shape), dtype, relative, offset=base + start)
    if end - start != info.nbytes:
        raise SourceError(f"{where} has {end - start} bytes, its shape needs {info.nbytes}; {_DAMAGED}")
    return info, start, end


def _check_no_overlap(file: Path, entries: list[tuple[TensorInfo, int, int]]) -> None:
    """Refuse two tensors sharing bytes: a writer would never produce it, and reading it would alias data."""
    previous: tuple[TensorInfo, int, int] | None = None
    sized = [entry for entry in entries if entry[2] > entry[1]]  # an empty tensor holds no bytes to share
    for current in sorted(sized, key=lambda item: (item[1], item[2])):
        if previous is not None and current[1] < previous[2]:
            raise SourceError(
                f"{file}: tensor {_short(current[0].name)} (bytes {current[1]}..{current[2]}) overlaps tensor "
                f"{_short(previous[0].name)} (bytes {previous[1]}..{previous[2]}); {_DAMAGED}"
            )
        if previous is None or current[2] >= previous[2]:
            previous = current


def _is_count(value: object) -> bool:
    """A JSON non-negative integer (JSON true is a Python bool, which is an int: refuse it)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


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
    try:
        with file.open("rb") as handle:
            mapping = mmap.mmap(
                handle.fileno(), offset - aligned + info.nbytes, offset=aligned, access=mmap.ACCESS_READ
            )
    except (OSError, ValueError) as error:
        raise SourceError(f"{file}: cannot read tensor {info.name!r} ({first_line(error)})") from None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        data = torch.frombuffer(mapping, dtype=torch.uint8, count=info.nbytes, offset=offset - aligned)
    return data.view(info.dtype).reshape(info.shape)


def _torch_load(file: Path) -> dict[str, torch.Tensor]:
    """Load a .bin with weights_only (which refuses pickled code); a legacy non-zip file cannot be memory-mapped."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's pickle-protocol warnings would print among our one-line errors
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except pickle.UnpicklingError as error:
        raise SourceError(_unpickling_message(file, error)) from None
    except OSError as error:
        raise SourceError(_os_message(file, error)) from None
    except _TORCH_LOAD_ERRORS as error:
        reason = "it ends too early: truncated or empty" if isinstance(error, EOFError) else first_line(error)
        raise SourceError(f"{file}: not a readable PyTorch weights file ({reason}); {_DAMAGED}") from None
    if not isinstance(state, dict):
        raise SourceError(f"{file}: expected a state dict of tensors, got {type(state).__name__}; {_DAMAGED}")
    return {name: value for name, value in state.items() if isinstance(name, str) and isinstance(value, torch.Tensor)}


def _unpickling_message(file: Path, error: pickle.UnpicklingError) -> str:
    """One line for weights_only's refusal: pickled code is refused outright; anything else is damage."""
    inner = error.__context__ if isinstance(error.__context__, pickle.UnpicklingError) else error
    if _PICKLED_CODE.search(str(inner)) or _PICKLED_CODE.search(str(error)):
        return f"{file}: refused: it holds pickled code, which xatl never runs; convert the checkpoint to safetensors"
    return f"{file}: not a readable PyTorch weights file (unsupported pickle content: {first_line(inner)}); {_DAMAGED}"


def _index_torch(path: Path, root: Path, files: list[str]) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        _inside(path / file, root)
        _require_regular(path / file)
        for name, value in _torch_load(path / file).items():
            tensors[name] = TensorInfo(name, tuple(value.shape), value.dtype, file)
    return tensors


def _read_json(file: Path, root: Path) -> object:
    """Parse a UTF-8 JSON file of the checkpoint (config or shard index), naming it in every failure."""
    _inside(file, root)
    _require_regular(file)
    return read_json(file, SourceError, "fix or re-download the checkpoint")


def _require_regular(file: Path) -> None:
    """Refuse a FIFO, device, socket or folder under a checkpoint file's name before anything opens it (a FIFO
    would block the read)."""
    require_regular_file(file, SourceError, "replace it by the checkpoint's own file")


def _inside(file: Path, root: Path) -> Path:
    """The file's real path, refused if it lies outside the storage root: a link must not make xatl read elsewhere."""
    try:
        real = file.resolve()
    except (OSError, RuntimeError) as error:  # RuntimeError: a symlink loop, before Python 3.13
        raise SourceError(f"{file}: cannot resolve it ({first_line(error)}); replace the link by the file") from None
    if not real.is_relative_to(root):
        raise SourceError(
            f"{file}: links to {real}, outside the checkpoint folder {root}; xatl reads only files inside the "
            "checkpoint: copy the file in instead of linking it"
        )
    return real


def _is_regular_file_inside(file: Path, root: Path) -> bool:
    """Whether a file exists, is regular and lies inside the storage root once its links are followed."""
    try:
        real = file.resolve()
        return real.is_relative_to(root) and real.is_file()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop, before Python 3.13
        return False


def _os_message(file: Path, error: OSError) -> str:
    """One line for a failed read: the file, the OS's reason, and what to check."""
    reason = error.strerror or first_line(error)
    return f"{file}: cannot read it ({reason}); check that it exists, that you may read it, and the disk"


def _short(value: object, limit: int = 120) -> str:
    """A value's repr, cut to a readable length: a damaged header can hold megabytes in one field."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
