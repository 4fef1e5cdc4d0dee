"""Bad mappings, bad `--set` values and bad target config values: one `error: …` line, exit 2, nothing written.

Each case edits the built-in GPT-NeoX mapping as a user would, or passes a `--set`, and checks that the line names
where the mistake is (FILE:LINE of the mapping, or `--set KEY`) and that no output or temporary folder is left.
"""

from __future__ import annotations

import fnmatch
import json
import re
import time
from pathlib import Path

import pytest

from tests.bad_input import error_line, invoke, leftovers, tree_digest
from tests.conftest import REPO_ROOT
from xatl_convert.conversion import parse_overrides, plan_conversion
from xatl_convert.mapping import Mapping
from xatl_convert.mapping.schema import CONFIG_KEYS, MIXER_SETTINGS, MIXERS, Mamba2Settings, MambaSettings, TargetConfig
from xatl_convert.models import MAMBA2_DEFAULTS, MAMBA_DEFAULTS, XatlConfig
from xatl_convert.models.config_keys_xatl import CONSTRUCTION_ONLY, MODEL_KEYS

NEOX_MAPPING = REPO_ROOT / "mappings" / "gpt-neox.yaml"
DOC = REPO_ROOT / "docs" / "mappings.md"


def _write_mapping(tmp_path: Path, old: str, new: str) -> Path:
    """The built-in GPT-NeoX mapping with one edit, saved where a user would keep their own."""
    text = NEOX_MAPPING.read_text()
    assert old in text, old
    path = tmp_path / "my-mapping.yaml"
    path.write_text(text.replace(old, new, 1))
    return path


def _line_of(path: Path, needle: str, occurrence: int = 1) -> int:
    """1-based line number of the `occurrence`-th line of `path` that contains `needle`."""
    numbers = [number for number, line in enumerate(path.read_text().splitlines(), 1) if needle in line]
    return numbers[occurrence - 1]


def _refused(tmp_path: Path, *arguments: str | Path) -> str:
    """Run the CLI; check one error line, exit 2, no output folder, no leftovers, the user's files unchanged."""
    before = tree_digest(tmp_path)
    result = invoke(*arguments)
    line = error_line(result)
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []
    assert tree_digest(tmp_path) == before
    return line


def _convert(tmp_path: Path, source: Path, *options: str | Path) -> str:
    return _refused(tmp_path, "convert", source, "--out", tmp_path / "out", *options)


# --- target.config keys in a mapping ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "key", "hint"),
    [
        ("    norm_type: layernorm", "    norm_type: layernorm\n    bogus_top: 3", "bogus_top", "allowed: vocab_size"),
        ("    norm_eps:", "    norm_esp:", "norm_esp", "did you mean 'norm_eps'?"),
        ("    hidden_size:", "    hiden_size:", "hiden_size", "did you mean 'hidden_size'?"),
        ("      d_state: 16", "      dstate: 16", "mamba.dstate", "did you mean 'd_state'?"),
    ],
    ids=["bogus-top", "norm-esp", "hiden-size", "mamba-dstate"],
)
def test_unknown_config_key_in_mapping_names_file_line_and_nearest_key(
    tmp_path: Path, neox_checkpoint: Path, old: str, new: str, key: str, hint: str
) -> None:
    mapping = _write_mapping(tmp_path, old, new)
    line = _convert(tmp_path, neox_checkpoint, "--mapping", mapping)
    number = _line_of(mapping, key.split(".")[-1] + ":")
    assert f"{mapping}:{number}:" in line and f"unknown key 'target.config.{key}'" in line and hint in line
    assert _refused(tmp_path, "mappings", "validate", mapping) == line  # caught without a source, too


def test_layer_types_in_target_config_points_to_attention_layers(tmp_path: Path, neox_checkpoint: Path) -> None:
    mapping = _write_mapping(tmp_path, "    norm_type: layernorm", "    norm_type: layernorm\n    layer_types: [mamba]")
    line = _convert(tmp_path, neox_checkpoint, "--mapping", mapping)
    assert f"{mapping}:{_line_of(mapping, 'layer_types:')}:" in line and "target.attention_layers" in line


