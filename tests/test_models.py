"""Behaviour of the xatl model family (xatl_convert/models): exactness against GPT-NeoX and Llama / Mistral / Qwen2
(RoPE scaling included), init, scan, IO."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

import xatl_convert.models
from xatl_convert.models import (
    MAMBA2_DEFAULTS,
    XatlConfig,
    XatlForCausalLM,
    XatlGatedRMSNorm,
    XatlMamba,
    XatlMamba2,
    init_xatl_weights,
    selective_scan_reference,
    ssd_chunk_scan_reference,
)
from xatl_convert.models.modeling_xatl import rotary_cos_sin
from xatl_convert.writer import MODELING_FILES

VOCAB, HIDDEN, HEADS = 128, 64, 4


MAMBA2_TINY = {"d_state": 16, "headdim": 16, "ngroups": 2, "chunk_size": 8}


def tiny_config(**overrides) -> XatlConfig:
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=HEADS,
        mamba={"d_state": 8},
    )
    kwargs.update(overrides)
    return XatlConfig(**kwargs)


def neox_to_xatl_state_dict(neox: GPTNeoXForCausalLM) -> dict[str, torch.Tensor]:
    """Rename GPT-NeoX weights into xatl names, splitting the per-head interleaved query_key_value."""
    cfg = neox.config
    heads, hidden = cfg.num_attention_heads, cfg.hidden_size
    head_dim = hidden // heads
    renames = {
        "gpt_neox.embed_in.": "model.embed_tokens.",
        "gpt_neox.final_layer_norm.": "model.final_norm.",
        ".input_layernorm.": ".input_norm.",
        ".post_attention_layernorm.": ".mlp_norm.",
        ".attention.dense.": ".mixer.out_proj.",
        ".mlp.dense_h_to_4h.": ".mlp.fc1.",
        ".mlp.dense_4h_to_h.": ".mlp.fc2.",
        "gpt_neox.layers.": "model.layers.",
    }
    out: dict[str, torch.Tensor] = {}
    for name, tensor in neox.state_dict().items():
        if ".attention.query_key_value." in name:
            prefix = name.split(".attention.")[0].replace("gpt_neox.", "model.")
            kind = name.rsplit(".", 1)[1]
            shape = (heads, 3, head_dim, hidden) if kind == "weight" else (heads, 3, head_dim)
            parts = tensor.view(shape)
            for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                out[f"{prefix}.mixer.{proj}.{kind}"] = parts[:, j].reshape(heads * head_dim, *shape[3:])
            continue
        for old, new in renames.items():
            name = name.replace(old, new)
        out[name] = tensor
    return out


@pytest.mark.parametrize("rotary_pct", [1.0, 0.25])
@pytest.mark.parametrize("parallel", [True, False])
def test_attention_model_reproduces_gpt_neox_logits(parallel: bool, rotary_pct: float) -> None:
    torch.manual_seed(0)
    neox_cfg = GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        intermediate_size=4 * HIDDEN,
        use_parallel_residual=parallel,
        rotary_pct=rotary_pct,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    neox = GPTNeoXForCausalLM(neox_cfg).eval()
    cfg = tiny_config(
        intermediate_size=4 * HIDDEN,
        layer_types=["attention", "attention"],
        parallel_residual=parallel,
        partial_rotary_factor=rotary_pct,
    )
    model = XatlForCausalLM(cfg).eval()
    missing, unexpected = model.load_state_dict(neox_to_xatl_state_dict(neox), strict=True)
    assert not missing and not unexpected

    ids = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        expected = neox(ids).logits
        got = model(ids).logits
    assert (got - expected).abs().max().item() <= 1e-4


# Llama-family sources: RMSNorm, gated SiLU MLP, sequential residual, q/k/v blocked per head, RoPE with scaling.
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
LINEAR_ROPE = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
DYNAMIC_ROPE = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}
YARN_ROPE = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
LONGROPE_ROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "short_factor": [1.0, 1.1, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0],  # head_dim 16 → 8 frequencies
    "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0],
}
MAX_POSITIONS = 256

# id → (source classes, source config overrides, sequence length)
LLAMA_FAMILY_CASES: dict[str, tuple[type[PreTrainedConfig], type[PreTrainedModel], dict, int]] = {
    "llama-gqa-head_dim": (LlamaConfig, LlamaForCausalLM, {"num_key_value_heads": 2, "head_dim": 32}, 64),
    "llama-biases": (LlamaConfig, LlamaForCausalLM, {"attention_bias": True, "mlp_bias": True}, 64),
    "llama-llama3": (LlamaConfig, LlamaForCausalLM, {"num_key_value_heads": 2, "rope_parameters": LLAMA3_ROPE}, 96),
    "llama-linear-tied": (
        LlamaConfig,
        LlamaForCausalLM,
        {"tie_word_embeddings": True, "rope_parameters": LINEAR_ROPE},
        64,
    ),
    # dynamic NTK only rescales beyond max_position_embeddings
    "llama-dynamic": (LlamaConfig, LlamaForCausalLM, {"rope_parameters": DYNAMIC_ROPE}, MAX_POSITIONS + 32),
    "llama-longrope": (
        LlamaConfig,
        LlamaForCausalLM,
        {"num_key_value_heads": 2, "rope_parameters": LONGROPE_ROPE},
        96,
    ),
    "mistral-gqa-head_dim-tied": (
        MistralConfig,
        MistralForCausalLM,
        {"num_key_value_heads": 2, "head_dim": 32, "sliding_window": None, "tie_word_embeddings": True},
        64,
    ),
    "qwen2-qkv_bias-tied": (Qwen2Config, Qwen2ForCausalLM, {"num_key_value_heads": 2, "tie_word_embeddings": True}, 64),
    "qwen2-yarn": (Qwen2Config, Qwen2ForCausalLM, {"num_key_value_heads": 2, "rope_parameters": YARN_ROPE}, 96),
}


def make_llama_family_source(
    config_class: type[PreTrainedConfig], model_class: type[PreTrainedModel], overrides: dict
) -> PreTrainedModel:
    """A random tiny source model whose norms and biases are random too, so a wrong mapping of them shows."""
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        intermediate_size=96,
        max_position_embeddings=MAX_POSITIONS,
        initializer_range=0.1,  # sharper attention than 0.02, so that RoPE differences show in the logits
        attn_implementation="eager",
    )
    kwargs.update(copy.deepcopy(overrides))
    model = model_class(config_class(**kwargs)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                param.add_(0.1 * torch.randn_like(param))
    return model


def llama_family_xatl_config(source: PreTrainedConfig, **overrides) -> XatlConfig:
    """The xatl config of an all-attention copy of a Llama / Mistral / Qwen2 config, from its config.json dict."""
    src = source.to_dict()
    qwen2 = src["model_type"] == "qwen2"  # q/k/v always biased, o_proj never; Llama's attention_bias covers all four
    kwargs = dict(
        vocab_size=src["vocab_size"],
        hidden_size=src["hidden_size"],
        num_hidden_layers=src["num_hidden_layers"],
        intermediate_size=src["intermediate_size"],
        layer_types=["attention"] * src["num_hidden_layers"],
        norm_type="rmsnorm",
        norm_eps=src["rms_norm_eps"],
        norm_bias=False,
        hidden_act=src["hidden_act"],
        mlp_bias=src.get("mlp_bias", False),
        mlp_gated=True,
        parallel_residual=False,
        num_attention_heads=src["num_attention_heads"],
        num_key_value_heads=src["num_key_value_heads"],
        head_dim=src.get("head_dim"),  # absent for Qwen2: hidden_size // num_attention_heads
        attention_bias=True if qwen2 else src.get("attention_bias", False),
        attention_out_bias=False if qwen2 else src.get("attention_bias", False),  # Mistral: none
        rope_parameters=src["rope_parameters"],
        max_position_embeddings=src["max_position_embeddings"],
        tie_word_embeddings=src["tie_word_embeddings"],
    )
    kwargs.update(overrides)
    return XatlConfig(**kwargs)


def llama_family_to_xatl_state_dict(source: PreTrainedModel) -> dict[str, torch.Tensor]:
    """Rename Llama-family weights into xatl names; fc1 rows are [up; gate]; a tied lm_head is left out."""
    renames = {
        "model.norm.": "model.final_norm.",
        ".input_layernorm.": ".input_norm.",
        ".post_attention_layernorm.": ".mlp_norm.",
        ".self_attn.o_proj.": ".mixer.out_proj.",
        ".self_attn.": ".mixer.",
        ".mlp.down_proj.": ".mlp.fc2.",
    }
    state = source.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name == "lm_head.weight" and source.config.tie_word_embeddings:
            continue
        if ".mlp.gate_proj." in name:
            continue
        if ".mlp.up_proj." in name:
            gate = state[name.replace(".up_proj.", ".gate_proj.")]
            out[name.replace(".up_proj.", ".fc1.")] = torch.cat([tensor, gate], dim=0)
            continue
        for old, new in renames.items():
            name = name.replace(old, new)
        out[name] = tensor
    return out


def _load_xatl(cfg: XatlConfig, state: dict[str, torch.Tensor]) -> XatlForCausalLM:
    model = XatlForCausalLM(cfg).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected
    assert set(missing) == ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    return model


@pytest.mark.parametrize("case", list(LLAMA_FAMILY_CASES))
def test_attention_model_reproduces_llama_family_logits(case: str) -> None:
    config_class, model_class, overrides, length = LLAMA_FAMILY_CASES[case]
    torch.manual_seed(0)
    source = make_llama_family_source(config_class, model_class, overrides)
    cfg = llama_family_xatl_config(source.config)
    state = llama_family_to_xatl_state_dict(source)
    model = _load_xatl(cfg, state)
    if cfg.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    if "head_dim" in overrides:
        assert cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads
    assert cfg.rope_parameters["rope_type"] == source.config.rope_parameters["rope_type"]

    ids = torch.randint(0, VOCAB, (2, length))
    with torch.no_grad():
        expected = source(ids).logits
        got = model(ids).logits
    assert (got - expected).abs().max().item() <= 1e-4

    if cfg.rope_parameters["rope_type"] != "default":  # the scaling must matter, or this test could not fail
        default_rope = {"rope_type": "default", "rope_theta": cfg.rope_parameters["rope_theta"]}
        unscaled = _load_xatl(llama_family_xatl_config(source.config, rope_parameters=default_rope), state)
        with torch.no_grad():
            assert (unscaled(ids).logits - expected).abs().max().item() > 1e-2


@pytest.mark.parametrize(
    ("rope_parameters", "length"),
    [
        ({"rope_type": "default", "rope_theta": 10000.0}, 40),
        (LLAMA3_ROPE, 40),
        (LINEAR_ROPE, 40),
        (DYNAMIC_ROPE, 40),  # within max_position_embeddings: the original frequencies
        (DYNAMIC_ROPE, MAX_POSITIONS + 17),  # beyond: NTK-rescaled for this length
        (YARN_ROPE, 40),
        (LONGROPE_ROPE, 40),  # short factors
        (LONGROPE_ROPE, 80),  # beyond original_max_position_embeddings: long factors
    ],
    ids=["default", "llama3", "linear", "dynamic-short", "dynamic-long", "yarn", "longrope-short", "longrope-long"],
)
def test_rotary_cos_sin_matches_llama_rotary_embedding_bit_for_bit(rope_parameters: dict, length: int) -> None:
    source = LlamaConfig(
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        max_position_embeddings=MAX_POSITIONS,
        rope_parameters=copy.deepcopy(rope_parameters),
    )
    cfg = tiny_config(
        layer_types=["attention", "attention"],
        max_position_embeddings=MAX_POSITIONS,
        rope_parameters=source.to_dict()["rope_parameters"],
    )
    position_ids = torch.arange(length)[None].expand(2, -1)
    rotary = LlamaRotaryEmbedding(source)  # fresh: dynamic / longrope keep state between calls
    expected_cos, expected_sin = rotary(torch.zeros(1, dtype=torch.float32), position_ids)
    cos, sin = rotary_cos_sin(cfg, position_ids, torch.float32)
    assert torch.equal(cos, expected_cos) and torch.equal(sin, expected_sin)


def test_padding_mask_matches_unpadded_attention_and_mamba_outputs() -> None:
    torch.manual_seed(0)
    model = XatlForCausalLM(tiny_config(num_hidden_layers=2, layer_types=["mamba", "attention"])).eval()
    ids = torch.randint(0, VOCAB, (1, 10))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)], dim=1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        plain = model(ids).logits
        left_padded = model(padded, attention_mask=mask, position_ids=position_ids).logits
    assert torch.isfinite(left_padded).all()
    torch.testing.assert_close(left_padded[:, 3:], plain, atol=1e-5, rtol=1e-5)


def _assert_mamba_init(mixer: XatlMamba, cfg: XatlConfig) -> None:
    m = cfg.mamba
    expected_a_log = torch.log(torch.arange(1, m["d_state"] + 1, dtype=torch.float32))
    torch.testing.assert_close(mixer.A_log.detach(), expected_a_log.expand(mixer.d_inner, -1))
    torch.testing.assert_close(mixer.D.detach(), torch.ones(mixer.d_inner))
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias.detach())
    assert dt.min().item() >= min(m["dt_min"], m["dt_init_floor"]) * (1 - 1e-4)
    assert dt.max().item() <= m["dt_max"] * (1 + 1e-4)
    assert dt.std().item() > 0  # random, not a constant
    bound = m["dt_rank"] ** -0.5 * m["dt_scale"]
    assert mixer.dt_proj.weight.abs().max().item() <= bound
    assert mixer.dt_proj.weight.abs().max().item() > bound / 2


def test_mamba_init_via_meta_to_empty_and_init_function() -> None:
    cfg = tiny_config(num_hidden_layers=4, mamba={"d_state": 8, "dt_min": 0.01, "dt_max": 0.05})
    with torch.device("meta"):
        meta_model = XatlForCausalLM(cfg)
    mixer = meta_model.model.layers[3].mixer.to_empty(device="cpu")
    for param in mixer.parameters():
        param.data.fill_(float("nan"))  # make garbage visible: every parameter must be set by the init
    torch.manual_seed(0)
    # Reverse (children before parent) order: the result must not depend on visiting order.
    for module in reversed(list(mixer.modules())):
        init_xatl_weights(module, cfg)
    assert all(torch.isfinite(p).all() for p in mixer.parameters())
    _assert_mamba_init(mixer, cfg)
    in_bound = 1 / math.sqrt(HIDDEN)
    assert mixer.in_proj.weight.abs().max().item() <= in_bound
    out_bound = 1 / math.sqrt(mixer.d_inner) / math.sqrt(2 * cfg.num_hidden_layers)
    assert mixer.out_proj.weight.abs().max().item() <= out_bound


def test_mamba_init_via_model_constructor() -> None:
    cfg = tiny_config(num_hidden_layers=2)
    torch.manual_seed(0)
    model = XatlForCausalLM(cfg)
    for layer in model.model.layers:
        _assert_mamba_init(layer.mixer, cfg)
        assert torch.equal(layer.mlp.fc1.bias, torch.zeros_like(layer.mlp.fc1.bias))
        assert torch.equal(layer.input_norm.weight, torch.ones(HIDDEN))
    assert abs(model.model.embed_tokens.weight.std().item() - cfg.initializer_range) < 0.005


def naive_scan(u, delta, A, B, C, D, z, delta_bias):
    """Per-timestep, per-channel loop: deliberately different code from the reference."""
    batch, d, length = u.shape
    y = torch.zeros(batch, d, length, dtype=torch.float64)
    for b in range(batch):
        for c in range(d):
            h = torch.zeros(A.shape[1], dtype=torch.float64)
            for t in range(length):
                dt = math.log1p(math.exp(float(delta[b, c, t] + delta_bias[c])))
                h = torch.exp(dt * A[c].double()) * h + dt * B[b, :, t].double() * float(u[b, c, t])
                out = float(h @ C[b, :, t].double()) + float(D[c] * u[b, c, t])
                y[b, c, t] = out * float(z[b, c, t]) / (1 + math.exp(-float(z[b, c, t])))
    return y


def test_reference_scan_matches_naive_loop() -> None:
    torch.manual_seed(0)
    batch, d, n, length = 2, 3, 4, 7
    u, delta, z = torch.randn(batch, d, length), torch.randn(batch, d, length), torch.randn(batch, d, length)
    A = -torch.rand(d, n) - 0.1
    B, C = torch.randn(batch, n, length), torch.randn(batch, n, length)
    D, delta_bias = torch.randn(d), torch.randn(d)
    got = selective_scan_reference(u, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=True)
    expected = naive_scan(u, delta, A, B, C, D, z, delta_bias)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("layer_type", "length", "changed"),
    [("mamba", 12, 7), ("mamba2", 19, 11)],  # mamba2: across chunks of 8
)
def test_lci_mixers_are_causal(layer_type: str, length: int, changed: int) -> None:
    torch.manual_seed(0)
    extra = {"mamba2": MAMBA2_TINY} if layer_type == "mamba2" else {}
    cfg = tiny_config(num_hidden_layers=1, layer_types=[layer_type], **extra)
    mixer = XatlForCausalLM(cfg).model.layers[0].mixer
    x = torch.randn(2, length, HIDDEN)
    x2 = x.clone()
    x2[:, changed] += torch.randn(2, HIDDEN)
    with torch.no_grad():
        y, y2 = mixer(x), mixer(x2)
    torch.testing.assert_close(y[:, :changed], y2[:, :changed], atol=0, rtol=0)
    assert (y[:, changed] - y2[:, changed]).abs().max() > 1e-4


def test_hybrid_model_forward_and_save_load_roundtrip(tmp_path) -> None:
    torch.manual_seed(0)
    cfg = tiny_config(num_hidden_layers=3, layer_types=["mamba", "attention", "mamba"])
    model = XatlForCausalLM(cfg).eval()
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        out = model(ids, labels=ids)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    assert abs(out.loss.item() - math.log(VOCAB)) < 1.0  # near uniform at init

    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, XatlForCausalLM)
    assert loaded.config.layer_types == ["mamba", "attention", "mamba"]
    assert loaded.config.mamba == cfg.mamba
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, out.logits)


def test_tied_embeddings_share_storage_and_are_saved_once(tmp_path) -> None:
    torch.manual_seed(0)
    model = XatlForCausalLM(tiny_config(tie_word_embeddings=True, layer_types=["attention", "mamba"]))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight, atol=0, rtol=0)


def test_llama_style_block_runs_with_gqa_rmsnorm_and_gated_mlp() -> None:
    torch.manual_seed(0)
    cfg = tiny_config(
        layer_types=["attention", "mamba"],
        norm_type="rmsnorm",
        norm_bias=False,
        num_key_value_heads=2,
        attention_bias=False,
        attention_out_bias=False,
        mlp_gated=True,
        mlp_bias=False,
        hidden_act="silu",
        parallel_residual=False,
    )
    model = XatlForCausalLM(cfg)
    keys = set(model.state_dict())
    assert "model.layers.0.mixer.k_proj.bias" not in keys
    assert model.model.layers[0].mixer.k_proj.weight.shape == (2 * 16, HIDDEN)
    assert model.model.layers[0].mlp.fc1.weight.shape == (2 * cfg.intermediate_size, HIDDEN)
    assert torch.isfinite(model(torch.randint(0, VOCAB, (1, 8))).logits).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_hidden_layers": 2, "layer_types": ["mamba", "transformer"]}, "unknown layer_types"),
        ({"num_hidden_layers": 3, "layer_types": ["mamba", "attention"]}, "num_hidden_layers"),
        ({"mamba": {"d_sate": 8}}, "unknown mamba config keys"),
        ({"mamba2": {"headdim": 8, "d_sate": 8}}, "unknown mamba2 config keys"),
        ({"num_hidden_layers": 1, "layer_types": ["mamba2"], "mamba2": {"headdim": 100}}, "divisible by headdim"),
        ({"num_hidden_layers": 1, "layer_types": ["mamba2"], "mamba2": {"ngroups": 7}}, "divisible by ngroups"),
        ({"norm_type": "batchnorm"}, "norm_type"),
        ({"rope_parameters": {"rope_type": "mrope", "rope_theta": 1e4}}, "unsupported rope_parameters"),
        ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),  # missing keys
        ({"rope_parameters": {"full_attention": {"rope_type": "default"}}}, "one flat dict"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}, "rope_theta": 5e5}, "conflicts"),
        (
            {"num_hidden_layers": 1, "layer_types": ["attention"], "hidden_size": 100, "num_attention_heads": 4},
            "even rotary dimension",
        ),
    ],
)
def test_config_rejects_invalid_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        XatlConfig(**kwargs)


def test_config_defaults_and_json_roundtrip(tmp_path) -> None:
    cfg = XatlConfig(num_hidden_layers=2, hidden_size=100, num_attention_heads=4)
    assert cfg.layer_types == ["mamba", "mamba"]
    assert cfg.mamba["dt_rank"] == 7 and cfg.mamba["d_state"] == 16
    assert cfg.head_dim == 25 and cfg.num_key_value_heads == 4
    cfg.save_pretrained(tmp_path)
    again = XatlConfig.from_pretrained(tmp_path)
    assert again.to_dict() == cfg.to_dict()


def test_config_rope_parameters_from_legacy_arguments_and_json_roundtrip(tmp_path) -> None:
    legacy = XatlConfig(num_hidden_layers=1, rope_theta=500.0, partial_rotary_factor=0.25)
    assert legacy.rope_parameters == {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.25}
    assert legacy.rope_theta == 500.0 and legacy.partial_rotary_factor == 0.25
    saved = legacy.to_dict()
    assert "rope_theta" not in saved and "partial_rotary_factor" not in saved  # only inside rope_parameters
    assert XatlConfig().rope_parameters == {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}
    # A config.json written before rope_parameters existed (top-level rope_theta / partial_rotary_factor) still loads.
    old_json = {k: v for k, v in saved.items() if k != "rope_parameters"} | {"rope_theta": 500.0}
    assert XatlConfig.from_dict({**old_json, "partial_rotary_factor": 0.25}).to_dict() == saved
    # The pre-5 spellings: `rope_scaling` with `type`, theta next to it.
    scaled = XatlConfig(rope_scaling={"type": "linear", "factor": 2.0}, rope_theta=5e5)
    assert scaled.rope_parameters["rope_type"] == "linear" and scaled.rope_theta == 5e5

    source = dict(LLAMA3_ROPE)
    cfg = tiny_config(layer_types=["attention", "mamba"], max_position_embeddings=MAX_POSITIONS, rope_parameters=source)
    assert source == LLAMA3_ROPE  # copied, not mutated
    cfg.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())["rope_parameters"]
    assert {k: stored[k] for k in LLAMA3_ROPE} == LLAMA3_ROPE
    again = XatlConfig.from_pretrained(tmp_path)
    assert again.to_dict() == cfg.to_dict()


def test_from_pretrained_initialises_only_missing_tensors(tmp_path) -> None:
    torch.manual_seed(0)
    cfg = tiny_config(num_hidden_layers=2, layer_types=["mamba", "attention"])
    model = XatlForCausalLM(cfg)
    model.save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    dropped = ["model.layers.0.mixer.dt_proj.bias", "model.layers.0.mixer.A_log", "model.layers.1.mlp.fc2.bias"]
    for key in dropped:
        weights[key] = weights[key] * 0 + 7.0  # a value no init produces, so a re-init would show
    save_file({k: v for k, v in weights.items() if k not in dropped}, str(tmp_path / "model.safetensors"))

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    state = loaded.state_dict()
    for key, value in model.state_dict().items():
        if key not in dropped:
            assert torch.equal(state[key], value), key  # loaded tensors untouched, also in mixed modules
    _assert_mamba_init(loaded.model.layers[0].mixer, cfg)
    assert torch.equal(state["model.layers.1.mlp.fc2.bias"], torch.zeros(HIDDEN))


def test_copied_model_files_load_as_remote_code_without_the_package(tmp_path) -> None:
    """The model files are copied into converted folders and must work where xatl_convert is absent."""
    torch.manual_seed(0)
    model = XatlForCausalLM(tiny_config(layer_types=["mamba", "attention"])).eval()
    model.save_pretrained(tmp_path)
    ids = torch.arange(10)[None]
    with torch.no_grad():
        torch.save(model(ids).logits, tmp_path / "expected.pt")
    models_dir = Path(xatl_convert.models.__file__).parent
    for name in MODELING_FILES:
        shutil.copy(models_dir / name, tmp_path / name)
    config = json.loads((tmp_path / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_xatl.XatlConfig",
        "AutoModelForCausalLM": "modeling_xatl.XatlForCausalLM",
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "assert 'xatl_convert' not in sys.modules\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()\n"
        "assert type(m).__module__.startswith('transformers_modules'), type(m).__module__\n"
        "with torch.no_grad():\n"
        "    assert torch.equal(m(torch.arange(10)[None]).logits, torch.load(sys.argv[1] + '/expected.pt'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]


# --------------------------------------------------------------------------------------------------------------
# Mamba2
# --------------------------------------------------------------------------------------------------------------


def naive_ssd(x, dt, A, B, C, D, dt_bias, h0=None):
    """Per-timestep recurrence h_t = exp(dt A) h_{t-1} + dt B_t x_tᵀ, y_t = C_t h_t + D x_t, in float64."""
    batch, length, heads, headdim = x.shape
    groups, n = B.shape[2], B.shape[3]
    y = torch.zeros(batch, length, heads, headdim, dtype=torch.float64)
    h = torch.zeros(batch, heads, headdim, n, dtype=torch.float64) if h0 is None else h0.double().clone()
    for b in range(batch):
        for head in range(heads):
            g = head // (heads // groups)
            for t in range(length):
                step = float(torch.nn.functional.softplus(dt[b, t, head].double() + dt_bias[head].double()))
                h[b, head] = math.exp(step * float(A[head])) * h[b, head] + step * torch.outer(
                    x[b, t, head].double(), B[b, t, g].double()
                )
                y[b, t, head] = h[b, head] @ C[b, t, g].double() + float(D[head]) * x[b, t, head].double()
    return y, h


def _ssd_inputs(dtype: torch.dtype, length: int = 12):
    torch.manual_seed(0)
    batch, heads, headdim, groups, n = 2, 4, 3, 2, 5
    x = torch.randn(batch, length, heads, headdim, dtype=dtype)
    dt = torch.randn(batch, length, heads, dtype=dtype)
    A = -torch.rand(heads, dtype=dtype) * 2 - 0.1
    B = torch.randn(batch, length, groups, n, dtype=dtype)
    C = torch.randn(batch, length, groups, n, dtype=dtype)
    D, dt_bias = torch.randn(heads, dtype=dtype), torch.randn(heads, dtype=dtype)
    return x, dt, A, B, C, D, dt_bias


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk_size", [4, 5, 12, 16])  # L = 12: divides, does not divide, equals, exceeds
def test_ssd_chunk_reference_matches_naive_recurrence(chunk_size: int, dtype: torch.dtype) -> None:
    x, dt, A, B, C, D, dt_bias = _ssd_inputs(dtype)
    y, final = ssd_chunk_scan_reference(
        x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=True, return_final_states=True
    )
    expected_y, expected_h = naive_ssd(x, dt, A, B, C, D, dt_bias)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), expected_y, atol=tol, rtol=tol)
    torch.testing.assert_close(final.double(), expected_h, atol=tol, rtol=tol)


def test_ssd_chunk_reference_continues_from_initial_states() -> None:
    x, dt, A, B, C, D, dt_bias = _ssd_inputs(torch.float64, length=11)
    kwargs = {"D": D, "dt_bias": dt_bias, "dt_softplus": True, "return_final_states": True}
    y1, h1 = ssd_chunk_scan_reference(x[:, :6], dt[:, :6], A, B[:, :6], C[:, :6], 4, **kwargs)
    y2, h2 = ssd_chunk_scan_reference(x[:, 6:], dt[:, 6:], A, B[:, 6:], C[:, 6:], 4, initial_states=h1, **kwargs)
    expected_y, expected_h = naive_ssd(x, dt, A, B, C, D, dt_bias)
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), expected_y, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(h2, expected_h, atol=1e-10, rtol=1e-10)


def test_gated_rmsnorm_normalises_each_group_after_the_gate() -> None:
    torch.manual_seed(0)
    norm = XatlGatedRMSNorm(8, group_size=4, eps=1e-5)
    norm.weight.data = torch.randn(8)
    x, z = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    gated = (x * torch.nn.functional.silu(z)).view(2, 3, 2, 4)
    expected = (gated / torch.sqrt(gated.pow(2).mean(-1, keepdim=True) + 1e-5)).view(2, 3, 8) * norm.weight
    torch.testing.assert_close(norm(x, z), expected)
    before = XatlGatedRMSNorm(8, group_size=8, norm_before_gate=True)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * torch.nn.functional.silu(z)
    torch.testing.assert_close(before(x, z), expected)


def test_mamba2_parameters_follow_mamba_ssm_layout() -> None:
    cfg = tiny_config(num_hidden_layers=1, layer_types=["mamba2"], mamba2=MAMBA2_TINY)
    assert cfg.mamba2 == {**MAMBA2_DEFAULTS, **MAMBA2_TINY}
    mixer = XatlForCausalLM(cfg).model.layers[0].mixer
    d_inner, nheads, n_bc = 2 * HIDDEN, 2 * HIDDEN // 16, 2 * 16
    shapes = {name: tuple(p.shape) for name, p in mixer.named_parameters()}
    assert shapes == {
        "in_proj.weight": (2 * d_inner + 2 * n_bc + nheads, HIDDEN),  # rows [z, x, B, C, dt]
        "conv1d.weight": (d_inner + 2 * n_bc, 1, 4),
        "conv1d.bias": (d_inner + 2 * n_bc,),
        "dt_bias": (nheads,),
        "A_log": (nheads,),
        "D": (nheads,),
        "norm.weight": (d_inner,),
        "out_proj.weight": (HIDDEN, d_inner),
    }


def _assert_mamba2_init(mixer: XatlMamba2, cfg: XatlConfig) -> None:
    m = cfg.mamba2
    dt = torch.nn.functional.softplus(mixer.dt_bias.detach())
    assert dt.min().item() >= min(m["dt_min"], m["dt_init_floor"]) * (1 - 1e-4)
    assert dt.max().item() <= m["dt_max"] * (1 + 1e-4) and dt.std().item() > 0
    a = torch.exp(mixer.A_log.detach())
    assert a.min().item() >= m["A_init_range"][0] - 1e-5 and a.max().item() <= m["A_init_range"][1] + 1e-4
    assert a.std().item() > 0
    assert torch.equal(mixer.D.detach(), torch.ones(mixer.nheads))
    assert torch.equal(mixer.norm.weight.detach(), torch.ones(mixer.d_inner))
    assert mixer.in_proj.weight.abs().max().item() <= 1 / math.sqrt(HIDDEN)
    out_bound = 1 / math.sqrt(mixer.d_inner) / math.sqrt(2 * cfg.num_hidden_layers)
    assert mixer.out_proj.weight.abs().max().item() <= out_bound


def test_mamba2_init_via_meta_to_empty_and_via_constructor() -> None:
    cfg = tiny_config(
        num_hidden_layers=2, layer_types=["mamba2", "mamba2"], mamba2={**MAMBA2_TINY, "A_init_range": [2, 4]}
    )
    with torch.device("meta"):
        meta_model = XatlForCausalLM(cfg)
    mixer = meta_model.model.layers[1].mixer.to_empty(device="cpu")
    for param in mixer.parameters():
        param.data.fill_(float("nan"))
    torch.manual_seed(0)
    for module in reversed(list(mixer.modules())):  # children first: the order must not matter
        init_xatl_weights(module, cfg)
    assert all(torch.isfinite(p).all() for p in mixer.parameters())
    _assert_mamba2_init(mixer, cfg)
    torch.manual_seed(0)
    for layer in XatlForCausalLM(cfg).model.layers:
        _assert_mamba2_init(layer.mixer, cfg)


def test_hybrid_mamba2_model_forward_and_save_load_roundtrip(tmp_path) -> None:
    torch.manual_seed(0)
    cfg = tiny_config(num_hidden_layers=3, layer_types=["mamba2", "attention", "mamba"], mamba2=MAMBA2_TINY)
    model = XatlForCausalLM(cfg).eval()
    ids = torch.randint(0, VOCAB, (2, 19))
    with torch.no_grad():
        out = model(ids, labels=ids)
    assert torch.isfinite(out.logits).all() and abs(out.loss.item() - math.log(VOCAB)) < 1.0
    model.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored["layer_types"] == ["mamba2", "attention", "mamba"] and stored["mamba2"] == cfg.mamba2
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.model.layers[0].mixer, XatlMamba2)
    assert loaded.config.mamba2 == cfg.mamba2
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, out.logits)
