"""The `xatl` command line: help, bad input (one clear line, exit ≠ 0, nothing left behind), mappings commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import VERIFY_CHECK_NAMES
from xatl_convert.cli import app
from xatl_convert.mapping import builtin_mappings

runner = CliRunner()


def _error_line(result) -> str:
    """The whole of stderr, checked to be a single line without a traceback."""
    assert result.exit_code != 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output + result.stderr
    return lines[0]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".xatl-" in p.name)


def test_help_lists_commands_and_convert_options() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("convert", "verify", "mappings"):
        assert command in result.stdout
    result = runner.invoke(app, ["convert", "--help"], terminal_width=200)
    for option in ("--out", "--to", "--mapping", "--attn-layers", "--set", "--dtype", "--force", "--dry-run"):
        assert option in result.stdout


def test_convert_then_verify_from_the_command_line(neox_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, ["convert", str(neox_checkpoint), "--out", str(out), "--attn-layers", "1"])
    assert result.exit_code == 0, result.output
    assert "transferred" in result.stdout
    manifest = json.loads((out / "xatl_manifest.json").read_text())
    assert manifest["command_line"] == f"xatl convert {neox_checkpoint} --out {out} --attn-layers 1"
    report_path = tmp_path / "report.json"
    result = runner.invoke(app, ["verify", str(out), "--json", str(report_path)], terminal_width=200)
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["passed"] is True
    assert [check["name"] for check in report["checks"]] == VERIFY_CHECK_NAMES
    assert "tensors as planned" in result.stdout


def test_source_without_config_json_fails_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["convert", str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
    assert "no config.json" in _error_line(result)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_unsupported_model_type_fails_with_one_line(tmp_path: Path) -> None:
    from transformers import BloomConfig, BloomForCausalLM

    source = tmp_path / "bloom"  # ALiBi and an embedding LayerNorm: no built-in mapping
    BloomForCausalLM(BloomConfig(n_layer=1, hidden_size=16, n_head=2, vocab_size=50)).save_pretrained(source)
    result = runner.invoke(app, ["convert", str(source), "--out", str(tmp_path / "out")])
    line = _error_line(result)
    assert "model_type 'bloom' has no built-in mapping to 'mamba'" in line and "--mapping FILE" in line
    assert not (tmp_path / "out").exists()


def test_mapping_with_unknown_key_fails_with_file_and_line(neox_checkpoint: Path, tmp_path: Path) -> None:
    data = yaml.safe_load(builtin_mappings()["gpt-neox-to-mamba"].read_text())
    data["rules"][1]["wehre"] = "attention"
    mapping = tmp_path / "mine.yaml"
    mapping.write_text(yaml.safe_dump(data, sort_keys=False))
    result = runner.invoke(
        app, ["convert", str(neox_checkpoint), "--out", str(tmp_path / "out"), "--mapping", str(mapping)]
    )
    line = _error_line(result)
    assert f"{mapping}:" in line and "unknown key 'rules.1.wehre'; did you mean 'where'?" in line
    assert not (tmp_path / "out").exists()


def test_attention_layer_out_of_range_fails_with_one_line(neox_checkpoint: Path, tmp_path: Path) -> None:
    arguments = ["convert", str(neox_checkpoint), "--out", str(tmp_path / "out"), "--attn-layers", "1,4"]
    result = runner.invoke(app, arguments)
    assert "attention layer 4 is out of range: the model has layers 0..3" in _error_line(result)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_existing_output_is_kept_without_force(neox_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert runner.invoke(app, ["convert", str(neox_checkpoint), "--out", str(out)]).exit_code == 0
    (out / "precious.txt").write_text("keep me")
    result = runner.invoke(app, ["convert", str(neox_checkpoint), "--out", str(out)])
    assert "already exists; pass --force" in _error_line(result)
    assert (out / "precious.txt").read_text() == "keep me"
    result = runner.invoke(app, ["convert", str(neox_checkpoint), "--out", str(out), "--force"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "xatl_manifest.json").read_text())["command_line"].endswith(" --force")
    assert not (out / "precious.txt").exists() and (out / "model.safetensors").is_file()
    assert _leftovers(tmp_path) == []


def test_dry_run_prints_the_plan_and_writes_nothing(neox_checkpoint: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["convert", str(neox_checkpoint), "--out", str(tmp_path / "out"), "--dry-run"], terminal_width=250
    )
    assert result.exit_code == 0, result.output
    assert "model.layers.{i}.mixer.A_log" in result.stdout and "initialised" in result.stdout
    assert "gpt_neox.embed_in.weight" in result.stdout and "transferred" in result.stdout
    assert "model.layers.0.mixer.A_log" not in result.stdout  # folded per {i} pattern unless --all
    assert not (tmp_path / "out").exists()


def test_set_overrides_reach_the_config(neox_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, ["convert", str(neox_checkpoint), "--out", str(out), "--set", "mamba.d_state=8"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["mamba"]["d_state"] == 8
    command = json.loads((out / "xatl_manifest.json").read_text())["command_line"]
    assert command == f"xatl convert {neox_checkpoint} --out {out} --set mamba.d_state=8"


def test_mappings_list_and_show() -> None:
    result = runner.invoke(app, ["mappings", "list"], terminal_width=200)
    assert result.exit_code == 0 and "gpt-neox-to-mamba" in result.stdout
    rows = [[cell.strip() for cell in line.split("│")[1:4]] for line in result.stdout.splitlines()]
    assert ["gpt-neox-to-mamba", "gpt_neox", "mamba"] in rows
    result = runner.invoke(app, ["mappings", "show", "gpt-neox-to-mamba"], terminal_width=200)
    assert result.exit_code == 0 and "split_heads" in result.stdout
    result = runner.invoke(app, ["mappings", "show", "gpt-neox-to-mambo"])
    assert "did you mean 'gpt-neox-to-mamba'?" in _error_line(result)


@pytest.mark.parametrize("with_source", [False, True])
def test_mappings_validate(neox_checkpoint: Path, with_source: bool) -> None:
    arguments = ["mappings", "validate", str(builtin_mappings()["gpt-neox-to-mamba"])]
    if with_source:
        arguments += ["--source", str(neox_checkpoint)]
    result = runner.invoke(app, arguments, terminal_width=200)
    assert result.exit_code == 0, result.output
    assert ("covers" in result.stdout) == with_source


def test_user_mapping_file_drives_the_conversion(neox_checkpoint: Path, tmp_path: Path) -> None:
    data = yaml.safe_load(builtin_mappings()["gpt-neox-to-mamba"].read_text())
    data["name"] = "my-neox"
    data["target"]["config"]["mamba"]["d_state"] = 4
    data["target"]["attention_layers"] = "paper"
    mapping = tmp_path / "my-neox.yaml"
    mapping.write_text(yaml.safe_dump(data, sort_keys=False))
    out = tmp_path / "out"
    result = runner.invoke(app, ["convert", str(neox_checkpoint), "--out", str(out), "--mapping", str(mapping)])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["mamba"]["d_state"] == 4
    assert config["layer_types"] == ["mamba", "attention", "mamba", "mamba"]
    manifest = json.loads((out / "xatl_manifest.json").read_text())
    assert manifest["mapping"]["name"] == "my-neox-to-mamba" and manifest["mapping"]["file"] == str(mapping)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("2G", 2 * 1024**3), ("500M", 500 * 1024**2), ("1.5K", 1536), ("4096", 4096), ("1gb", 1024**3)],
)
def test_max_shard_size_takes_bytes_with_suffixes(text: str, expected: int) -> None:
    from xatl_convert.cli import parse_size

    assert parse_size(text) == expected


def test_max_shard_size_rejects_nonsense(neox_checkpoint: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["convert", str(neox_checkpoint), "--out", str(tmp_path / "o"), "--max-shard-size", "lots"]
    )
    assert result.exit_code == 2 and "expected bytes with an optional K/M/G/T suffix" in result.output