# --- target.config values in a mapping (checked once expressions are evaluated) -----------------------------------


@pytest.mark.parametrize(
    ("old", "new", "needle", "message"),
    [
        ("hidden_size: ${source.hidden_size}", "hidden_size: ${source.hidden_size / 7}", "hidden_size:",
         "hidden_size must be a positive integer, got 4.57143"),
        ("      d_conv: 4", "      d_conv: 0", "d_conv:", "mamba.d_conv must be a positive integer, got 0"),
        ("      d_state: 16", "      d_state: abc", "d_state:", "mamba.d_state must be a positive integer, got 'abc'"),
        ("      d_state: 16", "      d_state: 100000000", "d_state:", "mamba.d_state=100000000 is larger than"),
        ("    mlp_gated: false", "    mlp_gated: maybe", "mlp_gated:", "mlp_gated must be true or false"),
        ("    norm_type: layernorm", "    norm_type: batchnorm", "norm_type:", "norm_type must be one of"),
        ("    attention_out_bias: true", "    attention_out_bias: 1", "attention_out_bias:",
         "attention_out_bias must be true or false, got 1"),
        ("      dt_rank: auto", "      dt_rank: auto\n      dt_min: 0.5", "dt_min:", "mamba.dt_max=0.1 is below"),
    ],
    ids=["float-hidden-size", "d-conv-0", "d-state-abc", "d-state-huge", "mlp-gated", "norm-type", "bool-as-int",
         "dt-min-above-max"],
)  # fmt: skip
def test_bad_config_value_in_mapping_names_file_and_line(
    tmp_path: Path, neox_checkpoint: Path, old: str, new: str, needle: str, message: str
) -> None:
    mapping = _write_mapping(tmp_path, old, new)
    line = _convert(tmp_path, neox_checkpoint, "--mapping", mapping)
    assert f"{mapping}:{_line_of(mapping, needle)}:" in line and message in line and "--set" not in line


def test_absurd_model_size_is_refused_before_anything_is_built(tmp_path: Path, neox_checkpoint: Path) -> None:
    mapping = _write_mapping(tmp_path, "vocab_size: ${source.vocab_size}", "vocab_size: 16000000")
    line = _convert(tmp_path, neox_checkpoint, "--mapping", mapping, "--set", "hidden_size=1000000")
    assert "--set hidden_size=1000000:" in line and "parameters, more than any model" in line


# --- expressions ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("${source.hidden_size * 99999999999999999999999999}", "an integer beyond 2**63"),
        ("${" + "-" * 100_000 + "1}", "100,001 characters is longer than an expression may be (1,000)"),
        ("${" + "-" * 990 + "1}", ""),  # nested too deeply, or a plain bad value: one line either way
        ("${1e308 * 10.0}", "not a finite number"),
        ("${source.hiden_size}", "did you mean 'source.hidden_size'?"),
    ],
    ids=["integer-overflow", "minus-100k", "minus-990", "float-overflow", "unknown-source-key"],
)
def test_bad_expression_names_file_and_line(
    tmp_path: Path, neox_checkpoint: Path, expression: str, message: str
) -> None:
    mapping = _write_mapping(tmp_path, "hidden_size: ${source.hidden_size}", f"hidden_size: {expression}")
    line = _convert(tmp_path, neox_checkpoint, "--mapping", mapping)
    assert f"{mapping}:{_line_of(mapping, 'hidden_size:')}:" in line and message in line
    assert len(line) < 400  # a 100,000-character expression is not echoed whole


def test_expression_of_the_wrong_kind_for_a_layer_index_names_the_item(tmp_path: Path, neox_checkpoint: Path) -> None:
    mapping = _write_mapping(tmp_path, "attention_layers: []", "attention_layers: ['${source.hidden_size / 7}']")
    line = _convert(tmp_path, neox_checkpoint, "--mapping", mapping)
    assert f"{mapping}:{_line_of(mapping, 'attention_layers:')}:" in line and "attention_layers.0" in line


