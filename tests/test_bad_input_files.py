"""Input files that are not regular files, damaged data files, a malformed XATL_HUB_KERNELS and a corpus too small to
hold out: each is one `error:` line at once, naming what is at fault, and never a hang.

A FIFO blocks whoever opens it for reading, so a regression here would hang rather than fail: every test runs under
an alarm that ends it. Devices are stood in for by /dev/null (a character device whose read ends at once), so that a
regression cannot read forever either.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.bad_input import error_line, invoke, tree_digest
from tests.conftest import EXAMPLE_CHECKPOINT
from xatl_convert.errors import XatlError
from xatl_convert.regular_files import require_regular_file
from xatl_convert.training.data import DataError, DataSpec, PackedBlocks, data_files, first_held_out, is_held_out

DEVICE = Path("/dev/null")  # a character device, as /dev/zero and /dev/urandom are, but one whose reads end


class Hung(BaseException):
    """Raised by the alarm: not an Exception, so that no `except Exception` in the CLI can swallow it."""


@pytest.fixture(autouse=True)
def no_hang() -> Iterator[None]:
    """End a test that blocks (opening a FIFO for reading waits for a writer) instead of hanging the suite."""

    def hung(signum: int, frame: object) -> None:
        raise Hung("the command blocked: it opened a file that is not a regular file")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


@pytest.fixture(scope="module")
def model(distill_student: Path) -> Path:
    """A converted folder (the example, layer 1 kept as attention): verify, eval and distill read it."""
    return distill_student


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A private copy of the example checkpoint, to replace its files by FIFOs."""
    return Path(shutil.copytree(EXAMPLE_CHECKPOINT, tmp_path / "source"))


# ---------------------------------------------------------------- the shared check


def test_require_regular_file_names_each_kind_and_passes_a_link_to_a_file(tmp_path: Path) -> None:
    (tmp_path / "file.txt").write_text("text")
    (tmp_path / "link.txt").symlink_to(tmp_path / "file.txt")
    require_regular_file(tmp_path / "file.txt", XatlError, "give a file")
    require_regular_file(tmp_path / "link.txt", XatlError, "give a file")
    with tempfile.TemporaryDirectory() as short:  # a socket's path must stay under about 100 bytes
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(os.path.join(short, "s"))
        cases = {
            fifo(tmp_path / "pipe"): "a FIFO",
            DEVICE: "a character device",
            Path(short) / "s": "a socket",
            tmp_path: "a folder",
        }
        for path, kind in cases.items():
            with pytest.raises(XatlError) as raised:
                require_regular_file(path, XatlError, "give a file", name=f"--text {path}")
            assert str(raised.value) == f"--text {path}: not a regular file ({kind}); give a file"
        listener.close()
    with pytest.raises(DataError, match="no such file; give a file"):
        require_regular_file(tmp_path / "missing", DataError, "give a file")


# ---------------------------------------------------------------- verify --text, eval/distill --data


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_verify_refuses_a_text_that_is_not_a_regular_file(model: Path, tmp_path: Path, kind: str) -> None:
    text = fifo(tmp_path / "text.txt") if kind == "fifo" else DEVICE
    what = "a FIFO" if kind == "fifo" else "a character device"
    line = error_line(invoke("verify", model, "--text", text))
    assert line == f"error: --text {text}: not a regular file ({what}); give a UTF-8 text file"


@pytest.mark.parametrize("kind", ["fifo", "device", "fifo-in-folder", "link-to-device-in-folder"])
def test_eval_refuses_data_that_is_not_a_regular_file(model: Path, tmp_path: Path, kind: str) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.txt").write_text("a regular file beside it\n")
    if kind == "fifo":
        data, bad, what = fifo(tmp_path / "pipe.txt"), tmp_path / "pipe.txt", "a FIFO"
    elif kind == "device":
        data, bad, what = DEVICE, DEVICE, "a character device"
    elif kind == "fifo-in-folder":
        data, bad, what = folder, fifo(folder / "sub.txt"), "a FIFO"
    else:
        (folder / "z.jsonl").symlink_to(DEVICE)
        data, bad, what = folder, folder / "z.jsonl", "a character device"
    line = error_line(invoke("eval", model, "--data", data))
    assert line.startswith(f"error: {bad}: not a regular file ({what}); "), line
    assert ("remove it from the data folder" in line) == (data == folder)


