"""`xatl mappings new`: for the families it knows, the scaffold is a finished mapping for the chosen mixer."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.bad_input import error_line, invoke
from tests.conftest import EXAMPLE_CHECKPOINT
from xatl_convert.mapping import load_mapping, parse_mapping
from xatl_convert.mapping.scaffold import SCAFFOLD_MIXERS
from xatl_convert.plan import build_plan
from xatl_convert.sources import resolve_source

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip


@pytest.fixture(scope="module")
def llama_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with what a scaffold must read: grouped kv heads, q/k/v/o and MLP biases, llama3 RoPE."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=3, intermediate_size=96,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         attention_bias=True, mlp_bias=True, rms_norm_eps=1e-6, rope_parameters=dict(LLAMA3_ROPE),
                         tie_word_embeddings=False)  # fmt: skip
    folder = tmp_path_factory.mktemp("llama") / "source"
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def _source(family: str, llama_source: Path) -> Path:
    return llama_source if family == "llama" else EXAMPLE_CHECKPOINT


def _how(plan) -> dict[str, tuple]:
    """Each target tensor of a plan: shape, whether it is transferred or initialised, from what, in which group."""
    return {tensor.name: (tensor.shape, tensor.status, tensor.sources, tensor.group) for tensor in plan.tensors}


def _transferred(result) -> int:
    assert result.exit_code == 0, result.output
    return int(re.search(r"(\d+) transferred", result.stdout).group(1))


@pytest.mark.parametrize("mixer", SCAFFOLD_MIXERS)
@pytest.mark.parametrize("family", ["llama", "gpt-neox"])
def test_scaffold_of_a_known_family_validates_and_transfers_what_the_builtin_does(
    tmp_path: Path, llama_source: Path, family: str, mixer: str
) -> None:
    source = _source(family, llama_source)
    out = tmp_path / "mine.yaml"
    result = invoke("mappings", "new", "--source", source, "--to", mixer, "--out", out)
    assert result.exit_code == 0, result.output
    data = yaml.safe_load(out.read_text())
    assert (
        data["name"] == f"my-{family}-to-{mixer.replace('_', '-')}"
    )  # not the built-in's name, which --dry-run would show
    assert data["target"]["mixer"] == mixer
    other = next(name for name in SCAFFOLD_MIXERS if name != mixer)
    assert mixer in data["target"]["config"] and other not in data["target"]["config"]
    w_o = [rule for rule in data["rules"] if rule.get("group") == "w_o" and rule.get("where") != "attention"]
    assert w_o and all(rule["where"] == mixer for rule in w_o)

    result = invoke("mappings", "validate", out, "--source", source)  # no TODO left to fill in
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"ok {out} covers {source}: ")
    builtin = _transferred(invoke("convert", source, "--to", mixer, "--dry-run"))
    assert _transferred(invoke("convert", source, "--mapping", out, "--dry-run")) == builtin

    # The same model as the built-in mapping's, tensor for tensor, whichever layers keep attention.
    with resolve_source(source) as checkpoint:
        for attn_layers in (None, "paper", "all"):
            mine = build_plan(checkpoint, load_mapping(out), attn_layers)
            theirs = build_plan(checkpoint, load_mapping(f"{family}-to-{mixer}"), attn_layers)
            assert _how(mine) == _how(theirs)
            assert getattr(mine.target_config, mixer) == getattr(theirs.target_config, mixer)
            for key in ("num_key_value_heads", "attention_bias", "attention_out_bias", "mlp_bias", "norm_bias",
                        "norm_eps", "norm_type", "rope_parameters", "parallel_residual", "mlp_gated"):  # fmt: skip
                assert getattr(mine.target_config, key) == getattr(theirs.target_config, key), key


def test_scaffold_reads_bias_flags_heads_eps_and_rope_from_the_source(llama_source: Path) -> None:
    config = yaml.safe_load(invoke("mappings", "new", "--source", llama_source, "--to", "mamba2").stdout)["target"][
        "config"
    ]
    assert config["norm_type"] == "rmsnorm" and config["norm_eps"] == "${source.rms_norm_eps}"
    assert config["num_key_value_heads"] == "${source.num_key_value_heads}"
    assert config["rope_parameters"] == "${source.rope_parameters}"
    assert config["attention_bias"] is True and config["attention_out_bias"] is True and config["mlp_bias"] is True
    assert config["norm_bias"] is False and config["mlp_gated"] is True and config["parallel_residual"] is False
    assert config["mamba2"]["out_proj_bias"] is True and config["mamba2"]["expand"] == 1


def test_scaffold_of_a_family_it_knows_in_part_marks_each_gap_and_validation_names_them(tmp_path: Path) -> None:
    from transformers import BloomConfig, BloomForCausalLM

    BloomForCausalLM(BloomConfig(n_layer=2, hidden_size=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "b")
    text = invoke("mappings", "new", "--source", tmp_path / "b").stdout
    mapping = yaml.safe_load(text)
    rules = {(rule["target"], rule["source"]) for rule in mapping["rules"]}
    assert ("TODO", "transformer.word_embeddings_layernorm.weight") in rules  # no xatl counterpart: the user decides
    assert ("model.embed_tokens.weight", "transformer.word_embeddings.weight") in rules
    assert mapping["target"]["config"]["intermediate_size"] == "TODO"  # Bloom's config has no such key
    with pytest.raises(Exception, match=r"<scaffold>:\d+: TODO left: target.config.intermediate_size; "):
        parse_mapping(text, "<scaffold>")
    # what it recognised is filled in: Bloom's fused q/k/v has GPT-NeoX's per-head layout
    q = next(rule for rule in mapping["rules"] if rule["target"] == "model.layers.{i}.mixer.q_proj.weight")
    assert q["transform"]["split_heads"] == {
        "parts": 3,
        "take": 0,
        "heads": "${source.n_head}",
        "layout": "interleaved",
    }


def test_scaffold_says_where_to_start_for_a_mixer_it_cannot_guess() -> None:
    line = error_line(invoke("mappings", "new", "--source", EXAMPLE_CHECKPOINT, "--to", "gated-deltanet"))
    assert "xatl mappings show llama-to-gated-deltanet" in line


def test_scaffold_refuses_an_unknown_mixer() -> None:
    line = error_line(invoke("mappings", "new", "--source", EXAMPLE_CHECKPOINT, "--to", "mamba3"))
    assert line == "error: --to 'mamba3': unknown target (known: mamba, mamba2, gated-deltanet)"