# --- the YAML itself -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ("    norm_type: layernorm", "    norm_type: layernorm\n    norm_type: rmsnorm", "norm_type"),
        ("      d_state: 16", "      d_state: 16\n      d_state: 32", "d_state"),
        ("options:", "description: again\noptions:", "description"),
    ],
    ids=["config", "mamba", "top-level"],
)
def test_duplicate_yaml_key_names_both_lines(
    tmp_path: Path, neox_checkpoint: Path, old: str, new: str, key: str
) -> None:
    mapping = _write_mapping(tmp_path, old, new)
    line = _convert(tmp_path, neox_checkpoint, "--mapping", mapping)
    first, second = _line_of(mapping, f"{key}:"), _line_of(mapping, f"{key}:", 2)
    column = mapping.read_text().splitlines()[second - 1].index(key) + 1
    assert f"{mapping}:{second}:{column}: duplicate key '{key}' (first at line {first})" in line


def test_self_referencing_alias_is_refused(tmp_path: Path, neox_checkpoint: Path) -> None:
    mapping = _write_mapping(
        tmp_path, "    norm_type: layernorm", "    norm_type: layernorm\n    rope_scaling: &x [*x]"
    )
    line = _convert(tmp_path, neox_checkpoint, "--mapping", mapping)
    assert f"{mapping}:{_line_of(mapping, '&x')}:" in line and "alias (*name) of itself" in line


def test_billion_laughs_is_refused_in_well_under_a_second(tmp_path: Path) -> None:
    levels = ['    l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"    l{n}: &l{n} [{', '.join([f'*l{n - 1}'] * 9)}]" for n in range(1, 10)]
    mapping = _write_mapping(tmp_path, "  config:\n", "  config:\n" + "\n".join(levels) + "\n")
    started = time.perf_counter()
    line = _refused(tmp_path, "mappings", "validate", mapping)
    assert time.perf_counter() - started < 1.0
    assert re.search(
        rf"{re.escape(str(mapping))}:{_line_of(mapping, '&l5')}:\d+: this value expands to more than", line
    )


def test_mapping_that_is_not_utf8_names_file_and_line(tmp_path: Path, neox_checkpoint: Path) -> None:
    mapping = tmp_path / "latin1.yaml"
    mapping.write_bytes(NEOX_MAPPING.read_bytes().replace(b"description: GPT", b"description: caf\xe9 GPT"))
    line = _convert(tmp_path, neox_checkpoint, "--mapping", mapping)
    assert f"{mapping}:{_line_of(NEOX_MAPPING, 'description:')}: not UTF-8 text (byte 0xe9)" in line


def test_unreadable_mapping_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mapping = _write_mapping(tmp_path, "name:", "name:")
    read_bytes = Path.read_bytes

    def refuse_the_mapping(self: Path) -> bytes:
        if self == mapping:
            raise PermissionError(13, "Permission denied", str(self))
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", refuse_the_mapping)  # root reads any file: chmod cannot stand in
    line = error_line(invoke("mappings", "validate", mapping))
    assert f"{mapping}: cannot read the mapping file: Permission denied" in line
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", ":1:1: a mapping file is a YAML mapping"),
        (b"- name\n- rules\n", ":1:1: a mapping file is a YAML mapping"),
        (b"name: a\x01\n", ":1: invalid YAML: * characters are not allowed"),  # libyaml: control, PyYAML: special
        (b"name: [a\n", ":2:1: invalid YAML: *expected ',' or ']'"),
        (b"a: " + b"[" * 100 + b"]" * 100 + b"\n", ":1:"),
        (b"a: !!python/object:os.system x\n", ":1:4: invalid YAML: could not determine a constructor"),
    ],
    ids=["empty", "top-level-list", "control-character", "unclosed", "deep-nesting", "python-tag"],
)
def test_malformed_yaml_is_one_line(tmp_path: Path, content: bytes, message: str) -> None:
    mapping = tmp_path / "bad.yaml"
    mapping.write_bytes(content)
    line = _refused(tmp_path, "mappings", "validate", mapping)
    assert fnmatch.fnmatchcase(line, f"*{mapping}{message}*"), line