def test_a_data_folder_skips_entries_of_other_suffixes_and_folders_named_like_data(tmp_path: Path) -> None:
    fifo(tmp_path / "pipe")  # no data suffix: not data, as an unsupported regular file is not
    (tmp_path / "notes.txt").mkdir()  # a folder with a data suffix is walked, not read
    (tmp_path / "notes.txt" / "a.md").write_text("text\n")
    assert data_files(tmp_path) == [tmp_path / "notes.txt" / "a.md"]


def test_distill_refuses_data_that_is_a_fifo(model: Path, tmp_path: Path) -> None:
    data = fifo(tmp_path / "pipe.jsonl")
    line = error_line(
        invoke("distill", model, "--teacher", EXAMPLE_CHECKPOINT, "--data", data, "--out", tmp_path / "o")
    )
    assert line.startswith(f"error: {data}: not a regular file (a FIFO); "), line
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- mappings


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_mapping_that_is_not_a_regular_file_is_refused(source: Path, tmp_path: Path, kind: str) -> None:
    mapping = fifo(tmp_path / "m.yaml") if kind == "fifo" else DEVICE
    what = "a FIFO" if kind == "fifo" else "a character device"
    expected = f"error: {mapping}: not a regular file ({what}); give a mapping YAML file"
    assert error_line(invoke("mappings", "validate", mapping)) == expected
    out = tmp_path / "out"
    assert error_line(invoke("convert", source, "--to", "mamba", "--out", out, "--mapping", mapping)) == expected
    assert not out.exists()


# ---------------------------------------------------------------- source checkpoints


