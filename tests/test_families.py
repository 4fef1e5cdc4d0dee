"""The families people use now, each converted with its built-in mapping from a tiny random model whose config is
shaped like a released checkpoint (head_dim, GQA ratio, rope type, tying) and whose every norm and bias is random,
so that each convention (1 + w norms, post-norms, multipliers, soft-caps, windows, rotary layouts) shows in the
logits. The all-attention conversion must reproduce transformers' logits; the pure Mamba and Mamba2 ones must
verify."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from xatl_convert.conversion import convert
from xatl_convert.manifest import read_manifest
from xatl_convert.verify import verify

V = 256
SMALL = {"vocab_size": V, "max_position_embeddings": 128}
# name: (model class, config class, config) — after the shapes of a released checkpoint of the family, scaled down.
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    # Qwen3-0.6B: heads × head_dim ≠ hidden, GQA 2:1, per-head q/k norms, tied; here with its sliding window on
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 32, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
        "tie_word_embeddings": True, "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 2}),
    # SmolLM3-3B: every 4th layer without RoPE (NoPE), GQA, tied
    "smollm3": ("SmolLM3ForCausalLM", "SmolLM3Config", {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),
    # Mistral-Nemo's shape: heads × head_dim (32 × 128) is not a multiple of hidden (5120)
    "mistral-nemo-shape": ("MistralForCausalLM", "MistralConfig", {
        "hidden_size": 96, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 1, "head_dim": 64, "sliding_window": None}),
    # gemma-2b: multi-query, head_dim 256 ≠ hidden / heads, (1 + w) norms, sqrt(hidden) embeddings, GELU-tanh
    "gemma": ("GemmaForCausalLM", "GemmaConfig", {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 1, "head_dim": 32, "hidden_act": "gelu_pytorch_tanh"}),
    # gemma-2-2b: sandwich norms, alternating sliding/full layers, both soft-caps, query_pre_attn_scalar
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 32, "query_pre_attn_scalar": 24, "sliding_window": 4,
        "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0}),
    # gemma-3-4b: (1 + w) q/k norms, local and global layers with their own RoPE (linear scaling on global ones)
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 1, "head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 4,
        "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
        "final_logit_softcapping": None, "attn_logit_softcapping": None}),
    # gemma-3-1b's shape: heads × head_dim (4 × 256) is not a multiple of hidden (1152), so Mamba2 takes 4 heads of
    # hidden / 4 and W_O cannot fill out_proj
    "gemma3-1b-shape": ("Gemma3ForCausalLM", "Gemma3TextConfig", {
        "hidden_size": 72, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 1, "head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 4,
        "layer_types": ["sliding_attention", "full_attention"]}),
    # Phi-4-mini: fused qkv and gate_up, partial rotary 0.75, GQA, tied; Phi-3's window on every layer
    "phi3": ("Phi3ForCausalLM", "Phi3Config", {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "tie_word_embeddings": True, "sliding_window": 4,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75},
        "original_max_position_embeddings": 128, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),
    # OLMo-2: post-norms only, full-width q/k norms
    "olmo2": ("Olmo2ForCausalLM", "Olmo2Config", {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rope_theta": 500000.0, "rms_norm_eps": 1e-6, "pad_token_id": 1, "eos_token_id": 2}),
    # gpt2: learned positions, Conv1D weights, fused c_attn, GELU-new, tied
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128,
                                              "bos_token_id": 0, "eos_token_id": 0}),
    # opt-125m: learned positions with OPT's offset of 2, ReLU, biases, tied
    "opt": ("OPTForCausalLM", "OPTConfig", {
        "hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "do_layer_norm_before": True, "pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 2}),
    # gpt-j-6B: interleaved rotary on 64 of 256 head dims, one norm for both branches, LM-head bias
    "gptj": ("GPTJForCausalLM", "GPTJConfig", {"n_embd": 64, "n_layer": 2, "n_head": 4, "rotary_dim": 8,
                                              "n_positions": 128, "bos_token_id": 0, "eos_token_id": 0}),
    # granite-3.1-2b: embedding, residual, attention multipliers and logits scaling; biases; tied
    "granite": ("GraniteForCausalLM", "GraniteConfig", {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "embedding_multiplier": 12.0, "attention_multiplier": 0.0625,
        "residual_multiplier": 0.22, "logits_scaling": 8.0, "tie_word_embeddings": True, "attention_bias": True,
        "mlp_bias": True, "pad_token_id": 0}),
    # falcon-40b: grouped fused qkv, two norms in parallel
    "falcon-40b": ("FalconForCausalLM", "FalconConfig", {
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_kv_heads": 2,
        "new_decoder_architecture": True, "num_ln_in_parallel_attn": 2, "bias": False, "alibi": False,
        "ffn_hidden_size": 128, "bos_token_id": 0, "eos_token_id": 0}),
    # falcon-7b: multi-query fused qkv, one norm for both parallel branches
    "falcon-7b": ("FalconForCausalLM", "FalconConfig", {
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "multi_query": True,
        "parallel_attn": True, "new_decoder_architecture": False, "bias": False, "alibi": False,
        "bos_token_id": 0, "eos_token_id": 0}),
    # stablelm-2-1_6b: LayerNorm, partial rotary 0.25, q/k/v biases, sequential; untied
    "stablelm": ("StableLmForCausalLM", "StableLmConfig", {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "partial_rotary_factor": 0.25, "rope_theta": 10000.0, "use_qkv_bias": True,
        "qk_layernorm": False, "use_parallel_residual": False, "layer_norm_eps": 1e-5}),
    # stablelm-3b-4e1t style with a parallel residual (one norm for both branches) and GQA
    "stablelm-parallel": ("StableLmForCausalLM", "StableLmConfig", {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "partial_rotary_factor": 0.25, "use_qkv_bias": False, "qk_layernorm": False,
        "use_parallel_residual": True}),
}  # fmt: skip


def save_family(folder: Path, family: str, spec: tuple[str, str, dict[str, Any]] | None = None) -> Path:
    """A random tiny model of the family (or of `spec`: model class, config class, config), with random norms and
    biases, saved as transformers saves it."""
    model_name, config_name, values = spec or FAMILIES[family]
    config = getattr(transformers, config_name)(**{**SMALL, **values})
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name or "ln" in name.split(".")[-2] or name.endswith("bias"):
                parameter.normal_(0.0 if name.endswith("bias") else 1.0, 0.2)
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", list(FAMILIES))
def test_all_attention_conversion_reproduces_the_family_logits(family: str, tmp_path: Path) -> None:
    source = save_family(tmp_path / "source", family)
    convert(source, tmp_path / "out", attn_layers="all")
    report = verify(tmp_path / "out", source, max_tokens=48)
    exactness = report.check("source twin = source")
    assert exactness.status == "pass", exactness
    assert exactness.details["output_logits"] <= 1e-5, exactness.details  # the written model against transformers
    assert report.passed, report


@pytest.mark.parametrize("mixer", ["mamba", "mamba2", "gated_deltanet"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_pure_lci_conversion_of_the_family_verifies(family: str, mixer: str, tmp_path: Path) -> None:
    source = save_family(tmp_path / "source", family)
    plan = convert(source, tmp_path / "out", to=mixer)
    assert plan.target_config.layer_types == [mixer] * plan.target_config.num_hidden_layers
    manifest = read_manifest(tmp_path / "out")
    assert manifest["mapping"]["name"].endswith(f"-to-{mixer.replace('_', '-')}")
    if mixer == "gated_deltanet":  # linear attention: the attention's W_Q, W_K and W_V fill its q, k, v rows
        parts = manifest["tensors"]["model.layers.0.mixer.in_proj.weight"].get("parts", [])
        assert [part["part"] for part in parts] == ["q", "k", "v"] or sorted(p["part"] for p in parts) == [
            "k",
            "q",
            "v",
        ]
    assert verify(tmp_path / "out", source, max_tokens=48).passed


def _edited_mapping(tmp_path: Path, family: str, edit: Any) -> Path:
    """The family's built-in mapping, edited by `edit(data)`, saved as a user mapping file."""
    import yaml

    from xatl_convert.mapping import builtin_mappings

    data = yaml.safe_load(builtin_mappings()[f"{family}-to-mamba"].read_text())
    edit(data)
    path = tmp_path / f"my-{family}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_a_mapping_that_leaves_out_a_family_feature_is_warned_and_recorded(tmp_path: Path) -> None:
    source = save_family(tmp_path / "source", "granite")

    def without_multipliers(data: dict[str, Any]) -> None:
        for key in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
            del data["target"]["config"][key]

    plan = convert(source, tmp_path / "out", mapping=_edited_mapping(tmp_path, "granite", without_multipliers))
    assert plan.warnings == [
        f"the source uses {what} and the mapping leaves it out: the converted model computes something else"
        for what in ("an embedding multiplier (12.0)", "a residual multiplier (0.22)", "logits divided by 8.0")
    ]
    assert read_manifest(tmp_path / "out")["warnings"] == plan.warnings


