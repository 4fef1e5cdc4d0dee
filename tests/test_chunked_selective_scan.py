"""The chunked selective scan (Mamba v1's training and prefill path) against the sequential reference it must equal.

`selective_scan_reference` defines the scan; `selective_scan_chunked` is what the mixer and the kernel stand-in run.
Errors are max |chunked - reference| over a tensor, divided by max |reference| of that tensor (its own scale), for
the output and for every gradient, both taken by autograd.
"""

from __future__ import annotations

import pytest
import torch

import xatl_convert.models.modeling_xatl as modeling_xatl
from xatl_convert.models import XatlConfig, XatlForCausalLM
from xatl_convert.models.kernels_xatl import selective_scan_fn
from xatl_convert.models.scans_xatl import selective_scan_chunked, selective_scan_reference

NAMES = ("u", "delta", "A", "B", "C", "D", "z")


def scan_inputs(
    batch: int, d: int, n: int, length: int, dtype: torch.dtype = torch.float32, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Inputs in mamba-ssm's layout with the spread a trained Mamba has: dt = softplus(delta + bias) from about
    0.001 to 5, A = -exp(A_log) from -1 to -16, so dt·A per step spans about -0.001 to -80."""
    g = torch.Generator().manual_seed(seed)
    return {
        "u": torch.randn(batch, d, length, generator=g, dtype=dtype),
        "delta": torch.randn(batch, d, length, generator=g, dtype=dtype) * 2,
        "A": -torch.exp(torch.rand(d, n, generator=g) * 2.8).to(dtype if dtype == torch.float64 else torch.float32),
        "B": torch.randn(batch, n, length, generator=g, dtype=dtype),
        "C": torch.randn(batch, n, length, generator=g, dtype=dtype),
        "D": torch.randn(d, generator=g, dtype=torch.float64 if dtype == torch.float64 else torch.float32),
        "z": torch.randn(batch, d, length, generator=g, dtype=dtype),
        "delta_bias": torch.linspace(-6, 1, d, dtype=torch.float64 if dtype == torch.float64 else torch.float32),
    }


def run_with_grads(scan, inputs: dict[str, torch.Tensor], initial_state: torch.Tensor | None = None, **kwargs):
    """The scan's output, last state and the gradients of a fixed random loss w.r.t. every input."""
    leaves = {name: inputs[name].clone().requires_grad_(True) for name in NAMES}
    if initial_state is not None:
        leaves["initial_state"] = initial_state.clone().requires_grad_(True)
    y, last = scan(
        **leaves,
        delta_bias=inputs["delta_bias"],
        delta_softplus=True,
        return_last_state=True,
        **kwargs,
    )
    g = torch.Generator().manual_seed(1)
    loss = (y.float() * torch.randn(y.shape, generator=g)).sum() + (last * torch.randn(last.shape, generator=g)).sum()
    loss.backward()
    return y, last, {name: leaf.grad for name, leaf in leaves.items()}


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def test_chunked_scan_matches_sequential_scan_and_its_gradients_over_2048_tokens() -> None:
    inputs = scan_inputs(batch=2, d=8, n=4, length=2048)
    y_ref, last_ref, grads_ref = run_with_grads(selective_scan_reference, inputs)
    y, last, grads = run_with_grads(selective_scan_chunked, inputs)
    errors = {"y": relative_error(y, y_ref), "last state": relative_error(last, last_ref)}
    errors |= {f"d{name}": relative_error(grads[name], grads_ref[name]) for name in NAMES}
    assert max(errors.values()) <= 1e-5, errors


@pytest.mark.parametrize(
    ("length", "chunk_size"),
    [(37, 8), (1, 16), (16, 16), (17, 16), (5, 1), (40, 64)],  # not a multiple, one token, exact, one over, ...
)
def test_chunked_scan_matches_from_an_initial_state_at_any_length(length: int, chunk_size: int) -> None:
    inputs = scan_inputs(batch=2, d=6, n=3, length=length, seed=length)
    h0 = torch.randn(2, 6, 3, generator=torch.Generator().manual_seed(2))
    y_ref, last_ref, grads_ref = run_with_grads(selective_scan_reference, inputs, initial_state=h0)
    y, last, grads = run_with_grads(selective_scan_chunked, inputs, initial_state=h0, chunk_size=chunk_size)
    assert relative_error(y, y_ref) <= 1e-6
    assert relative_error(last, last_ref) <= 1e-6
    for name in (*NAMES, "initial_state"):
        assert relative_error(grads[name], grads_ref[name]) <= 1e-5, name


def test_chunked_scan_gradients_pass_gradcheck_in_float64() -> None:
    inputs = scan_inputs(batch=2, d=3, n=2, length=11, dtype=torch.float64)
    h0 = torch.randn(2, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    leaves = [inputs[name].requires_grad_(True) for name in NAMES] + [h0.requires_grad_(True)]

    def scan(u, delta, A, B, C, D, z, initial_state):
        return selective_scan_chunked(
            u, delta, A, B, C, D, z, inputs["delta_bias"], True, True, initial_state, chunk_size=4
        )

    assert torch.autograd.gradcheck(scan, leaves)


def test_chunked_scan_stays_finite_and_exact_when_channels_decay_fast() -> None:
    """dt·A of about -50 per step: exp of a sum of log-decays taken backwards would overflow; none is taken."""
    inputs = scan_inputs(batch=1, d=4, n=3, length=64)
    inputs["delta"] = torch.full_like(inputs["delta"], 10.0)
    inputs["delta_bias"] = torch.zeros(4)
    inputs["A"] = torch.full((4, 3), -5.0)
    y_ref, last_ref, grads_ref = run_with_grads(selective_scan_reference, inputs)
    y, last, grads = run_with_grads(selective_scan_chunked, inputs)
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads.values())
    assert relative_error(y, y_ref) <= 1e-6
    assert relative_error(last, last_ref) <= 1e-6
    for name in NAMES:
        assert relative_error(grads[name], grads_ref[name]) <= 1e-5, name


def test_chunked_scan_keeps_the_references_dtypes() -> None:
    """bf16 in, bf16 out, computed in fp32 (the last state stays fp32), as the reference and mamba-ssm do."""
    inputs = scan_inputs(batch=1, d=4, n=3, length=20)
    args = {name: inputs[name].to(torch.bfloat16) for name in ("u", "delta", "B", "C", "z")}
    args |= {"A": inputs["A"], "D": inputs["D"], "delta_bias": inputs["delta_bias"]}
    y_ref, last_ref = selective_scan_reference(**args, delta_softplus=True, return_last_state=True)
    y, last = selective_scan_chunked(**args, delta_softplus=True, return_last_state=True)
    assert (y.dtype, last.dtype) == (torch.bfloat16, torch.float32)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(last, last_ref)


def test_chunked_scan_refuses_a_chunk_of_no_steps() -> None:
    inputs = scan_inputs(batch=1, d=2, n=2, length=4)
    with pytest.raises(ValueError, match="chunk_size must be a positive"):
        selective_scan_chunked(*(inputs[name] for name in ("u", "delta", "A", "B", "C")), chunk_size=0)


def test_kernel_stand_in_computes_the_reference_scan_with_grouped_b_and_c() -> None:
    """mamba-ssm's selective_scan_fn also takes B, C as (batch, 1, n, L); the stand-in serves both layouts."""
    inputs = scan_inputs(batch=2, d=4, n=3, length=30)
    args = [inputs[name] for name in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    expected, expected_last = selective_scan_reference(*args, True, True)
    for B, C in ((inputs["B"], inputs["C"]), (inputs["B"][:, None], inputs["C"][:, None])):
        got, last = selective_scan_fn(*args[:3], B, C, *args[5:], True, True)
        assert relative_error(got, expected) <= 1e-6
        assert relative_error(last, expected_last) <= 1e-6


def test_mamba_model_reference_path_matches_the_sequential_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole Mamba model's logits and parameter gradients, and a prefill then a decoded token, are those the
    sequential reference scan gives."""
    torch.manual_seed(0)
    config = XatlConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        intermediate_size=64,
        num_attention_heads=4,
        layer_types=["mamba", "mamba"],
        mamba={"d_state": 8},
    )
    model = XatlForCausalLM(config)
    ids = torch.randint(0, 64, (2, 45))

    def logits_grads_and_next() -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        model.zero_grad()
        logits = model(ids).logits
        logits.square().mean().backward()
        with torch.no_grad():
            prefill = model(ids[:, :-1], use_cache=True)
            step = model(ids[:, -1:], past_key_values=prefill.past_key_values, use_cache=True).logits
        return logits.detach(), [p.grad.clone() for p in model.parameters()], step

    got = logits_grads_and_next()
    monkeypatch.setattr(modeling_xatl, "selective_scan_chunked", selective_scan_reference)
    expected = logits_grads_and_next()
    assert relative_error(got[0], expected[0]) <= 1e-5
    for grad, grad_ref in zip(got[1], expected[1], strict=True):
        assert relative_error(grad, grad_ref) <= 1e-4
    assert relative_error(got[2], expected[2]) <= 1e-5
    torch.testing.assert_close(got[2], got[0][:, -1:], rtol=1e-4, atol=1e-4)
