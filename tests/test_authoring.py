"""Tools for writing a new mapping: inspect, mappings new (scaffold), mappings schema."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from tests.conftest import EXAMPLE_CHECKPOINT
from xatl_convert.cli import app
from xatl_convert.mapping import parse_mapping

runner = CliRunner()


def test_inspect_prints_the_layer_tree_and_the_applicable_mapping(neox_checkpoint: Path) -> None:
    result = runner.invoke(app, ["inspect", str(neox_checkpoint)])
    assert result.exit_code == 0, result.output
    assert "model_type 'gpt_neox', 4 layers" in result.stdout
    assert "gpt_neox.layers.{i}.attention.query_key_value.weight  [96, 32] float32" in result.stdout
    assert "gpt_neox.embed_in.weight  [96, 32] float32" in result.stdout
    assert "gpt-neox-to-mamba: applies (→ mamba: 44 tensors transferred, 32 initialised)" in result.stdout


def test_inspect_of_an_unsupported_model_suggests_a_scaffold(tmp_path: Path) -> None:
    from transformers import BloomConfig, BloomForCausalLM

    BloomForCausalLM(BloomConfig(n_layer=2, hidden_size=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "b")
    result = runner.invoke(app, ["inspect", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert "transformer.h.{i}.self_attention.query_key_value.weight  [48, 16] float32" in result.stdout
    assert "none for this model_type" in result.stdout and "xatl mappings new" in result.stdout


def test_scaffold_of_a_known_layout_is_complete_and_validates(tmp_path: Path) -> None:
    out = tmp_path / "new.yaml"
    result = runner.invoke(app, ["mappings", "new", "--source", str(EXAMPLE_CHECKPOINT), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert not [line for line in out.read_text().splitlines() if "TODO" in line.split("#")[0]]  # none to fill in
    mapping = parse_mapping(out.read_text(), str(out))
    rules = {(rule.target, rule.source, rule.where) for rule in mapping.rules}
    assert ("model.embed_tokens.weight", "gpt_neox.embed_in.weight", None) in rules
    assert ("lm_head.weight", "embed_out.weight", None) in rules
    assert mapping.name.startswith("my-")  # never the built-in mapping's name
    result = runner.invoke(app, ["mappings", "validate", str(out), "--source", str(EXAMPLE_CHECKPOINT)])
    assert result.exit_code == 0, result.output


def test_scaffold_with_todos_filled_in_converts(tmp_path: Path) -> None:
    """Fill in what the scaffold marked, as a user would, and the mapping validates against its source."""
    text = runner.invoke(app, ["mappings", "new", "--source", str(EXAMPLE_CHECKPOINT)]).stdout
    data = yaml.safe_load(text)
    data["description"] = "filled in"
    data["target"]["config"].update(
        norm_type="layernorm", hidden_act="gelu", mlp_gated=False, parallel_residual=True,
        mamba={"d_state": 16, "d_conv": 4, "expand": 1, "dt_rank": "auto", "out_proj_bias": True},
    )  # fmt: skip
    data["rules"] = [rule for rule in data["rules"] if rule["target"] != "TODO"]
    data["drop"] = [{"source": "gpt_neox.layers.{i}.attention.query_key_value.*"}]
    path = tmp_path / "filled.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    result = runner.invoke(app, ["mappings", "validate", str(path), "--source", str(EXAMPLE_CHECKPOINT)])
    assert result.exit_code == 0, result.output
    assert "44 transferred, 32 initialised, 8 dropped" in result.stdout


def test_schema_command_prints_the_json_schema_with_strict_objects() -> None:
    result = runner.invoke(app, ["mappings", "schema"])
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {"name", "source", "target", "rules"}
    assert schema["$defs"]["TensorRule"]["additionalProperties"] is False
    assert "on_mismatch" in schema["$defs"]["TensorRule"]["properties"]
