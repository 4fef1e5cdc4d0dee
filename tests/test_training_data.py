"""Training data: local text, JSON Lines and Parquet read into documents, packed into blocks; the held-out split
never trains and does not move with the seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from tests.conftest import EXAMPLE_CHECKPOINT
from xatl_convert.training.data import DataError, DataSpec, PackedBlocks, read_documents

pytest.importorskip("datasets")

PARAGRAPHS = [f"Paragraph {i} talks about topic {i % 7} in a few plain words, number {i}." for i in range(120)]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(EXAMPLE_CHECKPOINT)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A folder of two .txt files (paragraphs split by blank lines), a .jsonl file and a .parquet file."""
    folder = tmp_path / "corpus"
    (folder / "more").mkdir(parents=True)
    (folder / "a.txt").write_text("\n\n".join(PARAGRAPHS[:40]) + "\n")
    (folder / "more" / "b.txt").write_text("\n\n".join(PARAGRAPHS[40:80]) + "\n")
    (folder / "c.jsonl").write_text("".join(json.dumps({"text": text, "id": i}) + "\n" for i, text in
                                            enumerate(PARAGRAPHS[80:100])))  # fmt: skip
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": PARAGRAPHS[100:]}), folder / "d.parquet")
    return folder


def test_a_folder_is_read_as_documents_in_a_fixed_order(corpus: Path) -> None:
    documents = list(read_documents(DataSpec(str(corpus))))
    # sorted paths: a.txt, c.jsonl, d.parquet, more/b.txt; a .txt paragraph is a document, so is a row
    assert [text.strip() for text in documents] == PARAGRAPHS[:40] + PARAGRAPHS[80:] + PARAGRAPHS[40:80]
    assert len(list(read_documents(DataSpec(str(corpus), max_documents=5)))) == 5


def test_held_out_never_trains_and_does_not_move_with_the_seed(corpus: Path, tokenizer) -> None:
    spec = DataSpec(str(corpus), block_size=16, held_out=0.2)
    train, held_out = PackedBlocks.build(spec, tokenizer, "train"), PackedBlocks.build(spec, tokenizer, "held_out")
    assert train.documents + held_out.documents == len(PARAGRAPHS) and 10 <= held_out.documents <= 40
    train_rows = {tuple(row.tolist()) for row in train.blocks}
    assert not train_rows & {tuple(row.tolist()) for row in held_out.blocks}
    reseeded = PackedBlocks.build(DataSpec(str(corpus), block_size=16, held_out=0.2, seed=1), tokenizer, "train")
    assert not torch.equal(reseeded.blocks, train.blocks)  # another order ...
    assert {tuple(row.tolist()) for row in reseeded.blocks} == train_rows  # ... of the same blocks
    again = PackedBlocks.build(spec, tokenizer, "train")
    assert torch.equal(again.blocks, train.blocks)  # deterministic
    item = train[0]
    assert item["input_ids"].shape == (16,) and torch.equal(item["labels"], item["input_ids"])
    assert (train.blocks == tokenizer.eos_token_id).any()  # documents are joined by the end-of-sequence token


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (lambda d: (d / "x.jsonl").write_text('{"body": "hello"}\n'), "rows have no 'text' field (fields: body)"),
        (lambda d: (d / "x.jsonl").write_text('{"text": 3}\n'), "field 'text' holds int, not text"),
        (lambda d: (d / "x.jsonl").write_text("{not json\n"), "x.jsonl: cannot read"),
        (
            lambda d: (d / "x.csv").write_text("a,b\n"),
            "no .txt, .md, .rst, .jsonl, .json, .parquet files in this folder",
        ),
    ],
    ids=["missing-field", "not-text", "not-json", "unsupported"],
)
def test_bad_data_is_one_clear_error_naming_the_file(tmp_path: Path, tokenizer, write, message: str) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    write(folder)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PackedBlocks.build(DataSpec(str(folder)), tokenizer, "train")


def test_missing_paths_and_too_little_text_say_what_to_do(tmp_path: Path, tokenizer) -> None:
    with pytest.raises(DataError, match="no such file or folder"):
        list(read_documents(DataSpec(str(tmp_path / "nope.txt"))))
    (tmp_path / "short.txt").write_text("just a few words\n\nand a few more\n")
    with pytest.raises(DataError, match="less than one block of 256; give more text or a smaller block size"):
        PackedBlocks.build(DataSpec(str(tmp_path / "short.txt"), held_out=0.5), tokenizer, "train")
