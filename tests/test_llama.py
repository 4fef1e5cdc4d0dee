"""Llama-family sources (Llama, Mistral, Qwen2, SmolLM-style): exact all-attention conversion, tied heads, W_O."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from xatl_convert.conversion import convert
from xatl_convert.manifest import read_manifest
from xatl_convert.verify import verify

SMALL = {"vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 3, "intermediate_size": 96,
         "num_attention_heads": 4, "max_position_embeddings": 256}  # fmt: skip
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip
SOURCES = {
    "llama-gqa-untied": (LlamaForCausalLM, LlamaConfig, {"num_key_value_heads": 2, "tie_word_embeddings": False}),
    "llama3-rope-bias": (LlamaForCausalLM, LlamaConfig, {"num_key_value_heads": 2, "attention_bias": True,
                                                         "mlp_bias": True, "rope_parameters": LLAMA3_ROPE}),
    "smollm-tied-head_dim": (LlamaForCausalLM, LlamaConfig, {"num_key_value_heads": 1, "head_dim": 32,
                                                             "tie_word_embeddings": True}),
    "mistral-gqa": (MistralForCausalLM, MistralConfig, {"num_key_value_heads": 2, "sliding_window": None}),
    "qwen2-qkv-bias-tied": (Qwen2ForCausalLM, Qwen2Config, {"num_key_value_heads": 2, "tie_word_embeddings": True}),
}  # fmt: skip


def save_source(folder: Path, kind: str) -> Path:
    model_class, config_class, extra = SOURCES[kind]
    torch.manual_seed(0)
    model = model_class(config_class(**SMALL, **{k: (dict(v) if isinstance(v, dict) else v) for k, v in extra.items()}))
    with torch.no_grad():  # random norms, so that a norm mapped to the wrong place shows in the logits
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                parameter.normal_(1.0 if "norm" in name else 0.0, 0.2)
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", list(SOURCES))
def test_all_attention_conversion_reproduces_llama_family_logits(kind: str, tmp_path: Path) -> None:
    source = save_source(tmp_path / "source", kind)
    out = tmp_path / "out"
    convert(source, out, attn_layers="all")
    report = verify(out, source)
    exactness = report.check("source twin = source")
    assert exactness.status == "pass", exactness
    assert exactness.details["output_logits"] <= 1e-5  # the written all-attention model itself
    assert exactness.details["logits"] <= 1e-5 and max(exactness.details["per_layer"]) <= 1e-5
    assert report.passed


@pytest.mark.parametrize("kind", ["llama-gqa-untied", "qwen2-qkv-bias-tied", "smollm-tied-head_dim"])
def test_mamba_conversion_of_llama_family_handles_heads_and_w_o(kind: str, tmp_path: Path) -> None:
    source = save_source(tmp_path / "source", kind)
    out = tmp_path / "out"
    plan = convert(source, out, attn_layers="1")
    weights, source_weights = load_file(out / "model.safetensors"), load_file(source / "model.safetensors")
    tied = SOURCES[kind][2].get("tie_word_embeddings", False)
    assert ("lm_head.weight" in weights) is (not tied)
    fc1 = torch.cat([source_weights["model.layers.0.mlp.up_proj.weight"],
                     source_weights["model.layers.0.mlp.gate_proj.weight"]])  # fmt: skip
    assert torch.equal(weights["model.layers.0.mlp.fc1.weight"], fc1)
    manifest = read_manifest(out)
    w_o = manifest["tensors"]["model.layers.0.mixer.out_proj.weight"]
    if kind == "smollm-tied-head_dim":  # 4 heads × 32 = 128 ≠ hidden 64: W_O cannot fit, so it is dropped
        assert w_o["status"] == "initialised"
        assert "gives shape [64, 128]" in manifest["dropped"]["model.layers.0.self_attn.o_proj.weight"]
    else:
        assert w_o["status"] == "transferred"
    assert manifest["tensors"]["model.layers.1.mixer.k_proj.weight"]["status"] == "transferred"
    assert "model.layers.2.self_attn.q_proj.weight" in plan.dropped
    assert verify(out, source).passed


def test_sliding_window_carries_over_and_a_mapping_that_drops_it_warns(tmp_path: Path) -> None:
    import yaml
    from typer.testing import CliRunner

    from xatl_convert.cli import app
    from xatl_convert.mapping import builtin_mappings

    torch.manual_seed(0)
    MistralForCausalLM(MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=64)).save_pretrained(tmp_path / "m")
    kept = convert(tmp_path / "m", tmp_path / "kept", attn_layers="1")
    assert kept.target_config.sliding_window == 64 and kept.warnings == []  # the kept layer slides as Mistral's
    data = yaml.safe_load(builtin_mappings()["llama-to-mamba"].read_text())
    del data["target"]["config"]["sliding_window"]
    (tmp_path / "no-window.yaml").write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    args = ["convert", str(tmp_path / "m"), "--out", str(out), "--attn-layers", "1", "--mapping",
            str(tmp_path / "no-window.yaml")]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    expected = (
        "the source uses sliding-window attention (64 tokens) and the mapping leaves it out: the kept attention "
        "layers compute something else (they match only on sequences of up to 64 tokens)"
    )
    assert f"warning: {expected}" in result.stderr.replace("\n", " ")
    assert read_manifest(out)["warnings"] == [expected]
    pure = convert(tmp_path / "m", tmp_path / "pure", mapping=tmp_path / "no-window.yaml")
    assert pure.warnings == []  # no attention kept: nothing computes the window
