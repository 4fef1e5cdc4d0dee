"""Training data from a Hub dataset id, through the real `datasets`/huggingface_hub streaming path, against the
fake Hub on 127.0.0.1: the same blocks as the same rows in a local file, and one clear line when it cannot load.

Both clients read HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE when imported, so every Hub read runs in a fresh process
with those variables set (and every other HF_* variable of the caller's environment removed).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tests.conftest import EXAMPLE_CHECKPOINT
from tests.fake_hub import FakeHub
from xatl_convert.conversion import convert
from xatl_convert.training.data import DataSpec, PackedBlocks

pytest.importorskip("datasets")

DATASET = "org/texts"
ROWS = [{"text": f"Row {i} says that topic {i % 5} matters for reason {i * 7 % 11}.", "id": i} for i in range(120)]
JSONL = "".join(json.dumps(row) + "\n" for row in ROWS).encode()

# Build both splits of DATA (argv[1]) with the example tokenizer (argv[2]); print what identifies the blocks.
BUILD = """
import hashlib, json, sys
from transformers import AutoTokenizer
from xatl_convert.training.data import DataSpec, PackedBlocks
spec, tokenizer = DataSpec(sys.argv[1], block_size=16, held_out=0.2), AutoTokenizer.from_pretrained(sys.argv[2])
splits = {split: PackedBlocks.build(spec, tokenizer, split) for split in ("train", "held_out")}
print(json.dumps({split: [len(b), b.documents, hashlib.sha256(b.blocks.numpy().tobytes()).hexdigest()]
                  for split, b in splits.items()}))
"""


def _summary(blocks: PackedBlocks) -> list[object]:
    """What BUILD prints for one split: block count, document count, digest of the blocks in order."""
    return [len(blocks), blocks.documents, hashlib.sha256(blocks.blocks.numpy().tobytes()).hexdigest()]


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    """A fake Hub hosting one dataset repo: the rows as data/train.jsonl, and a card with no YAML header."""
    with FakeHub().start() as server:
        server.add_repo(DATASET, {"data/train.jsonl": JSONL, "README.md": b"# Texts\n"}, repo_type="dataset")
        yield server


def _env(hub: FakeHub, home: Path, offline: bool = False) -> dict[str, str]:
    """The caller's environment without its HF_* settings, pointed at the fake Hub and an empty HF_HOME."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("HF_")}
    return {**env, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1" if offline else "0"}


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_a_hub_dataset_gives_the_same_blocks_as_the_same_rows_in_a_local_file(hub: FakeHub, tmp_path: Path) -> None:
    hub.reset_requests()
    # cwd is an empty folder, so "org/texts" cannot be read as a local path
    result = _run(["-c", BUILD, DATASET, str(EXAMPLE_CHECKPOINT)], _env(hub, tmp_path / "hf"), tmp_path)
    assert result.returncode == 0, result.stderr
    from_hub = json.loads(result.stdout.strip().splitlines()[-1])
    downloads = [path for method, path in hub.file_requests() if method == "GET"]
    assert any(path.startswith(f"/datasets/{DATASET}/resolve/") and path.endswith("/data/train.jsonl")
               for path in downloads), downloads  # fmt: skip

    (tmp_path / "train.jsonl").write_bytes(JSONL)
    spec = DataSpec(str(tmp_path / "train.jsonl"), block_size=16, held_out=0.2)
    tokenizer = AutoTokenizer.from_pretrained(EXAMPLE_CHECKPOINT)
    local = {split: PackedBlocks.build(spec, tokenizer, split) for split in ("train", "held_out")}
    assert from_hub == {split: _summary(blocks) for split, blocks in local.items()}
    assert local["train"].documents + local["held_out"].documents == len(ROWS)
    assert len(local["train"]) > len(local["held_out"]) > 0  # both splits hold blocks, so the digests compare text


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hub-eval") / "out"
    convert(EXAMPLE_CHECKPOINT, out)
    return out


@pytest.mark.parametrize(
    ("dataset", "offline", "message"),
    [
        ("org/missing", False, "Dataset 'org/missing' doesn't exist on the Hub or cannot be accessed"),
        (DATASET, True, f"Couldn't reach '{DATASET}' on the Hub (OfflineModeIsEnabled)"),
    ],
    ids=["missing", "offline-no-cache"],
)
def test_a_hub_dataset_that_cannot_load_is_one_error_line_from_xatl_eval(
    hub: FakeHub, converted: Path, tmp_path: Path, dataset: str, offline: bool, message: str
) -> None:
    """A real `xatl eval` process (the variables must be set before import): exit 2, one `error: ` line naming
    the id, and, offline, not one request to the Hub."""
    hub.reset_requests()
    args = ["-m", "xatl_convert.cli", "eval", str(converted), "--data", dataset, "--block-size", "16"]
    result = _run(args, _env(hub, tmp_path / "hf", offline), tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {dataset}: no such local file or folder, and the Hub dataset of that id")
    assert message in lines[0] and "Traceback" not in result.stdout + result.stderr
    if offline:
        assert hub.requests == []
