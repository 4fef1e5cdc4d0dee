"""Cached generation of the xatl family: per-token Mamba / Mamba2 state updates and an attention KV cache must
reproduce a full forward pass, and `generate` must give the same tokens with and without the cache."""

from __future__ import annotations

import pytest
import torch

from xatl_convert.models import XatlCache, XatlConfig, XatlForCausalLM, new_cache

VOCAB, HIDDEN = 128, 64

LAYER_CASES = {
    "mamba": ["mamba", "mamba"],
    "mamba2": ["mamba2", "mamba2"],
    "mamba+attention": ["mamba", "attention", "mamba"],
    "mamba2+attention": ["attention", "mamba2", "attention"],
    "attention": ["attention", "attention"],
}
STYLES = {
    "neox": {"parallel_residual": True, "partial_rotary_factor": 0.25},
    "llama": {
        "norm_type": "rmsnorm",
        "norm_bias": False,
        "num_key_value_heads": 2,
        "attention_bias": False,
        "attention_out_bias": False,
        "mlp_gated": True,
        "mlp_bias": False,
        "hidden_act": "silu",
        "parallel_residual": False,
    },
}


def make_model(layer_types: list[str], style: str = "neox", seed: int = 0) -> XatlForCausalLM:
    cfg = XatlConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=len(layer_types),
        intermediate_size=128,
        num_attention_heads=4,
        layer_types=layer_types,
        mamba={"d_state": 8},
        mamba2={"d_state": 16, "headdim": 16, "ngroups": 2, "chunk_size": 8},
        **STYLES[style],
    )
    torch.manual_seed(seed)
    model = XatlForCausalLM(cfg).eval()
    with torch.no_grad():  # larger, more varied dt than the init so that the recurrent states matter
        for module in model.modules():
            if hasattr(module, "dt_bias"):
                module.dt_bias.add_(torch.randn_like(module.dt_bias) + 2.0)
            if hasattr(module, "dt_proj"):
                module.dt_proj.bias.add_(torch.randn_like(module.dt_proj.bias) + 2.0)
    return model


@pytest.mark.parametrize("style", list(STYLES))
@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_token_by_token_decoding_matches_full_forward(case: str, style: str) -> None:
    model = make_model(LAYER_CASES[case], style)
    ids = torch.randint(0, VOCAB, (2, 13))  # 13: more than one Mamba2 chunk of 8, not a multiple of it
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :1], use_cache=True)
        steps = [out.logits]
        for t in range(1, ids.shape[1]):
            out = model(ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-4
    cache = out.cache
    assert isinstance(cache, XatlCache) and cache.seen_tokens == ids.shape[1]
    for i, kind in enumerate(model.config.layer_types):
        if kind == "attention":
            assert cache.key_cache[i].shape == (2, model.config.num_key_value_heads, 13, model.config.head_dim)


@pytest.mark.parametrize("style", list(STYLES))
@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_prefill_then_chunk_then_single_steps_match_full_forward(case: str, style: str) -> None:
    model = make_model(LAYER_CASES[case], style, seed=1)
    ids = torch.randint(0, VOCAB, (2, 21))
    with torch.no_grad():
        full = model(ids).logits
        first = model(ids[:, :9], use_cache=True)  # prefill across a chunk boundary
        second = model(ids[:, 9:14], cache=first.cache, use_cache=True)  # several tokens on a non-empty cache
        logits = [first.logits, second.logits]
        cache = second.cache
        for t in range(14, ids.shape[1]):
            logits.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    assert (torch.cat(logits, dim=1) - full).abs().max().item() <= 1e-4


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_generate_with_cache_matches_generate_without(case: str) -> None:
    model = make_model(LAYER_CASES[case], "llama" if "2" in case else "neox", seed=2)
    ids = torch.randint(0, VOCAB, (2, 7))
    lengths: list[int] = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, args, out: lengths.append(args[0].shape[1]))
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert lengths == [7] + [1] * 9  # one prefill, then one new token per step: the prefix is never re-read
        lengths.clear()
        uncached = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0, use_cache=False)
        assert lengths == list(range(7, 17))
    hook.remove()
    assert cached.shape == (2, 17)
    assert torch.equal(cached, uncached)


def test_generate_left_padded_batch_matches_unpadded_rows() -> None:
    model = make_model(["mamba2", "attention", "mamba"], "llama", seed=3)
    short, long = torch.randint(1, VOCAB, (1, 5)), torch.randint(1, VOCAB, (1, 8))
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1), long])
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    with torch.no_grad():
        padded = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        alone = [model.generate(row, max_new_tokens=6, do_sample=False, pad_token_id=0) for row in (short, long)]
    assert torch.equal(padded[0, 3:], alone[0][0])
    assert torch.equal(padded[1], alone[1][0])


def test_cache_layout_and_state_bytes() -> None:
    model = make_model(["mamba", "mamba2", "attention"], "llama")
    cfg = model.config
    cache = new_cache(model, batch_size=3)
    assert cache.get_seq_length() == 0 and cache.is_linear == [True, True, False]
    d_inner = 2 * HIDDEN
    conv_dim = d_inner + 2 * 2 * 16
    assert cache.conv_states[0].shape == (3, d_inner, 4) and cache.ssm_states[0].shape == (3, d_inner, 8)
    assert cache.conv_states[1].shape == (3, conv_dim, 4) and cache.ssm_states[1].shape == (3, 8, 16, 16)
    assert cache.conv_states[2] is None and cache.key_cache[2].shape == (3, 2, 0, cfg.head_dim)
    recurrent = 4 * (d_inner * 4 + d_inner * 8 + conv_dim * 4 + 8 * 16 * 16)  # fp32, per sequence
    assert cache.recurrent_bytes() == recurrent and cache.kv_bytes() == 0
    assert cache.state_bytes(per_sequence=False) == 3 * recurrent

    ids = torch.randint(0, VOCAB, (3, 6))
    with torch.no_grad():
        out = model(ids, cache=cache, use_cache=True)
        model(ids[:, :1], cache=out.cache)
    assert out.cache is cache and cache.seen_tokens == 7
    kv_per_token = 2 * cfg.num_key_value_heads * cfg.head_dim * 4
    assert cache.recurrent_bytes() == recurrent  # fixed size
    assert cache.kv_bytes() == 7 * kv_per_token  # grows with the tokens seen
    assert cache.state_bytes() == recurrent + 7 * kv_per_token
    assert new_cache(cfg, 1, dtype=torch.bfloat16).recurrent_bytes() == recurrent // 2


def test_forward_without_use_cache_returns_no_cache_and_rejects_two_caches() -> None:
    model = make_model(["mamba2", "attention"])
    ids = torch.randint(0, VOCAB, (1, 4))
    with torch.no_grad():
        assert model(ids).cache is None
        out = model(ids, use_cache=True)
        with pytest.raises(ValueError, match="once"):
            model(ids[:, :1], cache=out.cache, past_key_values=new_cache(model, 1))
