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
    """The supported files of a local file or folder (recursively, sorted, so the order never depends on the OS)."""
    if source.is_file():
        files = [source]
    elif source.is_dir():
        files = sorted(path for path in source.rglob("*") if path.is_file() and path.suffix in BUILDERS)
        if not files:
            raise DataError(f"{source}: no {', '.join(BUILDERS)} files in this folder")
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
        for row in _rows(dataset, where):
            if spec.text_field not in row:
                raise DataError(f"{where}: rows have no {spec.text_field!r} field (fields: {', '.join(row)})")
            text = row[spec.text_field]
            if not isinstance(text, str):
                raise DataError(f"{where}: field {spec.text_field!r} holds {type(text).__name__}, not text")
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
    if local.exists() or _looks_local(spec.source):
        for file in data_files(local):
            builder = BUILDERS[file.suffix]
            options = {"sample_by": "paragraph"} if builder == "text" else {}
            try:
                yield (
                    datasets.load_dataset(builder, data_files=[str(file)], split="train", streaming=True, **options),
                    str(file),
                )
            except (ValueError, OSError) as error:
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


class PackedBlocks(torch.utils.data.Dataset):
    """One split of the data as blocks of `block_size` tokens: documents tokenised with the student's tokenizer,
    joined by its end-of-sequence token and cut into blocks (the last partial block is dropped). The training split
    comes in an order shuffled by `seed`; the held-out split (or `all`, every document) in the data's order. Items
    are {input_ids, labels}."""

    def __init__(self, blocks: torch.Tensor, documents: int) -> None:
        self.blocks = blocks
        self.documents = documents

    @classmethod
    def build(cls, spec: DataSpec, tokenizer: Any, split: Split) -> PackedBlocks:
        if spec.block_size < 2:
            raise DataError(f"block size {spec.block_size}: expected at least 2 tokens")
        if not 0 < spec.held_out < 1:
            raise DataError(f"held-out share {spec.held_out}: expected a number between 0 and 1")
        separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        ids: list[int] = []
        documents = 0
        for position, text in enumerate(read_documents(spec)):
            if split != "all" and is_held_out(position, spec.held_out) != (split == "held_out"):
                continue
            ids += tokenizer(text, add_special_tokens=False)["input_ids"] + separator
            documents += 1
        count = len(ids) // spec.block_size
        if count == 0:
            scope = "the text" if split == "all" else f"the {split.replace('_', '-')} split"
            raise DataError(
                f"{spec.source}: {scope} has {len(ids)} tokens from {documents} "
                f"document(s), less than one block of {spec.block_size}; give more text or a smaller block size"
            )
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
