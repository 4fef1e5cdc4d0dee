"""Output guarantees: atomic under real signals, dtype casting, model card contents."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import save_neox
from xatl_convert.conversion import convert


@pytest.fixture(scope="module")
def large_neox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~130 MB of weights: written in 1 MB shards, a conversion lasts long enough to be interrupted."""
    folder = tmp_path_factory.mktemp("large") / "source"
    return save_neox(folder, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=2048,
                     vocab_size=8192)  # fmt: skip


def _interruptible() -> None:
    """SIGINT as at a terminal: a shell starts background jobs (CI may run the tests as one) with SIGINT ignored, and
    a child inherits that, so Python would never raise KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_real_signal_mid_write_leaves_neither_output_nor_temporary_folder(
    large_neox: Path, tmp_path: Path, signum: int
) -> None:
    command = [sys.executable, "-m", "xatl_convert.cli", "convert", str(large_neox), "--out", "out"]
    process = subprocess.Popen(
        [*command, "--max-shard-size", "1M"], cwd=tmp_path, stderr=subprocess.PIPE, preexec_fn=_interruptible
    )
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".out.xatl-partial-*/model-*.safetensors")):
        assert process.poll() is None, "conversion ended before any shard was written"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    os.kill(process.pid, signum)
    process.wait(timeout=60)
    assert process.returncode != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_output_keeps_the_source_dtype_by_default(tmp_path: Path) -> None:
    source = save_neox(tmp_path / "fp16", seed=1)
    model_file = source / "model.safetensors"
    save_file({name: tensor.half() for name, tensor in load_file(model_file).items()}, model_file)
    convert(source, tmp_path / "out")
    output = load_file(tmp_path / "out" / "model.safetensors")
    assert {tensor.dtype for tensor in output.values()} == {torch.float16}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float16"


def test_dtype_option_casts_every_tensor(neox_checkpoint: Path, tmp_path: Path) -> None:
    plan = convert(neox_checkpoint, tmp_path / "out", dtype=torch.bfloat16, attn_layers="1")
    output = load_file(tmp_path / "out" / "model.safetensors")
    assert {tensor.dtype for tensor in output.values()} == {torch.bfloat16}
    embed = load_file(neox_checkpoint / "model.safetensors")["gpt_neox.embed_in.weight"]
    assert torch.equal(output["model.embed_tokens.weight"], embed.to(torch.bfloat16))
    assert plan.total_bytes() == sum(tensor.numel() * 2 for tensor in output.values())


def test_model_card_counts_transferred_and_initialised_tensors_and_bytes(neox_checkpoint: Path, tmp_path: Path) -> None:
    plan = convert(neox_checkpoint, tmp_path / "out", command_line="xatl convert src --out out")
    card = (tmp_path / "out" / "README.md").read_text()
    transferred, initialised = plan.by_status("transferred"), plan.by_status("initialised")
    assert f"| transferred from the source | {len(transferred)} | {plan.total_bytes('transferred'):,} |" in card
    assert f"| initialised | {len(initialised)} | {plan.total_bytes('initialised'):,} |" in card
    assert "xatl convert src --out out" in card
    front_matter = card.split("---")[1]
    assert f"base_model: {neox_checkpoint}" in front_matter and "- mamba" in front_matter
