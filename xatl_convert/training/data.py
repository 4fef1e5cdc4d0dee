"""Text to train and evaluate on: local files or a Hub dataset, tokenised and packed into fixed-length blocks, with
a held-out split that never trains.

Reading goes through `datasets` (its text, json and parquet builders; streaming for Hub ids, so HF_HOME,
HF_HUB_OFFLINE and HF_TOKEN behave as for model sources). A document goes to the held-out split by a hash of its
position in the data, never by the seed: changing `--seed` reorders the training blocks but never moves a document
between the splits, so a held-out loss is comparable across runs and arms.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from xatl_convert.errors import XatlError, first_line
from xatl_convert.regular_files import require_regular_file

BUILDERS = {".txt": "text", ".md": "text", ".rst": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
Split = Literal["train", "held_out", "all"]  # "all": every document, for text that never trained


class DataError(XatlError):
    """The training or evaluation data cannot be found, read or used."""


@dataclass(frozen=True)
class DataSpec:
    """What to read and how to cut it. `held_out` is the share of documents kept out of training."""

    source: str
    text_field: str = "text"
    block_size: int = 256
    held_out: float = 0.05
    seed: int = 0
    max_documents: int | None = None
    revision: str | None = None
    cache_dir: str | None = None


def data_files(source: Path) -> list[Path]:
    """The supported files of a local file or folder (recursively, sorted, so the order never depends on the OS).

    Each is checked to be a regular file before anything opens it: a FIFO or a device would block the read or
    never end. In a folder, such an entry with a supported suffix is refused, naming it, rather than skipped."""
    if source.is_dir():
        files = []
        for path in sorted(source.rglob("*")):
            if path.suffix in BUILDERS and path.exists() and not path.is_dir():
                require_regular_file(path, DataError, "remove it from the data folder, or put a regular file there")
                files.append(path)
        if not files:
            raise DataError(f"{source}: no {', '.join(BUILDERS)} files in this folder")
    elif source.exists():
        require_regular_file(source, DataError, "give a text, JSON Lines or Parquet file, or a folder of them")
        files = [source]
    else:
        raise DataError(f"{source}: no such file or folder (expected text, JSON Lines or Parquet files, or a Hub id)")
    for file in files:
        if file.suffix not in BUILDERS:
            raise DataError(f"{file}: unsupported data file; expected one of {', '.join(BUILDERS)}")
    return files


def read_documents(spec: DataSpec) -> Iterator[str]:
    """Every document's text, in the data's own order: a paragraph of a .txt file, a row of JSON Lines or Parquet,
    a row of a Hub dataset's train split."""
    local = Path(spec.source).expanduser()
    count = 0
    for dataset, where in _datasets(spec, local):
        for number, row in enumerate(_rows(dataset, where), 1):
            if spec.text_field not in row:
                raise DataError(f"{where}: rows have no {spec.text_field!r} field (fields: {', '.join(row)})")
            text = row[spec.text_field]
            if text is None:  # a JSON Lines row without the field, when others have it, or a null
                raise DataError(f"{where}: row {number} has no {spec.text_field!r} field (or it is null)")
            if not isinstance(text, str):
                raise DataError(
                    f"{where}: row {number}: field {spec.text_field!r} holds {type(text).__name__}, not text"
                )
            if text.strip():
                yield text
                count += 1
                if spec.max_documents is not None and count >= spec.max_documents:
                    return


def _datasets(spec: DataSpec, local: Path) -> Iterator[tuple[Any, str]]:
    import datasets

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    logging.getLogger("huggingface_hub.repocard").setLevel(logging.ERROR)  # "metadata block was not found", etc.
    # The json and parquet builders log a damaged file ("Failed to load JSON from file ...") before they raise; the
    # raise becomes our one error line, so their log line would only come before it.
    logging.getLogger("datasets.packaged_modules").setLevel(logging.CRITICAL)
    if local.exists() or _looks_local(spec.source):
        for file in data_files(local):
            builder = BUILDERS[file.suffix]
            options = {"sample_by": "paragraph"} if builder == "text" else {}
            try:
                yield (
                    datasets.load_dataset(builder, data_files=[str(file)], split="train", streaming=True, **options),
                    str(file),
                )
            except StopIteration:  # the json builder's look at the first rows of an empty file
                raise DataError(f"{file}: no rows in it (the file is empty)") from None
            except Exception as error:  # pyarrow's ArrowInvalid, datasets' own errors, OSError ...
                raise DataError(f"{file}: cannot read it as {builder} ({first_line(error)})") from None
        return
    try:
        dataset = datasets.load_dataset(
            spec.source, split="train", streaming=True, revision=spec.revision, cache_dir=spec.cache_dir
        )
    except Exception as error:  # datasets raises many kinds (DatasetNotFoundError, ConnectionError, ...)
        raise DataError(
            f"{spec.source}: no such local file or folder, and the Hub dataset of that id cannot be loaded "
            f"({first_line(error)})"
        ) from None
    yield dataset, spec.source


def _looks_local(source: str) -> bool:
    """A path the user meant as local (so a typo is "no such file", not a Hub lookup)."""
    return source.startswith((".", "/", "~")) or source.endswith("/") or Path(source).suffix in BUILDERS


def _rows(dataset: Any, where: str) -> Iterator[dict[str, Any]]:
    try:
        yield from dataset
    except DataError:
        raise
    except Exception as error:  # a damaged file shows only when its rows are read
        raise DataError(f"{where}: cannot read its rows ({first_line(error)})") from None


