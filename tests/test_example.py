"""The shipped example checkpoint and README's quickstart."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import torch
from typer.testing import CliRunner

from tests.conftest import EXAMPLE_CHECKPOINT, REPO_ROOT
from xatl_convert.cli import app
from xatl_convert.conversion import convert
from xatl_convert.verify import verify


def test_example_checkpoint_is_small_and_trained_far_below_a_random_model() -> None:
    size = sum(path.stat().st_size for path in EXAMPLE_CHECKPOINT.iterdir())
    assert size < 10 * 1024 * 1024
    info = json.loads((EXAMPLE_CHECKPOINT / "training_info.json").read_text())
    config = json.loads((EXAMPLE_CHECKPOINT / "config.json").read_text())
    assert config["model_type"] == "gpt_neox"
    assert info["training"]["val_loss"] < 0.5 * torch.log(torch.tensor(float(config["vocab_size"]))).item()


def test_readme_quickstart_converts_and_verifies_the_example(tmp_path: Path, monkeypatch) -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    line = re.search(r"<!-- ci:quickstart -->\n```bash\n(.+)\n```", readme).group(1)
    xatl_commands = [shlex.split(part.strip())[1:] for part in line.split("&&") if part.strip().startswith("xatl ")]
    assert [command[0] for command in xatl_commands] == ["convert", "verify"]
    monkeypatch.chdir(tmp_path)  # the quickstart's paths are relative to the repo root
    (tmp_path / "examples").symlink_to(REPO_ROOT / "examples")
    runner = CliRunner()
    for command in xatl_commands:
        result = runner.invoke(app, command)
        assert result.exit_code == 0, result.output
    output = tmp_path / xatl_commands[1][1]
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in output.iterdir()}


def test_example_all_attention_conversion_is_exact_and_tokenizer_is_copied(tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(EXAMPLE_CHECKPOINT, out, attn_layers="all")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (EXAMPLE_CHECKPOINT / name).read_bytes()
    report = verify(out, EXAMPLE_CHECKPOINT)
    assert report.check("source twin = source").details["output_logits"] <= 1e-5
    losses = report.check("sample losses finite").details["losses"]
    assert losses["converted"] < losses["from_scratch"] - 2  # a trained model, on real text