# --- --set ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("bogus_top=3", "--set bogus_top: unknown target config key 'bogus_top'"),
        ("norm_esp=1e-3", "--set norm_esp: unknown target config key 'norm_esp'; did you mean 'norm_eps'?"),
        ("hiden_size=64", "--set hiden_size: unknown target config key 'hiden_size'; did you mean 'hidden_size'?"),
        ("mamba.dstate=32", "--set mamba.dstate: unknown mamba setting 'dstate'; did you mean 'mamba.d_state'?"),
        (
            "options.transfer_attention_output=maybe",
            "--set options.transfer_attention_output=maybe: expected true or false",
        ),
        ("options.transfer_attention_outptu=true", "did you mean 'transfer_attention_output'?"),
        ("mamba.d_conv=0", "--set mamba.d_conv=0: mamba.d_conv must be a positive integer, got 0"),
        ("mamba.d_state=abc", "--set mamba.d_state=abc: mamba.d_state must be a positive integer, got 'abc'"),
        ("mamba.d_state=100000000", "--set mamba.d_state=100000000: mamba.d_state=100000000 is larger than"),
        ("mamba.dt_min=0.5", "--set mamba.dt_min=0.5: mamba.dt_max=0.1 is below mamba.dt_min=0.5"),
        ("mamba={d_conv: 0}", "--set mamba=" + '{"d_conv": 0}' + ": mamba.d_conv must be a positive integer"),
        ("hidden_size=1.5", "--set hidden_size=1.5: hidden_size must be a positive integer, got 1.5"),
        ("hidden_size=true", "--set hidden_size=true: hidden_size must be a positive integer, got true"),
        ("num_attention_heads=0", "--set num_attention_heads=0: num_attention_heads must be a positive integer"),
        ("mlp_gated=maybe", "--set mlp_gated=maybe: mlp_gated must be true or false"),
        ("norm_eps=0", "--set norm_eps=0: norm_eps must be a positive number"),
        ("hidden_act=gelu_neww", "did you mean 'gelu_new'?"),
        ("num_hidden_layers=100000", "--set num_hidden_layers=100000: num_hidden_layers=100000 is larger than"),
        ("layer_types=[mamba]", "--set layer_types: layer kinds come from --to and --attn-layers"),
        ("hidden_size.x=1", "--set hidden_size.x: hidden_size is one value, not a group"),
        ("mamba.d_state.x=1", "--set mamba.d_state.x: mamba.d_state is one value, not a group"),
        ("hidden_size=[", "--set hidden_size: the value is not one YAML value"),
        ("rope_parameters=&a [*a]", "--set rope_parameters: the value is not one YAML value"),
        ("mamba..d_state=1", "expected KEY=VALUE with a dotted KEY"),
        ("=1", "expected KEY=VALUE with a dotted KEY"),
    ],
)
def test_bad_set_names_the_option_not_the_mapping(
    tmp_path: Path, neox_checkpoint: Path, assignment: str, message: str
) -> None:
    line = _convert(tmp_path, neox_checkpoint, "--set", assignment)
    assert message in line and "gpt-neox.yaml" not in line


def test_set_reads_exponent_floats_as_numbers(neox_checkpoint: Path) -> None:
    overrides = parse_overrides(["norm_eps=1e-3", "mamba.dt_min=2E-3", "options.transfer_attention_output=no"])
    assert overrides == {"norm_eps": 0.001, "mamba.dt_min": 0.002, "options.transfer_attention_output": False}
    plan = plan_conversion(neox_checkpoint, overrides=overrides)
    plan.source.close()
    assert plan.target_config.norm_eps == 0.001 and plan.target_config.mamba["dt_min"] == 0.002