def is_held_out(position: int, share: float) -> bool:
    """Whether document number `position` is held out: a fixed hash of its position, uniform in [0, 1)."""
    digest = hashlib.sha256(f"xatl-held-out:{position}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < share


def first_held_out(share: float, limit: int = 100_000) -> int | None:
    """The number (from 1) of the first document that `is_held_out` keeps out at this share; None past `limit`."""
    return next((position + 1 for position in range(limit) if is_held_out(position, share)), None)


_DOCUMENTS = "documents are paragraphs separated by blank lines, or rows"


def _too_little_text(spec: DataSpec, split: Split, tokens: int, documents: int, total: int, first_tokens: int) -> str:
    """Why a split has not one block: no text at all, no document in the split (and why), or too few tokens."""
    share = f"{spec.held_out * 100:.3g}%"
    if total == 0:
        return f"{spec.source}: no text in it (every document is empty or blank); give text to read"
    if split == "held_out" and documents == 0:
        first = first_held_out(spec.held_out)
        if total == 1:
            short = f" of {first_tokens} tokens, less than one block of {spec.block_size}"
            short = short if first_tokens < spec.block_size else ""
            enough = f", and at a held-out share of {share} at least {first}" if first and first > 2 else ""
            return (
                f"{spec.source}: 1 document{short}; the held-out split needs at least 2 ({_DOCUMENTS})"
                f"{enough}; give more documents, or use --split all for xatl eval"
            )
        picked = f"; the first it picks is document {first}" if first else ""
        return (
            f"{spec.source}: {total} documents, and none falls in the held-out {share} (a fixed hash of each "
            f"document's position picks them{picked}); give {f'at least {first}' if first else 'more'} documents "
            f"({_DOCUMENTS}), or use --split all for xatl eval"
        )
    if split == "train" and documents == 0:
        return (
            f"{spec.source}: all {total} document(s) fall in the held-out {share}, so none is left to train on; "
            f"give more documents ({_DOCUMENTS}), or hold out a smaller share"
        )
    scope = "the text" if split == "all" else f"the {split.replace('_', '-')} split"
    return (
        f"{spec.source}: {scope} has {tokens} tokens from {documents} document(s), less than one block of "
        f"{spec.block_size}; give more text or a smaller block size"
    )


class PackedBlocks(torch.utils.data.Dataset):
    """One split of the data as blocks of `block_size` tokens: documents tokenised with the student's tokenizer,
    joined by its end-of-sequence token and cut into blocks (the last partial block is dropped). The training split
    comes in an order shuffled by `seed`; the held-out split (or `all`, every document) in the data's order. Items
    are {input_ids, labels}."""

    def __init__(self, blocks: torch.Tensor, documents: int, mixed: int = 0) -> None:
        self.blocks = blocks
        self.documents = documents
        self.mixed = mixed  # of the blocks, how many came from other text (`mix_blocks`)

    @classmethod
    def build(cls, spec: DataSpec, tokenizer: Any, split: Split) -> PackedBlocks:
        if spec.block_size < 2:
            raise DataError(f"block size {spec.block_size}: expected at least 2 tokens")
        if not 0 < spec.held_out < 1:
            raise DataError(f"held-out share {spec.held_out}: expected a number between 0 and 1")
        separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        ids: list[int] = []
        documents = total = 0
        first = ""  # the first document, measured when it is the only one
        for position, text in enumerate(read_documents(spec)):
            total, first = position + 1, text if position == 0 else first
            if split != "all" and is_held_out(position, spec.held_out) != (split == "held_out"):
                continue
            ids += tokenizer(text, add_special_tokens=False)["input_ids"] + separator
            documents += 1
        count = len(ids) // spec.block_size
        if count == 0:
            first_tokens = len(tokenizer(first, add_special_tokens=False)["input_ids"] + separator) if total == 1 else 0
            raise DataError(_too_little_text(spec, split, len(ids), documents, total, first_tokens))
        blocks = torch.tensor(ids[: count * spec.block_size], dtype=torch.long).view(count, spec.block_size)
        if split == "train":
            order = torch.randperm(count, generator=torch.Generator().manual_seed(spec.seed))
            blocks = blocks[order]
        return cls(blocks, documents)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        block = self.blocks[index]
        return {"input_ids": block, "labels": block}

    @property
    def tokens(self) -> int:
        return self.blocks.numel()


def mix_blocks(main: PackedBlocks, other: PackedBlocks, share: float) -> PackedBlocks:
    """The training blocks with `other`'s blocks spread evenly among them, `share` of the result.

    Every main block stays, in its order, and so does every other block: each source's blocks are placed at even
    intervals of one timeline (block j of n at (j + ½) / n), so any window of steps sees the share, not a run of one
    source. `other` is cycled if it has fewer blocks than needed. Only training is mixed: the held-out split stays
    the main data's, so the held-out loss stays comparable with an unmixed run."""
    if not 0 < share < 1:
        raise DataError(f"mix share {share}: expected a number between 0 and 1")
    if main.blocks.shape[1] != other.blocks.shape[1]:
        raise DataError(f"mixed blocks of {other.blocks.shape[1]} tokens into blocks of {main.blocks.shape[1]}")
    wanted = max(1, round(len(main) * share / (1 - share)))
    extra = other.blocks[torch.arange(wanted) % len(other)]
    times = torch.cat([(torch.arange(len(main)) + 0.5) / len(main), (torch.arange(wanted) + 0.5) / wanted])
    order = torch.sort(times, stable=True).indices
    return PackedBlocks(torch.cat([main.blocks, extra])[order], main.documents + other.documents, mixed=wanted)