def _single_shard_index(source: Path) -> str:
    """Replace model.safetensors by an index naming one shard, which becomes a FIFO."""
    with safe_open(source / "model.safetensors", "pt") as weights:
        names = list(weights.keys())
    (source / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": dict.fromkeys(names, "model-00001-of-00001.safetensors")}
    (source / "model.safetensors.index.json").write_text(json.dumps(index))
    return "model-00001-of-00001.safetensors"


@pytest.mark.parametrize(
    "replace",
    ["model.safetensors", "shard", "pytorch_model.bin", "config.json", "tokenizer.json", "generation_config.json"],
)
def test_a_source_file_that_is_a_fifo_is_refused_by_name(source: Path, tmp_path: Path, replace: str) -> None:
    if replace == "shard":
        replace = _single_shard_index(source)
    elif replace == "pytorch_model.bin":
        (source / "model.safetensors").unlink()
    (source / replace).unlink(missing_ok=True)
    fifo(source / replace)
    before = tree_digest(source)  # skips the FIFO: it is not a file to hash
    out = tmp_path / "out"
    line = error_line(invoke("convert", source, "--to", "mamba", "--out", out))
    assert line == f"error: {source / replace}: not a regular file (a FIFO); replace it by the checkpoint's own file"
    assert not out.exists() and tree_digest(source) == before


def test_verify_refuses_a_source_config_that_is_a_fifo(model: Path, source: Path) -> None:
    (source / "config.json").unlink()
    fifo(source / "config.json")
    line = error_line(invoke("verify", model, "--source", source))
    assert f"{source / 'config.json'}: not a regular file (a FIFO)" in line


# ---------------------------------------------------------------- damaged data files: one line, no library log


@pytest.fixture
def data_log() -> Iterator[list[logging.LogRecord]]:
    """What `datasets`' builders log while xatl reads data (it would print before the error line)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    builders = logging.getLogger("datasets.packaged_modules")
    builders.addHandler(handler)
    yield records
    builders.removeHandler(handler)


DAMAGED = [  # (file name, bytes, the error after "NAME: ")
    ("bad.jsonl", b'{"text": "a"\nnot json\n', "cannot read its rows (JSON parse error: "),
    (
        "second.jsonl",
        b'{"text": "a"}\nnot json\n',
        "cannot read its rows (JSON parse error: Invalid value. in row 1",
    ),
    ("bad.parquet", bytes(range(256)) * 12, "cannot read it as parquet (Parquet magic bytes not found"),
    ("tiny.parquet", b"PAR1garbagePAR1", "cannot read it as parquet (Parquet file size is 15 bytes"),
    ("body.jsonl", b'{"body": "a"}\n', "rows have no 'text' field (fields: body)"),
    ("partial.jsonl", b'{"text": "a"}\n{"body": "b"}\n', "row 2 has no 'text' field (or it is null)"),
    ("number.jsonl", b'{"text": "a"}\n{"text": 3}\n', "row 2: field 'text' holds int, not text"),
    ("empty.jsonl", b"", "no rows in it (the file is empty)"),
    ("bad.txt", b"caf\xe9\n", "cannot read its rows ("),
    ("blank.txt", b"\n\n  \n", "no text in it (every document is empty or blank)"),
]


@pytest.mark.parametrize(("name", "content", "message"), [pytest.param(*case, id=case[0]) for case in DAMAGED])
def test_a_damaged_data_file_is_one_line_without_a_library_log(
    model: Path, tmp_path: Path, data_log: list[logging.LogRecord], name: str, content: bytes, message: str
) -> None:
    (tmp_path / name).write_bytes(content)
    line = error_line(invoke("eval", model, "--data", tmp_path / name))
    assert line.startswith(f"error: {tmp_path / name}: {message}"), line
    assert [record.getMessage() for record in data_log] == []


# ---------------------------------------------------------------- XATL_HUB_KERNELS


@pytest.mark.parametrize("value", ["garbage", "a/b/c", "a b/c", "org/name@", "org/name@v2", "org/name@99999999"])
@pytest.mark.parametrize("command", ["verify", "convert"])
def test_a_malformed_hub_kernels_setting_names_the_variable(model: Path, tmp_path: Path, value: str, command: str):
    arguments = ["verify", model] if command == "verify" else ["convert", EXAMPLE_CHECKPOINT, "--out", tmp_path / "o"]
    line = error_line(invoke(*arguments, env={"XATL_HUB_KERNELS": value}))
    assert line.startswith(f"error: XATL_HUB_KERNELS={value!r}: expected 1, 0, a kernel repository"), line
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- a corpus with no held-out split


def test_the_first_held_out_document_is_the_hash_s_first_pick() -> None:
    first = first_held_out(0.05)
    assert first is not None and is_held_out(first - 1, 0.05)
    assert not any(is_held_out(position, 0.05) for position in range(first - 1))


def test_one_document_has_no_held_out_split_and_says_why(model: Path, tmp_path: Path) -> None:
    text = tmp_path / "one.txt"
    text.write_text(" ".join(["a paragraph of words that runs on"] * 60) + "\n")  # one document, several blocks
    first = first_held_out(0.05)
    expected = (
        f"error: {text}: 1 document; the held-out split needs at least 2 (documents are paragraphs separated by "
        f"blank lines, or rows), and at a held-out share of 5% at least {first}; give more documents, or use "
        "--split all for xatl eval"
    )
    assert error_line(invoke("eval", model, "--data", text)) == expected
    out = tmp_path / "o"
    distilled = invoke("distill", model, "--teacher", EXAMPLE_CHECKPOINT, "--data", text, "--out", out)
    assert error_line(distilled) == expected and not out.exists()
    result = invoke("eval", model, "--data", text, "--split", "all", "--max-blocks", "1")
    assert result.exit_code == 0, result.output  # the remedy the message gives works


def test_a_short_single_document_says_both_problems(model: Path, tmp_path: Path) -> None:
    (tmp_path / "short.txt").write_text("too short")
    line = error_line(invoke("eval", model, "--data", tmp_path / "short.txt"))
    assert line.startswith(f"error: {tmp_path / 'short.txt'}: 1 document of "), line
    assert "tokens, less than one block of 256; the held-out split needs at least 2" in line


def test_documents_that_all_miss_the_held_out_share_say_how_many_are_needed(model: Path, tmp_path: Path) -> None:
    first = first_held_out(0.05)
    assert first is not None and first > 3
    text = tmp_path / "few.txt"
    text.write_text("\n\n".join(f"paragraph {n}: " + "words " * 40 for n in range(first - 1)))
    line = error_line(invoke("eval", model, "--data", text))
    assert line == (
        f"error: {text}: {first - 1} documents, and none falls in the held-out 5% (a fixed hash of each document's "
        f"position picks them; the first it picks is document {first}); give at least {first} documents (documents "
        "are paragraphs separated by blank lines, or rows), or use --split all for xatl eval"
    )
    with pytest.raises(DataError, match=r"all 2 document\(s\) fall in the held-out 99%, so none is left to train on"):
        PackedBlocks.build(DataSpec(str(text), held_out=0.99, max_documents=2), _NoTokenizer(), "train")


class _NoTokenizer:
    """Never called: every document is held out, so none is tokenised."""

    eos_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        raise AssertionError("a held-out document was tokenised for training")