# --- the config class itself (also loaded from every converted folder) ---------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hidden_size": 82.28}, "hidden_size must be a positive integer, got 82.28"),
        ({"vocab_size": True}, "vocab_size must be a positive integer, got true"),
        ({"max_position_embeddings": 0}, "max_position_embeddings must be a positive integer"),
        ({"head_dim": -1}, "head_dim must be a positive integer"),
        ({"norm_eps": -1e-5}, "norm_eps must be a positive number"),
        ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false"),
        ({"mamba": {"d_conv": 0}}, "mamba.d_conv must be a positive integer"),
        ({"mamba": {"dt_rank": 0}}, "mamba.dt_rank must be a positive integer"),
        ({"mamba": {"dt_scale": 0}}, "mamba.dt_scale must be a positive number"),
        ({"mamba": {"d_state": 2**20}}, "mamba.d_state=1048576 is larger than any real model's (at most 65536)"),
        ({"mamba2": {"chunk_size": 0}}, "mamba2.chunk_size must be a positive integer"),
        ({"mamba2": {"dt_min": 0.2, "dt_max": 0.1}}, "mamba2.dt_max=0.1 is below mamba2.dt_min=0.2"),
        ({"mamba2": {"A_init_range": [1]}}, "mamba2.A_init_range must be two numbers"),
        ({"hidden_size": 2**24, "intermediate_size": 2**24}, "parameters, more than any model"),
    ],
)
def test_config_refuses_values_no_model_can_run_with(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        XatlConfig(**kwargs)


def test_config_saved_with_transformers_keys_still_loads(tmp_path: Path) -> None:
    saved = XatlConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4).to_dict()
    saved |= {"architectures": ["XatlForCausalLM"], "transformers_version": "4.46.0", "rope_theta": 10000.0}
    saved.pop("rope_parameters")  # written before rope_parameters existed
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert XatlConfig.from_pretrained(tmp_path).hidden_size == 64


# --- one declaration of the keys: config class, schema, docs ------------------------------------------------------


def _defaults(model: type) -> dict[str, object]:
    return {name: field.default for name, field in model.model_fields.items() if name != "layer_types"}


def test_the_schema_and_the_config_class_read_one_declaration() -> None:
    """A mapping (or `--set`) and the model accept the same keys with the same defaults: both read config_keys_xatl
    and the mixer registry, and a default XatlConfig stores each declared default."""
    assert list(CONFIG_KEYS) == [*MODEL_KEYS, *MIXERS]
    assert _defaults(TargetConfig) == {
        **{name: key.default for name, key in MODEL_KEYS.items()},
        **dict.fromkeys(MIXERS),
    }
    config = XatlConfig()
    derived = {"num_key_value_heads", "head_dim", "rope_parameters", *CONSTRUCTION_ONLY}  # filled from others
    assert {name: getattr(config, name) for name in MODEL_KEYS if name not in derived} == {
        name: key.default for name, key in MODEL_KEYS.items() if name not in derived
    }
    assert _defaults(MambaSettings) == MAMBA_DEFAULTS and _defaults(Mamba2Settings) == MAMBA2_DEFAULTS
    for name, model in MIXER_SETTINGS.items():  # one settings model per registered mixer, with its defaults
        assert _defaults(model) == MIXERS[name].defaults


def test_json_schema_forbids_unknown_config_keys() -> None:
    schema = Mapping.model_json_schema()
    assert schema["$defs"]["TargetSpec"]["properties"]["config"]["$ref"] == "#/$defs/TargetConfig"
    for model in ("TargetConfig", "MambaSettings", "Mamba2Settings", "GatedDeltanetSettings"):
        assert schema["$defs"][model]["additionalProperties"] is False
    assert schema["$defs"]["TargetConfig"]["properties"]["hidden_size"]["default"] == 768


def _doc_table(marker: str) -> dict[str, str]:
    """key → default cell of the table after `<!-- marker -->` in docs/mappings.md."""
    block = DOC.read_text().split(f"<!-- {marker} -->\n", 1)[1].split("\n\n", 1)[0]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in block.splitlines()[2:]]
    return {row[0].strip("`"): row[2].strip("`") for row in rows}


@pytest.mark.parametrize(
    ("marker", "model"),
    [("target-config-keys", TargetConfig), *((f"{name}-keys", model) for name, model in MIXER_SETTINGS.items())],
)
def test_docs_table_lists_every_key_with_its_default(marker: str, model: type) -> None:
    table = _doc_table(marker)
    assert {key: json.loads(cell) for key, cell in table.items()} == _defaults(model)
