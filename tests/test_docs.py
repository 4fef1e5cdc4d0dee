"""docs/mappings.md: its tutorial mapping converts a real (tiny) GPT-2, and its rule snippets are valid."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

from tests.conftest import EXAMPLE_CHECKPOINT, REPO_ROOT
from xatl_convert.conversion import convert
from xatl_convert.mapping import parse_mapping
from xatl_convert.mapping.schema import TensorRule
from xatl_convert.verify import verify

DOC = REPO_ROOT / "docs" / "mappings.md"


def _blocks(marker: str) -> list[str]:
    return re.findall(rf"<!-- {marker} -->\n```yaml\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


@pytest.fixture
def tutorial_mapping(tmp_path: Path) -> Path:
    (block,) = _blocks("tutorial-mapping")
    path = tmp_path / "gpt2-to-mamba.yaml"
    path.write_text(block)
    return path


@pytest.fixture
def gpt2(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=96, n_positions=64, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    return tmp_path / "gpt2"


def test_tutorial_mapping_converts_gpt2_with_exact_transfers(
    tutorial_mapping: Path, gpt2: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    plan = convert(gpt2, out, mapping=tutorial_mapping)
    assert plan.mapping.name == "gpt2-to-mamba" and plan.layer_types == ["mamba"] * 3
    source, target = load_file(gpt2 / "model.safetensors"), load_file(out / "model.safetensors")
    assert torch.equal(target["model.layers.1.mlp.fc1.weight"], source["transformer.h.1.mlp.c_fc.weight"].T)
    assert torch.equal(target["model.layers.1.mixer.out_proj.weight"], source["transformer.h.1.attn.c_proj.weight"].T)
    assert "lm_head.weight" not in target  # tied to the embeddings, as in GPT-2
    assert "learned absolute positions" in plan.dropped["transformer.wpe.weight"]
    report = verify(out, gpt2)
    assert report.passed and report.check("transfers exact").status == "pass"
    twin = report.check("source twin = source")  # as docs/mappings.md says: skipped, with the reason
    assert twin.status == "skip" and "no place for source tensor transformer.wpe.weight" in twin.value


def test_tutorial_mapping_keeps_attention_layers_split_from_the_fused_projection(
    tutorial_mapping: Path, gpt2: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    convert(gpt2, out, mapping=tutorial_mapping, attn_layers="1")
    source, target = load_file(gpt2 / "model.safetensors"), load_file(out / "model.safetensors")
    fused_weight, fused_bias = source["transformer.h.1.attn.c_attn.weight"], source["transformer.h.1.attn.c_attn.bias"]
    for index, name in enumerate(("q_proj", "k_proj", "v_proj")):
        rows = slice(32 * index, 32 * (index + 1))
        assert torch.equal(target[f"model.layers.1.mixer.{name}.weight"], fused_weight.T[rows])
        assert torch.equal(target[f"model.layers.1.mixer.{name}.bias"], fused_bias[rows])
    assert verify(out, gpt2).check("logits finite").status == "pass"


def test_tutorial_mapping_validates_from_the_command_line(tutorial_mapping: Path, gpt2: Path) -> None:
    from typer.testing import CliRunner

    from xatl_convert.cli import app

    result = CliRunner().invoke(app, ["mappings", "validate", str(tutorial_mapping), "--source", str(gpt2)])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("snippet", _blocks("rule-snippet"))
def test_rule_snippets_in_the_tutorial_are_valid_rules(snippet: str) -> None:
    TensorRule.model_validate(yaml.safe_load(snippet))


def test_tutorial_yaml_is_a_complete_mapping_file(tutorial_mapping: Path) -> None:
    mapping = parse_mapping(tutorial_mapping.read_text(), str(tutorial_mapping))
    steps = [step for rule in mapping.rules for step in (rule.transform if isinstance(rule.transform, list) else
             [rule.transform])]  # fmt: skip
    names = {step if isinstance(step, str) else next(iter(step)) for step in steps}
    assert {"copy", "transpose", "split_heads", "slice"} <= names


def test_readme_using_the_output_snippet_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """README's 'Using the output' block, run as written against a fresh conversion of the example."""
    readme = (REPO_ROOT / "README.md").read_text()
    block = readme.split("<!-- ci:using-the-output -->\n```python\n", 1)[1].split("```", 1)[0]
    convert(EXAMPLE_CHECKPOINT, tmp_path / "pythia-tiny-mamba")
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
