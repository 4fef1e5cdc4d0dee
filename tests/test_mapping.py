"""Mapping files: schema errors with file:line:column, safe expressions, and coverage checked before writing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from xatl_convert.errors import MappingError, PlanError
from xatl_convert.manifest import read_manifest
from xatl_convert.mapping import builtin_mappings, load_mapping, parse_mapping
from xatl_convert.mapping.expressions import ExpressionError, evaluate, substitute
from xatl_convert.mapping.layers import attention_layer_indices
from xatl_convert.plan import build_plan
from xatl_convert.sources import resolve_source
from xatl_convert.verify import verify

BUILTIN = builtin_mappings()["gpt-neox-to-mamba"]


def _builtin_text() -> str:
    return BUILTIN.read_text()


def test_builtin_mapping_loads_and_records_rule_lines() -> None:
    mapping = load_mapping("gpt-neox-to-mamba")
    assert mapping.name == "gpt-neox-to-mamba"
    first = mapping.rules[0]
    line = int(first.location.rsplit(":", 1)[1])
    assert "model.embed_tokens.weight" in BUILTIN.read_text().splitlines()[line - 1]


def test_unknown_key_names_line_column_and_nearest_key() -> None:
    text = _builtin_text().replace("  - {target: model.embed_tokens.weight,", "  - {targte: model.embed_tokens.weight,")
    line = next(i for i, row in enumerate(text.splitlines(), 1) if "targte" in row)
    with pytest.raises(MappingError) as error:
        parse_mapping(text, "my.yaml")
    assert str(error.value).startswith(f"my.yaml:{line}:")
    assert "unknown key 'rules.0.targte'; did you mean 'target'?" in str(error.value)


def test_unknown_top_level_key_is_an_error_not_ignored() -> None:
    with pytest.raises(MappingError, match=r"my.yaml:\d+:1: unknown key 'rulez'; did you mean 'rules'\?"):
        parse_mapping(_builtin_text().replace("\nrules:", "\nrulez:"), "my.yaml")


def test_invalid_yaml_names_line_and_column() -> None:
    with pytest.raises(MappingError, match=r"^bad.yaml:4:1: invalid YAML"):
        parse_mapping("name: x\nsource: {model_type: gpt_neox}\nrules: [ {target: a\n", "bad.yaml")


def test_missing_required_key_is_named() -> None:
    with pytest.raises(MappingError, match=r"missing required key 'source'"):
        parse_mapping("name: x\ntarget: {}\nrules: []\n", "m.yaml")


def test_bad_transform_in_rule_names_its_line() -> None:
    text = "name: x\nsource: {model_type: gpt_neox}\ntarget: {}\nrules:\n  - target: a\n    source: b\n"
    text += "    transform: splitt\n"
    with pytest.raises(MappingError, match=r"m.yaml:7:\d+: rules.0.transform: unknown transform 'splitt'"):
        parse_mapping(text, "m.yaml")


def test_rule_with_undefined_option_is_rejected() -> None:
    text = "name: x\nsource: {model_type: gpt_neox}\ntarget: {}\nrules:\n  - {target: a, source: b, when: nope}\n"
    with pytest.raises(MappingError, match="option 'nope', which 'options' does not define"):
        parse_mapping(text, "m.yaml")


def test_expressions_do_integer_arithmetic_on_source_keys() -> None:
    namespace = {"source": {"num_hidden_layers": 24, "rope": {"theta": 10000.0}}}
    assert evaluate("source.num_hidden_layers // 2 - 1", namespace) == 11
    assert substitute({"a": ["${source.rope.theta}", "x${source.num_hidden_layers}"]}, namespace) == {
        "a": [10000.0, "x24"]
    }


def test_conditional_chooses_by_comparison() -> None:
    namespace = {"source": {"model_type": "qwen2", "attention_bias": False}}
    assert evaluate('True if source.model_type == "qwen2" else source.attention_bias', namespace) is True
    namespace["source"]["model_type"] = "llama"
    assert evaluate('True if source.model_type == "qwen2" else source.attention_bias', namespace) is False
    assert evaluate('1 if source.model_type != "llama" else 2', namespace) == 2


def test_or_takes_the_first_alternative_that_exists() -> None:
    namespace = {"source": {"hidden_size": 64, "num_attention_heads": 4, "attention_bias": False, "head_dim": None}}
    assert evaluate("source.head_dim or source.hidden_size // source.num_attention_heads", namespace) == 16
    assert evaluate("source.attention_bias or True", namespace) is False  # present, so kept even though falsy
    assert evaluate("source.mlp_bias or False", namespace) is False
    with pytest.raises(ExpressionError, match="none of the alternatives exists"):
        evaluate("source.a or source.b", namespace)


def test_expressions_take_null_powers_not_and_ordered_comparisons() -> None:
    namespace = {"source": {"hidden_size": 64, "window": None, "parallel": False, "heads": 4}}
    assert evaluate("source.window or None", namespace) is None  # present but null: null, not an error
    assert evaluate("source.sliding_window or None", namespace) is None  # absent: the null alternative
    assert evaluate("source.hidden_size ** 0.5", namespace) == 8.0  # Gemma's embedding scale
    assert evaluate("not source.parallel", namespace) is True
    assert evaluate("source.heads * 32 % source.hidden_size == 0 and source.heads >= 2", namespace) is True
    assert evaluate("2 if source.heads < 2 else 3", namespace) == 3
    with pytest.raises(ExpressionError, match="exponent beyond"):
        evaluate("source.hidden_size ** 100", namespace)
    with pytest.raises(ExpressionError, match="arithmetic on a non-number"):
        evaluate("source.window < 3", namespace)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("__import__('os').system('true')", "not Call"),
        ("source.hidden", "unknown key 'source.hidden'; did you mean 'source.hidden_size'"),
        ("source.hidden_size // 0", "division by zero"),
        ("source.hidden_size[0]", "not Subscript"),
        ("lambda: 1", "not Lambda"),
    ],
)
def test_expressions_refuse_anything_but_arithmetic(text: str, message: str) -> None:
    with pytest.raises(ExpressionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        evaluate(text, {"source": {"hidden_size": 64}})


def test_attention_layer_presets() -> None:
    assert attention_layer_indices("paper", 24) == [1, 11]
    assert attention_layer_indices("every-2", 8) == [1, 3, 5, 7]
    assert attention_layer_indices("every-4", 8) == [3, 7]
    assert attention_layer_indices("every-8", 16) == [7, 15]
    assert attention_layer_indices("all", 3) == [0, 1, 2]
    assert attention_layer_indices("none", 3) == []
    assert attention_layer_indices("3, 1", 4) == [1, 3]
    with pytest.raises(ValueError, match=r"attention layer 9 is out of range: the model has layers 0\.\.3"):
        attention_layer_indices("1,9", 4)


def _plan_with(data: dict, source_dir: Path, file: str = "user.yaml"):
    with resolve_source(source_dir) as source:
        return build_plan(source, parse_mapping(yaml.safe_dump(data, sort_keys=False), file))


def _builtin_data() -> dict:
    return yaml.safe_load(_builtin_text())


def test_unconsumed_source_tensor_is_named_before_writing(neox_checkpoint: Path) -> None:
    data = _builtin_data()
    data["drop"] = [item for item in data["drop"] if "query_key_value" not in item["source"]]
    with pytest.raises(
        PlanError,
        match=r"8 source tensor\(s\) are neither used by a rule nor dropped: "
        r"gpt_neox\.layers\.0\.attention\.query_key_value\.bias",
    ):
        _plan_with(data, neox_checkpoint)


def test_uncovered_target_tensor_is_named_before_writing(neox_checkpoint: Path) -> None:
    data = _builtin_data()
    data["init"] = []
    with pytest.raises(PlanError, match=r"neither produced by a rule nor initialised: model\.layers\.0\.mixer\."):
        _plan_with(data, neox_checkpoint)


def test_rule_naming_a_missing_source_tensor_suggests_the_nearest(neox_checkpoint: Path) -> None:
    data = _builtin_data()
    data["rules"][0]["source"] = "gpt_neox.embed_inn.weight"
    with pytest.raises(
        PlanError,
        match=r"user.yaml:\d+: source tensor 'gpt_neox.embed_inn.weight' is not in "
        r".*did you mean 'gpt_neox.embed_in.weight'\?",
    ):
        _plan_with(data, neox_checkpoint)


def test_shape_mismatch_without_drop_names_rule_tensors_and_shapes(neox_checkpoint: Path) -> None:
    data = _builtin_data()
    data["target"]["attention_layers"] = [0]
    q_rule = next(rule for rule in data["rules"] if rule["target"].endswith("q_proj.weight"))
    q_rule["transform"]["split_heads"]["heads"] = 5
    with pytest.raises(
        PlanError,
        match=r"user.yaml:\d+: model.layers.0.mixer.q_proj.weight ← "
        r"gpt_neox.layers.0.attention.query_key_value.weight \[\[96, 32\]\]: "
        r"split_heads: dimension 0 of \[96, 32\] must be a multiple of parts × heads = 3 × 5",
    ):
        _plan_with(data, neox_checkpoint)


def _with_copy_init(expand: int) -> dict:
    data = _builtin_data()
    data["rules"] = [rule for rule in data["rules"] if rule.get("where") not in ("mamba", "lci")]
    data["init"].insert(
        0,
        {
            "target": "model.layers.{i}.mixer.out_proj.*",
            "where": "mamba",
            "strategy": "copy",
            "source": "gpt_neox.layers.{i}.attention.dense.*",
        },
    )
    data["target"]["config"]["mamba"]["expand"] = expand
    return data


def test_copy_init_takes_the_source_tensor_where_the_shape_fits(neox_checkpoint: Path) -> None:
    plan = _plan_with(_with_copy_init(expand=1), neox_checkpoint)
    planned = {tensor.name: tensor for tensor in plan.tensors}
    out_proj = planned["model.layers.2.mixer.out_proj.weight"]
    assert out_proj.status == "transferred" and out_proj.sources == ("gpt_neox.layers.2.attention.dense.weight",)
    assert planned["model.layers.2.mixer.in_proj.weight"].strategy == "default"
    assert "gpt_neox.layers.2.attention.dense.weight" not in plan.dropped


def test_copy_init_falls_back_to_default_init_and_reports_the_drop(neox_checkpoint: Path) -> None:
    plan = _plan_with(_with_copy_init(expand=2), neox_checkpoint)
    planned = {tensor.name: tensor for tensor in plan.tensors}
    weight = planned["model.layers.2.mixer.out_proj.weight"]
    assert weight.status == "initialised" and weight.strategy == "default"
    assert "init copy: shape [32, 32] does not fit" in plan.dropped["gpt_neox.layers.2.attention.dense.weight"]
    assert planned["model.layers.2.mixer.out_proj.bias"].status == "transferred"  # [32] still fits


def test_copy_init_needs_a_source() -> None:
    text = "name: x\nsource: {model_type: a}\ntarget: {}\nrules: []\ninit:\n  - {target: t, strategy: copy}\n"
    with pytest.raises(MappingError, match=r"m.yaml:6:\d+: init.0: strategy 'copy' needs a 'source'"):
        parse_mapping(text, "m.yaml")


def _with_v_into_x(part: str = "x") -> dict:
    data = _builtin_data()
    data["drop"] = [item for item in data["drop"] if "query_key_value" not in item["source"]]
    data["drop"].append({"source": "gpt_neox.layers.{i}.attention.query_key_value.bias", "where": "mamba"})
    data["rules"].append(
        {
            "target": "model.layers.{i}.mixer.in_proj.weight",
            "part": part,
            "where": "mamba",
            "source": "gpt_neox.layers.{i}.attention.query_key_value.weight",
            "transform": {"split_heads": {"parts": 3, "take": 2, "heads": 4}},
        }
    )
    return data


def test_a_rule_can_fill_one_named_row_block_of_a_fused_tensor(neox_checkpoint: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from xatl_convert.conversion import convert

    mapping = tmp_path / "v-into-x.yaml"
    mapping.write_text(yaml.safe_dump(_with_v_into_x(), sort_keys=False))
    out, plain = tmp_path / "out", tmp_path / "plain"
    convert(neox_checkpoint, out, mapping=mapping)
    convert(neox_checkpoint, plain)
    weights, baseline = load_file(out / "model.safetensors"), load_file(plain / "model.safetensors")
    source = load_file(neox_checkpoint / "model.safetensors")
    value = source["gpt_neox.layers.2.attention.query_key_value.weight"].view(4, 3, 8, 32)[:, 2].reshape(32, 32)
    in_proj = weights["model.layers.2.mixer.in_proj.weight"]
    assert torch.equal(in_proj[:32], value)  # x rows ← V
    assert torch.equal(in_proj[32:], baseline["model.layers.2.mixer.in_proj.weight"][32:])  # z rows: default init
    entry = read_manifest(out)["tensors"]["model.layers.2.mixer.in_proj.weight"]
    assert entry["strategy"] == "default" and entry["parts"][0]["part"] == "x" and entry["parts"][0]["rows"] == [0, 32]
    report = verify(out, neox_checkpoint)
    assert report.check("transfers exact").status == "pass"


def test_an_unknown_part_names_the_parts_that_exist(neox_checkpoint: Path) -> None:
    with pytest.raises(PlanError, match=r"model.layers.0.mixer.in_proj.weight has no part 'B' \(its parts: x, z\)"):
        _plan_with(_with_v_into_x("B"), neox_checkpoint)
