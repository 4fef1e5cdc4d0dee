"""The gated delta rule references against transformers' Qwen3-Next PyTorch path, each other and autograd, and fla's
signatures and refusals on the stand-ins.

Errors are relative: ‖got − expected‖ / ‖expected‖ over a whole tensor. Keys are unit vectors where q/k l2norm is off
(as fla's tests pass them): with |k|² β > 2 the delta rule itself diverges, whichever way it is computed.
"""

from __future__ import annotations

import inspect
import re

import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen3_next.modeling_qwen3_next import (
    torch_chunk_gated_delta_rule,
    torch_recurrent_gated_delta_rule,
)

from xatl_convert.models.delta_rule_xatl import (
    DeltaRuleArgumentError,
    chunk_gated_delta_rule,
    chunk_gated_delta_rule_reference,
    fused_recurrent_gated_delta_rule,
    l2norm,
    recurrent_gated_delta_rule_reference,
)

NAMES = ("q", "k", "v", "g", "beta")


def inputs(
    batch: int = 2,
    length: int = 130,
    heads: int = 2,
    v_heads: int = 2,
    k_dim: int = 16,
    v_dim: int = 8,
    unit_keys: bool = True,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Gated DeltaNet inputs as Qwen3-Next makes them: g = −exp(A_log)·softplus(a + dt_bias) from about −0.01 to −3
    per step, beta = sigmoid(b)."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(batch, length, heads, k_dim, generator=gen)
    raw_g = torch.randn(batch, length, v_heads, generator=gen) * 2 - 1
    return {
        "q": torch.randn(batch, length, heads, k_dim, generator=gen).to(dtype),
        "k": (F.normalize(k, dim=-1) if unit_keys else k).to(dtype),
        "v": torch.randn(batch, length, v_heads, v_dim, generator=gen).to(dtype),
        "g": (-0.5 * F.softplus(raw_g)).to(dtype),
        "beta": torch.sigmoid(torch.randn(batch, length, v_heads, generator=gen)).to(dtype),
    }


def state_for(x: dict[str, torch.Tensor], seed: int = 1) -> torch.Tensor:
    batch, _, v_heads, v_dim = x["v"].shape
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, v_heads, x["k"].shape[-1], v_dim, generator=gen)


