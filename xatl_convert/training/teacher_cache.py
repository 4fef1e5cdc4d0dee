"""Stage kd's teacher, run once: each training block's top-k next-token log-probabilities, kept in a folder.

`xatl distill --teacher-cache DIR --teacher-top-k K` runs the teacher once over the blocks that kd trains on and
keeps, per token, its K likeliest next tokens (int32 ids), their log-probabilities (float16, from a float32
log-softmax over the whole vocabulary) and the log of the mass left to the other tokens (float32). kd then reads these
rows instead of running the teacher; its loss compares K + 1 outcomes, the K tokens and the rest (`kd.top_k_kl`).

Float16 for the log-probabilities, not bfloat16: its 11-bit mantissa rounds log p by at most 4.9e-4 relative, so p
by at most 4.9e-4·|log p| relative, which is smallest for the likeliest tokens that weigh most in the KL; bfloat16
rounds 8 times coarser, and its range is not needed (log-probabilities lie in [-65504, 0] in practice). The rest's
log-mass is float32 (4 bytes a token): derived from float16 values it would cancel to noise when the top K hold
nearly all the mass. Only temperature 1 is stored: a top-K cut at one temperature is not the top-K cut at another.

The folder holds safetensors shards of whole blocks (`teacher-00001-of-00002.safetensors`: tensors `input_ids`
[blocks, block size], `top_ids` and `top_log_probs` [blocks, block size, K], `rest_log_prob` [blocks, block size]),
read through `safe_open` a batch's rows at a time, and `xatl_teacher_cache.json`, whose `key` is what the rows depend
on: the teacher (resolved folder, hashes of its config.json and of an xatl manifest, its weight files' sizes and
mtimes), kd's blocks (a hash of their token ids, in kd's order: the data, tokenizer, seed, held-out share, block size
and the steps of align and kd all move it), the block size, held-out share, K and xatl's version. Every row also
keeps its block's token ids, checked against the batch's at every lookup, so a wrong row is never used.

A folder whose key differs from the run's is refused in one line that names what differs, never rebuilt, not even
with --force (which is about OUT): a cache may have cost hours of a GPU and serve other runs; remove it to rebuild it,
or choose another folder. A new cache is built in a staging folder beside DIR and renamed into place, so an
interrupted build leaves no cache behind.
"""

from __future__ import annotations

import bisect
import glob
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from xatl_convert.errors import OutputWriteError, XatlError
from xatl_convert.manifest import MANIFEST_NAME
from xatl_convert.output_folder import (
    PARTIAL_TAG,
    exclusive_lock,
    output_location,
    remove_entry,
    rename_without_replacing,
)
from xatl_convert.write_guard import TEACHER_CACHE_NAME, xatl_version
from xatl_convert.writer import failed_file, save_shard

from .kd import TeacherTopK

CACHE_FORMAT = 1  # of the key file and shards; a reader refuses another
SHARD_BYTES = 1 << 30  # whole blocks per shard, up to about this many bytes
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".index.json")


class TeacherCacheError(XatlError):
    """A teacher cache belongs to another run (teacher, blocks, top-k ...), is damaged, or disagrees with a batch."""


def teacher_identity(folder: str | Path) -> dict[str, Any]:
    """What says the teacher is the same one: its resolved folder, a hash of its config.json (and of an xatl
    manifest, when it has one), and its weight files' sizes and modification times (hashing gigabytes is not cheap)."""
    folder = Path(folder).resolve()
    weights = {}
    for file in sorted(folder.iterdir()):
        if file.name.endswith(WEIGHT_SUFFIXES) and file.is_file():
            stat = file.stat()
            weights[file.name] = [stat.st_size, stat.st_mtime_ns]
    identity: dict[str, Any] = {"path": str(folder), "config_sha256": _file_sha256(folder / "config.json"),
                                "weights": weights}  # fmt: skip
    if (folder / MANIFEST_NAME).is_file():
        identity["manifest_sha256"] = _file_sha256(folder / MANIFEST_NAME)
    return identity