@pytest.mark.parametrize(
    ("family", "edit", "message"),
    [
        # Phi-3's fused q/k/v cut as if there were no grouped-query attention: k and v are half that size
        (
            "phi3",
            lambda d: d["rules"][7]["transform"]["split"].update(sizes=[64, 64, 64]),
            r"phi3\.yaml:\d+: .*qkv_proj\.weight \[\[128, 64\]\]: split: sizes \[64, 64, 64\] add up to 192, but "
            r"dimension 0 of \[128, 64\] is 128",
        ),
        # GPT-2's Conv1D weights taken without the transpose
        (
            "gpt2",
            lambda d: d["rules"][6].update(transform="copy"),
            r"gpt2\.yaml:\d+: model\.layers\.0\.mlp\.fc1\.weight ← transformer\.h\.0\.mlp\.c_fc\.weight "
            r"\[\[64, 256\]\]: copy of transformer\.h\.0\.mlp\.c_fc\.weight gives shape \[64, 256\], but "
            r"model\.layers\.0\.mlp\.fc1\.weight has shape \[256, 64\]",
        ),
    ],
    ids=["phi3-split-sizes", "gpt2-no-transpose"],
)
def test_a_wrong_family_mapping_fails_with_a_line_naming_the_problem(
    family: str, edit: Any, message: str, tmp_path: Path
) -> None:
    from xatl_convert.errors import PlanError

    source = save_family(tmp_path / "source", family)
    with pytest.raises(PlanError, match=message):
        convert(source, tmp_path / "out", attn_layers="all", mapping=_edited_mapping(tmp_path, family, edit))
    assert not (tmp_path / "out").exists()


def test_permute_rotary_turns_gpt_j_rows_into_llama_halves_exactly(tmp_path: Path) -> None:
    """The same GPT-J, converted with rotate-half RoPE and its q/k rows permuted per head, computes the same."""
    source = save_family(tmp_path / "source", "gptj")
    permute = {"permute_rotary": {"heads": 4, "rotary_dim": 8, "to": "halves"}}

    def halves(data: dict[str, Any]) -> None:
        data["target"]["config"]["rope_interleaved"] = False
        for rule in data["rules"]:
            if rule["target"].endswith(("q_proj.weight", "k_proj.weight")):
                rule["transform"] = permute

    convert(source, tmp_path / "out", attn_layers="all", mapping=_edited_mapping(tmp_path, "gptj", halves))
    exactness = verify(tmp_path / "out", source, max_tokens=48).check("source twin = source")
    assert exactness.status == "pass" and exactness.details["output_logits"] <= 1e-5, exactness