def rel(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


CASES = {
    # name: (inputs(...) arguments, use_qk_l2norm_in_kernel, with an initial state)
    "plain": ({}, False, False),
    "l2norm": ({"unit_keys": False}, True, False),
    "initial state": ({}, False, True),
    "grouped value heads": ({"v_heads": 4, "unit_keys": False}, True, True),
    "one token": ({"length": 1, "v_heads": 4}, False, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_references_match_transformers_qwen3_next(case: str) -> None:
    shape, l2, with_state = CASES[case]
    x = inputs(**shape)
    h0 = state_for(x) if with_state else None
    common = {"initial_state": h0, "output_final_state": True, "use_qk_l2norm_in_kernel": l2}
    theirs_chunk = torch_chunk_gated_delta_rule(x["q"], x["k"], x["v"], g=x["g"], beta=x["beta"], **common)
    theirs_rec = torch_recurrent_gated_delta_rule(x["q"], x["k"], x["v"], g=x["g"], beta=x["beta"], **common)
    ours_chunk = chunk_gated_delta_rule_reference(**x, **common)
    ours_rec = recurrent_gated_delta_rule_reference(**x, **common)
    batch, length, v_heads, v_dim = x["v"].shape
    assert ours_chunk[0].shape == (batch, length, v_heads, v_dim)
    assert ours_chunk[1].shape == (batch, v_heads, x["k"].shape[-1], v_dim) and ours_chunk[1].dtype == torch.float32
    assert theirs_chunk[0].abs().max() > 0.1 and theirs_chunk[1].abs().max() > 0.1  # not vacuous
    for ours, theirs in ((ours_chunk, theirs_chunk), (ours_rec, theirs_rec), (ours_chunk, theirs_rec)):
        assert rel(ours[0], theirs[0]) <= 1e-5
        assert rel(ours[1], theirs[1]) <= 1e-5


@pytest.mark.parametrize("chunk_size", [64, 16])
def test_chunked_equals_recurrent_on_a_long_sequence(chunk_size: int) -> None:
    x = inputs(length=300, heads=2, v_heads=4)
    h0 = state_for(x)
    o, state = chunk_gated_delta_rule_reference(**x, initial_state=h0, output_final_state=True, chunk_size=chunk_size)
    o_rec, state_rec = recurrent_gated_delta_rule_reference(**x, initial_state=h0, output_final_state=True)
    assert rel(o, o_rec) <= 1e-5 and rel(state, state_rec) <= 1e-5
    assert chunk_gated_delta_rule_reference(**x)[1] is None  # no final state unless asked


def test_prefix_then_continuation_equals_one_pass() -> None:
    x = inputs(length=230, v_heads=4, unit_keys=False)
    whole, final = chunk_gated_delta_rule_reference(**x, output_final_state=True, use_qk_l2norm_in_kernel=True)
    split = 100  # not a chunk boundary
    first = {name: t[:, :split] for name, t in x.items()}
    rest = {name: t[:, split:] for name, t in x.items()}
    o1, s1 = chunk_gated_delta_rule_reference(**first, output_final_state=True, use_qk_l2norm_in_kernel=True)
    o2, s2 = chunk_gated_delta_rule_reference(
        **rest, initial_state=s1, output_final_state=True, use_qk_l2norm_in_kernel=True
    )
    assert rel(torch.cat([o1, o2], dim=1), whole) <= 1e-5 and rel(s2, final) <= 1e-5
    # decoding: the continuation one token at a time through the recurrent form
    state, outputs = s1, []
    for t in range(split, 230):
        step = {name: tensor[:, t : t + 1] for name, tensor in x.items()}
        o_t, state = recurrent_gated_delta_rule_reference(
            **step, initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=True
        )
        outputs.append(o_t)
    assert rel(torch.cat(outputs, dim=1), whole[:, split:]) <= 1e-5 and rel(state, final) <= 1e-5


def run_with_grads(function, x: dict[str, torch.Tensor], h0: torch.Tensor, **kwargs):
    """Output, final state and the gradients of a fixed random loss w.r.t. q, k, v, g, beta and the initial state."""
    leaves = {name: t.clone().requires_grad_(True) for name, t in {**x, "initial_state": h0}.items()}
    o, state = function(**leaves, output_final_state=True, **kwargs)
    gen = torch.Generator().manual_seed(7)
    loss = (o * torch.randn(o.shape, generator=gen)).sum() + (state * torch.randn(state.shape, generator=gen)).sum()
    loss.backward()
    return o, state, {name: leaf.grad for name, leaf in leaves.items()}


def test_chunked_backward_equals_recurrent_backward() -> None:
    x = inputs(length=75, v_heads=4, unit_keys=False)
    h0 = state_for(x)
    _, _, grads = run_with_grads(chunk_gated_delta_rule_reference, x, h0, use_qk_l2norm_in_kernel=True, chunk_size=16)
    _, _, expected = run_with_grads(recurrent_gated_delta_rule_reference, x, h0, use_qk_l2norm_in_kernel=True)
    for name in (*NAMES, "initial_state"):
        assert expected[name].abs().max() > 1e-3, name
        assert rel(grads[name], expected[name]) <= 1e-4, name


@pytest.mark.parametrize("reference", [chunk_gated_delta_rule_reference, recurrent_gated_delta_rule_reference])
def test_gradcheck_in_float64(reference) -> None:
    x = inputs(batch=1, length=5, heads=1, v_heads=2, k_dim=3, v_dim=2, unit_keys=False, dtype=torch.float64)
    h0 = state_for(x).double()
    leaves = tuple(t.clone().requires_grad_(True) for t in (*x.values(), h0))
    extra = {"chunk_size": 2} if reference is chunk_gated_delta_rule_reference else {}

    def function(q, k, v, g, beta, initial_state):
        o, state = reference(
            q,
            k,
            v,
            g,
            beta,
            initial_state=initial_state,
            output_final_state=True,
            use_qk_l2norm_in_kernel=True,
            **extra,
        )
        assert o.dtype == state.dtype == torch.float64
        return o, state

    assert torch.autograd.gradcheck(function, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_bf16_inputs_give_bf16_outputs_close_to_fp32() -> None:
    x = inputs(length=130, v_heads=4, unit_keys=False, dtype=torch.bfloat16)
    for reference in (chunk_gated_delta_rule_reference, recurrent_gated_delta_rule_reference):
        o, state = reference(**x, output_final_state=True, use_qk_l2norm_in_kernel=True)
        o32, state32 = reference(
            **{n: t.float() for n, t in x.items()}, output_final_state=True, use_qk_l2norm_in_kernel=True
        )
        assert o.dtype == torch.bfloat16 and state.dtype == torch.float32
        assert rel(o, o32) <= 2e-2 and rel(state, state32) <= 1e-5  # only the output's rounding differs


def test_l2norm_is_flas() -> None:
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert torch.allclose(l2norm(x), torch.tensor([[0.6, 0.8], [0.0, 0.0]]), atol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# The stand-ins: fla's signatures, results and refusals
# --------------------------------------------------------------------------------------------------------------

FLA_CHUNK_PARAMETERS = [
    "q",
    "k",
    "v",
    "g",
    "beta",
    "scale",
    "initial_state",
    "output_final_state",
    "use_qk_l2norm_in_kernel",
    "use_beta_sigmoid_in_kernel",
    "allow_neg_eigval",
    "state_v_first",
    "cu_seqlens",
    "cu_seqlens_cpu",
    "chunk_indices",
    "cp_context",
    "kwargs",
]
FLA_RECURRENT_PARAMETERS = [
    "q",
    "k",
    "v",
    "g",
    "gk",
    "gv",
    "beta",
    "scale",
    "initial_state",
    "output_final_state",
    "use_qk_l2norm_in_kernel",
    "use_gate_in_kernel",
    "A_log",
    "dt_bias",
    "use_beta_sigmoid_in_kernel",
    "allow_neg_eigval",
    "state_v_first",
    "cu_seqlens",
    "kwargs",
]


def test_stand_ins_take_flas_signatures() -> None:
    chunk = inspect.signature(chunk_gated_delta_rule).parameters
    recurrent = inspect.signature(fused_recurrent_gated_delta_rule).parameters
    assert list(chunk) == FLA_CHUNK_PARAMETERS and list(recurrent) == FLA_RECURRENT_PARAMETERS
    assert chunk["scale"].default is None and chunk["output_final_state"].default is False
    assert recurrent["g"].default is None and recurrent["beta"].default is None


def test_stand_ins_give_the_references_results() -> None:
    x = inputs(length=70, v_heads=4, unit_keys=False)
    h0 = state_for(x)
    common = {"initial_state": h0, "output_final_state": True, "use_qk_l2norm_in_kernel": True, "scale": 0.3}
    for got, expected in (
        (chunk_gated_delta_rule(**x, **common), chunk_gated_delta_rule_reference(**x, **common)),
        (
            chunk_gated_delta_rule(**x, **common, chunk_size=16),
            chunk_gated_delta_rule_reference(**x, **common, chunk_size=16),
        ),
        (fused_recurrent_gated_delta_rule(**x, **common), recurrent_gated_delta_rule_reference(**x, **common)),
    ):
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert rel(chunk_gated_delta_rule(**x, **common)[0], fused_recurrent_gated_delta_rule(**x, **common)[0]) <= 1e-5
    # fla's defaults: no final state; in fused_recurrent, g None is no decay and beta None is ones
    assert chunk_gated_delta_rule(**x)[1] is None and fused_recurrent_gated_delta_rule(**x)[1] is None
    no_gate = fused_recurrent_gated_delta_rule(x["q"], x["k"], x["v"])[0]
    ones = {"g": torch.zeros_like(x["g"]), "beta": torch.ones_like(x["beta"])}
    assert torch.equal(no_gate, recurrent_gated_delta_rule_reference(x["q"], x["k"], x["v"], **ones)[0])


def test_stand_ins_fused_activations_and_state_layout() -> None:
    x = inputs(length=40, v_heads=4)
    raw_beta, raw_g = torch.randn_like(x["beta"]), torch.randn_like(x["g"])
    A_log, dt_bias = torch.linspace(-1, 1, 4), torch.linspace(-2, 0.5, 4)
    h0 = state_for(x)
    expected = chunk_gated_delta_rule_reference(
        x["q"],
        x["k"],
        x["v"],
        -A_log.exp() * F.softplus(raw_g + dt_bias),
        2 * torch.sigmoid(raw_beta),
        initial_state=h0,
        output_final_state=True,
    )
    fused = {"use_beta_sigmoid_in_kernel": True, "allow_neg_eigval": True, "use_gate_in_kernel": True}
    fused |= {"A_log": A_log, "dt_bias": dt_bias}
    qkv = (x["q"], x["k"], x["v"], raw_g)
    for function in (chunk_gated_delta_rule, fused_recurrent_gated_delta_rule):
        o, state = function(
            *qkv,
            beta=raw_beta,
            initial_state=h0.transpose(-1, -2),
            output_final_state=True,
            state_v_first=True,
            **fused,
        )
        assert rel(o, expected[0]) <= 1e-5 and rel(state.transpose(-1, -2), expected[1]) <= 1e-5
        assert state.shape == (2, 4, 8, 16)  # [N, HV, V, K]
        with pytest.warns(DeprecationWarning, match="transpose_state_layout"):
            old = function(
                *qkv, beta=raw_beta, initial_state=h0.transpose(-1, -2), transpose_state_layout=True, **fused
            )
        assert torch.equal(old[0], o)


def test_stand_in_dtypes_and_backward() -> None:
    x = inputs(length=20, v_heads=4, dtype=torch.bfloat16)
    x["q"] = x["q"].float()
    o, state = chunk_gated_delta_rule(**x, output_final_state=True)
    assert o.dtype == torch.float32 and state.dtype == torch.float32  # fla: o in q's dtype
    o, state = fused_recurrent_gated_delta_rule(**x, output_final_state=True)
    assert o.dtype == torch.bfloat16 and state.dtype == torch.float32  # fla: o allocated like v
    # chunk trains (autograd through the reference); fla's fused recurrent kernel has no backward
    leaves = {name: t.float().requires_grad_(True) for name, t in inputs(length=20).items()}
    chunk_gated_delta_rule(**leaves)[0].sum().backward()
    assert all(leaf.grad is not None and leaf.grad.abs().max() > 0 for leaf in leaves.values())
    with pytest.raises(NotImplementedError, match="no backward"):
        fused_recurrent_gated_delta_rule(**leaves)[0].sum().backward()


def _bad_calls() -> list[tuple[str, object, dict[str, object], str]]:
    """(case, stand-in, changes to a good call, argument the message must name)."""
    x = inputs(length=4)
    chunk, fused = chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
    return [
        ("cu_seqlens", chunk, {"cu_seqlens": torch.tensor([0, 2, 4])}, "cu_seqlens"),
        ("cu_seqlens recurrent", fused, {"cu_seqlens": torch.tensor([0, 2, 4])}, "cu_seqlens"),
        ("chunk_indices", chunk, {"chunk_indices": torch.tensor([0])}, "chunk_indices"),
        ("cp_context", chunk, {"cp_context": object()}, "cp_context"),
        ("head_first", chunk, {"head_first": False}, "head_first"),
        ("head_first recurrent", fused, {"head_first": True}, "head_first"),
        ("chunk_size", chunk, {"chunk_size": 128}, "chunk_size"),
        ("q rank", chunk, {"q": x["q"][0], "k": x["k"][0]}, "q must be [B, T, H, K]"),
        ("k shape", fused, {"k": x["k"][:, :, :, :8]}, "k must have q's shape"),
        (
            "v heads",
            chunk,
            {"v": torch.randn(2, 4, 3, 8), "g": torch.randn(2, 4, 3), "beta": torch.rand(2, 4, 3)},
            "HV=3",
        ),
        ("v rank", fused, {"v": x["v"][..., 0]}, "v must be"),
        ("q dtype", chunk, {"q": x["q"].to(torch.int32)}, "q must be a floating-point tensor"),
        ("v dtype", fused, {"v": x["v"].to(torch.complex64)}, "v must be a floating-point tensor"),
        ("g shape", chunk, {"g": x["g"][..., None]}, "g must be (2, 4, 2)"),
        ("beta shape", chunk, {"beta": x["beta"][:, :3]}, "beta must be (2, 4, 2)"),
        ("per-value beta", fused, {"beta": torch.rand(2, 4, 2, 8)}, "per-value beta"),
        ("initial_state", chunk, {"initial_state": torch.zeros(2, 2, 8, 16)}, "initial_state must be [B, HV, K, V]"),
        ("state_v_first", fused, {"initial_state": torch.zeros(2, 2, 16, 8), "state_v_first": True}, "initial_state"),
        ("gk", fused, {"gk": torch.zeros(2, 4, 2, 16)}, "gk"),
        ("gv", fused, {"gv": torch.zeros(2, 4, 2, 8)}, "gv"),
        ("allow_neg_eigval", chunk, {"allow_neg_eigval": True}, "use_beta_sigmoid_in_kernel"),
        ("A_log missing", chunk, {"use_gate_in_kernel": True}, "A_log"),
        ("A_log missing recurrent", fused, {"use_gate_in_kernel": True}, "A_log"),
        ("A_log shape", fused, {"use_gate_in_kernel": True, "A_log": torch.zeros(3)}, "A_log must be"),
        ("both layouts", chunk, {"state_v_first": True, "transpose_state_layout": True}, "transpose_state_layout"),
    ]


@pytest.mark.parametrize(("function", "changes", "named"), [pytest.param(*c[1:], id=c[0]) for c in _bad_calls()])
def test_stand_ins_refuse_bad_arguments_by_name(function, changes: dict[str, object], named: str) -> None:
    call = {**inputs(length=4), **changes}
    with pytest.raises(DeltaRuleArgumentError, match=f"^{function.__name__}: .*{re.escape(named)}"):
        function(**call)


def test_reference_refuses_bad_chunk_size_and_shapes() -> None:
    x = inputs(length=4)
    with pytest.raises(DeltaRuleArgumentError, match="chunk_size"):
        chunk_gated_delta_rule_reference(**x, chunk_size=0)
    with pytest.raises(DeltaRuleArgumentError, match="recurrent_gated_delta_rule_reference: g must be"):
        recurrent_gated_delta_rule_reference(**{**x, "g": x["g"][:, :, :1]})