def blocks_sha256(blocks: torch.Tensor) -> str:
    """A hash of the blocks' token ids, in their order, with their shape."""
    digest = hashlib.sha256(f"{tuple(blocks.shape)}".encode())
    digest.update(blocks.to(torch.int64).contiguous().numpy().data)
    return digest.hexdigest()


def cache_key(teacher_folder: str | Path, blocks: torch.Tensor, held_out: float, top_k: int) -> dict[str, Any]:
    """What a cache's rows depend on; a cache whose key differs is never used."""
    return {
        "teacher": teacher_identity(teacher_folder),
        "blocks": {"count": blocks.shape[0], "sha256": blocks_sha256(blocks)},
        "block_size": blocks.shape[1],
        "held_out": held_out,
        "top_k": top_k,
        "xatl_convert_version": xatl_version(),
    }


def ensure_teacher_cache(
    folder: str | Path,
    teacher: nn.Module,
    key: dict[str, Any],
    blocks: torch.Tensor,
    batch_size: int,
    shard_bytes: int = SHARD_BYTES,
    progress: Callable[[int, int], None] | None = None,
) -> bool:
    """Build the cache of `teacher` over `blocks` into `folder` unless it is there; returns whether it was built.

    An existing cache of another key is refused (TeacherCacheError naming what differs); `batch_size` blocks go
    through the teacher at a time, under no_grad, and `progress(blocks done, blocks)` follows them. The shards and
    key file are written into a staging folder beside `folder`, under a lock, and renamed into place at the end: a
    failure or an interrupt leaves no cache."""
    folder = Path(folder)
    if (folder / TEACHER_CACHE_NAME).is_file():
        _check_key(folder, _read_record(folder)["key"], key)
        return False
    top_k = key["top_k"]
    vocab = getattr(getattr(teacher, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and top_k > vocab:
        raise TeacherCacheError(
            f"--teacher-top-k {top_k}: the teacher's vocabulary has {vocab} tokens; give at most that"
        )
    block_bytes = blocks.shape[1] * (top_k * (4 + 2) + 4 + 4)  # ids and float16 log-probs; rest, token id
    location = output_location(folder)
    try:
        location.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(location.parent).free
    except OSError as error:
        raise OutputWriteError(f"--teacher-cache {folder}: cannot create it ({error.strerror or error})") from None
    if block_bytes * blocks.shape[0] > free:
        raise OutputWriteError(
            f"--teacher-cache {folder}: needs {block_bytes * blocks.shape[0] / 1024**3:,.3f} GiB but "
            f"{location.parent} has {free / 1024**3:,.3f} GiB free; free some space or choose another --teacher-cache"
        )
    busy = TeacherCacheError(f"--teacher-cache {folder}: another xatl distill run is building it now; wait for it")
    with exclusive_lock(location, folder, busy):
        for leftover in location.parent.glob(f".{glob.escape(location.name)}{PARTIAL_TAG}*"):
            remove_entry(leftover)  # of a build that was killed: we hold the lock, so none is running
        staging = location.parent / f".{location.name}{PARTIAL_TAG}{os.getpid()}"
        try:
            staging.mkdir()
            _write_cache(staging, teacher, key, blocks, batch_size, max(1, shard_bytes // block_bytes), progress)
            if location.is_dir() and not location.is_symlink() and not any(location.iterdir()):
                location.rmdir()  # an empty folder made for the cache: the finished one takes its place
            rename_without_replacing(staging, location)
        except FileExistsError:
            raise TeacherCacheError(
                f"--teacher-cache {folder}: appeared while the cache was built; it was left as it is"
            ) from None
        except (OSError, SafetensorError) as error:
            raise OutputWriteError(
                f"--teacher-cache {folder}: cannot write {failed_file(error, staging)}; no cache was written"
            ) from None
        finally:
            remove_entry(staging)
    return True


def _write_cache(
    staging: Path,
    teacher: nn.Module,
    key: dict[str, Any],
    blocks: torch.Tensor,
    batch_size: int,
    per_shard: int,
    progress: Callable[[int, int], None] | None,
) -> None:
    """The shards, then the key file (whose presence says the cache is complete)."""
    starts = range(0, blocks.shape[0], per_shard)
    shards = []
    for number, start in enumerate(starts, 1):
        part = blocks[start : start + per_shard]
        name = f"teacher-{number:05d}-of-{len(starts):05d}.safetensors"
        rows = _teacher_rows(teacher, part, key["top_k"], batch_size, start, blocks.shape[0], progress)
        save_shard(rows, staging / name)
        shards.append({"file": name, "blocks": part.shape[0]})
    record = {"xatl_teacher_cache": CACHE_FORMAT, "key": key, "shards": shards,
              "teacher_dtype": str(next(teacher.parameters()).dtype).removeprefix("torch.")}  # fmt: skip
    (staging / TEACHER_CACHE_NAME).write_text(json.dumps(record, indent=2) + "\n")


def _teacher_rows(
    teacher: nn.Module,
    blocks: torch.Tensor,
    top_k: int,
    batch_size: int,
    done: int,
    total: int,
    progress: Callable[[int, int], None] | None,
) -> dict[str, torch.Tensor]:
    """One shard's tensors: the teacher's top-k rows for `blocks`, a batch at a time (`done` of `total` before)."""
    device = next(teacher.parameters()).device
    ids, log_probs, rest = [], [], []
    with torch.no_grad():
        for start in range(0, blocks.shape[0], batch_size):
            batch = blocks[start : start + batch_size].to(device)
            top = TeacherTopK.from_logits(teacher(input_ids=batch).logits, top_k)
            ids.append(top.token_ids.cpu())
            log_probs.append(top.log_probs.to(torch.float16).cpu())
            rest.append(top.rest_log_prob.cpu())
            if progress is not None:
                progress(done + start + batch.shape[0], total)
    return {"input_ids": blocks.to(torch.int32).contiguous(), "top_ids": torch.cat(ids),
            "top_log_probs": torch.cat(log_probs), "rest_log_prob": torch.cat(rest)}  # fmt: skip


class TeacherCache:
    """A built teacher cache, read a batch's rows at a time: each shard memory-mapped through `safe_open`, so only
    the rows read come into memory."""

    def __init__(self, folder: str | Path, key: dict[str, Any]) -> None:
        """Open the cache in `folder`, refusing it unless its key is `key`."""
        self.folder = Path(folder)
        record = _read_record(self.folder)
        _check_key(self.folder, record["key"], key)
        self.top_k: int = key["top_k"]
        self._shards: list[tuple[Path, int]] = []  # (file, first block)
        first = 0
        for shard in record["shards"]:
            path = self.folder / shard["file"]
            if not path.is_file():
                raise TeacherCacheError(
                    f"{self.folder}: damaged, {shard['file']} is missing; remove the folder to rebuild"
                )
            self._shards.append((path, first))
            first += shard["blocks"]
        self.blocks = first
        self._firsts = [first for _, first in self._shards]
        self._open: dict[int, Any] = {}

    def __len__(self) -> int:
        return self.blocks

    def rows(self, block_index: torch.Tensor, input_ids: torch.Tensor) -> TeacherTopK:
        """The teacher's top-k rows of blocks `block_index`, on `input_ids`' device, after checking that the cache
        holds exactly these token ids for them."""
        rows = [self._row(int(index)) for index in block_index.reshape(-1).tolist()]
        tokens = torch.stack([row[0] for row in rows])
        if tokens.shape != input_ids.shape or not torch.equal(tokens.long(), input_ids.detach().cpu().long()):
            raise TeacherCacheError(
                f"{self.folder}: the cached rows of blocks {block_index.tolist()} hold other tokens than the batch; "
                "the cache is not of this data; remove it to rebuild"
            )
        top = TeacherTopK(*(torch.stack([row[part] for row in rows]) for part in (1, 2, 3)))
        return top.to(input_ids.device)

    def _row(self, index: int) -> tuple[torch.Tensor, ...]:
        if not 0 <= index < self.blocks:
            raise TeacherCacheError(f"{self.folder}: no block {index}; it holds {self.blocks}; remove it to rebuild")
        number = bisect.bisect_right(self._firsts, index) - 1
        path, first = self._shards[number]
        if number not in self._open:
            self._open[number] = safe_open(path, framework="pt")
        handle, row = self._open[number], index - first
        names = ("input_ids", "top_ids", "top_log_probs", "rest_log_prob")
        try:
            return tuple(handle.get_slice(name)[row : row + 1][0] for name in names)
        except (SafetensorError, OSError) as error:
            raise TeacherCacheError(
                f"{path}: cannot read block {index} ({error}); remove the cache to rebuild"
            ) from None


class IndexedBlocks(torch.utils.data.Dataset):
    """Blocks as items {input_ids, labels, block_index}: the index is the block's row in the teacher cache, which
    the Trainer's default collator batches with the rest (`remove_unused_columns` off, so that it reaches the loss)."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        block = self.blocks[index]
        return {"input_ids": block, "labels": block, "block_index": index}


def _read_record(folder: Path) -> dict[str, Any]:
    path = folder / TEACHER_CACHE_NAME
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise TeacherCacheError(f"{path}: cannot read it ({error}); remove the folder to rebuild the cache") from None
    if not isinstance(record, dict) or record.get("xatl_teacher_cache") != CACHE_FORMAT:
        raise TeacherCacheError(
            f"{path}: not a teacher cache of format {CACHE_FORMAT} (another xatl version wrote it?); remove the folder "
            "to rebuild the cache, or choose another --teacher-cache"
        )
    if not isinstance(record.get("key"), dict) or not isinstance(record.get("shards"), list):
        raise TeacherCacheError(f"{path}: damaged (no key or shards); remove the folder to rebuild the cache")
    return record


_KEY_LABELS = {"block_size": "block size", "held_out": "held-out share", "top_k": "top-k",
               "xatl_convert_version": "xatl version"}  # fmt: skip


def _check_key(folder: Path, stored: dict[str, Any], wanted: dict[str, Any]) -> None:
    """Refuse a cache of another run, in one line naming each difference."""
    differences = []
    teacher, other = stored.get("teacher") or {}, wanted["teacher"]
    if teacher.get("path") != other["path"]:
        differences.append(f"teacher {teacher.get('path')} (this run: {other['path']})")
    elif teacher != other:
        changed = [
            name for name in ("config_sha256", "manifest_sha256", "weights") if teacher.get(name) != other.get(name)
        ]
        names = {"config_sha256": "config.json", "manifest_sha256": "manifest", "weights": "weight files"}
        differences.append(f"the teacher's {', '.join(names[name] for name in changed)} changed since it was built")
    blocks, wanted_blocks = stored.get("blocks") or {}, wanted["blocks"]
    if blocks != wanted_blocks:
        differences.append(
            f"kd's training blocks ({blocks.get('count')} blocks, sha256 {str(blocks.get('sha256'))[:12]}…; this run: "
            f"{wanted_blocks['count']}, {wanted_blocks['sha256'][:12]}…: other data, seed, held-out share or steps)"
        )
    for name, label in _KEY_LABELS.items():
        if stored.get(name) != wanted[name]:
            differences.append(f"{label} {stored.get(name)} (this run: {wanted[name]})")
    if differences:
        raise TeacherCacheError(
            f"--teacher-cache {folder}: a cache of another run, it differs in {'; '.join(differences)}; remove it to "
            "rebuild it, or choose another --teacher-cache"
        )


def _file_sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
