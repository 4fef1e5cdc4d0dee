"""The kernel call path on a CPU: every call site that CUDA runs, through the one dispatch point, against the
readable reference path; stand-ins that refuse what the kernels refuse; and call sites broken on purpose, which
these checks must catch."""

from __future__ import annotations

import importlib
import json
import shutil
import sys
import types
import uuid
from pathlib import Path

import pytest
import torch

import xatl_convert.models
from xatl_convert.models import XatlConfig, XatlForCausalLM
from xatl_convert.models import kernels_xatl as kx
from xatl_convert.models.kernels_xatl import KernelArgumentError, kernel_path, kernels_for
from xatl_convert.verify.kernel_sites import compare_call_sites, scenarios
from xatl_convert.writer import MODELING_FILES

MODELS_DIR = Path(xatl_convert.models.__file__).parent
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pythia-tiny"
HIDDEN, TOKENS = 64, 330


def config_for(*layer_types: str) -> XatlConfig:
    return XatlConfig(
        vocab_size=97,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=len(layer_types),
        num_attention_heads=4,
        layer_types=list(layer_types),
        mamba={"d_state": 8},
        mamba2={"headdim": 16, "d_state": 16, "chunk_size": 64},
    )


@pytest.fixture(autouse=True)
def fresh_dispatch():
    """Each test resolves the kernels anew (the dispatch caches what it found per device)."""
    caches = (kx._installed_kernel, kx._installed_dispatch, kx._hub_module, kx.kernel_set)
    for cache in caches:
        cache.cache_clear()
    yield
    for cache in caches:
        cache.cache_clear()


def _hidden(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, TOKENS, HIDDEN, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# Every call site against the reference path
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_every_call_site_matches_the_reference_path_on_cpu(kind: str) -> None:
    torch.manual_seed(0)
    model = XatlForCausalLM(config_for(kind, "attention")).eval()
    comparisons = compare_call_sites(model.model.layers[0].mixer, model.config, _hidden())
    assert [(c.scenario, c.dtype) for c in comparisons] == [
        (name, dtype) for dtype in (torch.float32, torch.bfloat16) for name in scenarios(TOKENS)
    ]
    for c in comparisons:
        assert c.refused is None, (c.scenario, c.refused)
        # the stand-ins round once, as the kernels and the reference path do: bf16 agrees as closely as fp32
        assert c.error <= 1e-5, (c.scenario, c.dtype, c.error)


def test_the_scenarios_cover_every_cached_path() -> None:
    runs = scenarios(TOKENS)
    prefix, chunk = runs["continue a cached prefix"][0]
    assert prefix[0] == 0 and chunk[0] == prefix[1] and chunk[1] - chunk[0] > 1  # initial states, several tokens
    assert prefix[1] < 256 < chunk[1]  # the continuation crosses a 256-token Mamba2 chunk
    assert all(stop - start == 1 for start, stop in runs["decode steps"][0][1:])
    assert runs["padded batch, then steps"][1:] == (True, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_hybrid_model_gives_the_same_logits_and_tokens_on_both_paths(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = XatlForCausalLM(config_for("mamba", "attention", "mamba2", "mamba")).eval().to(dtype)
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    outputs = {}
    for path in ("kernels", "reference"):
        with kernel_path(path), torch.no_grad():
            logits = model(ids, attention_mask=mask).logits
            tokens = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        outputs[path] = (logits.float(), tokens)
    (kernel_logits, kernel_tokens), (reference_logits, reference_tokens) = outputs["kernels"], outputs["reference"]
    error = ((kernel_logits - reference_logits).norm() / reference_logits.norm()).item()
    assert error <= 1e-5  # a double rounding in a stand-in (y, then y + D x) gave 2e-2 on a 16-layer 1B hybrid
    if dtype == torch.float32:  # bf16 rounding may flip a near-tie
        assert torch.equal(kernel_tokens, reference_tokens)


def test_verify_checks_the_call_sites_of_each_mixer_type_and_says_what_ran(tmp_path: Path) -> None:
    from xatl_convert.conversion import convert
    from xatl_convert.verify import verify

    convert(EXAMPLE, tmp_path / "out", to="mamba2", attn_layers="1")
    report = verify(tmp_path / "out", EXAMPLE, device="cpu")
    (row,) = [check for check in report.checks if "kernel call sites" in check.name]
    assert (row.name, row.status) == ("mamba2 kernel call sites = reference", "pass")
    assert row.details["kernels"] == "stand-ins on cpu" and row.value.endswith("over 10 runs; stand-ins on cpu")
    assert {c["scenario"] for c in row.details["comparisons"]} == set(scenarios(330))
    assert all(c["refused"] is None for c in row.details["comparisons"])


# ---------------------------------------------------------------------------------------------------------------
# Call sites broken on purpose
# ---------------------------------------------------------------------------------------------------------------

# (layer type, what the source says, what a mistaken edit would say): argument order, layout, dtype, missing flags
MUTATIONS = {
    "B and C swapped (selective_scan_fn)": (
        "mamba",
        "B.transpose(1, 2).contiguous(),  # (b, d_state, L)\n                C.transpose(1, 2).contiguous(),",
        "C.transpose(1, 2).contiguous(),  # (b, d_state, L)\n                B.transpose(1, 2).contiguous(),",
    ),
    "D left in the model dtype (selective_scan_fn)": (
        "mamba",
        "                self.D.float(),\n",
        "                self.D,\n",
    ),
    "A in the model dtype (Mamba)": (
        "mamba",
        "A = -torch.exp(self.A_log.float())  # (d_inner, d_state), fp32",
        "A = -torch.exp(self.A_log)  # (d_inner, d_state), fp32",
    ),
    "gate dropped in the steps (selective_state_update)": ("mamba", "z=z[..., t],", "z=None,"),
    "conv weight not squeezed (causal_conv1d_fn)": (
        "mamba2",
        "weight = conv.weight.squeeze(1)",
        "weight = conv.weight",
    ),
    "conv input as (b, L, d) (causal_conv1d_fn)": (
        "mamba2",
        "ops.causal_conv1d_fn(x.contiguous(), weight",
        "ops.causal_conv1d_fn(x.transpose(1, 2).contiguous(), weight",
    ),
    "state and input swapped (causal_conv1d_update)": (
        "mamba",
        "ops.causal_conv1d_update(x, cache.conv_states[layer_idx], weight",
        "ops.causal_conv1d_update(cache.conv_states[layer_idx], x, weight",
    ),
    "initial states dropped (mamba_chunk_scan_combined)": (
        "mamba2",
        "initial_states=cache.ssm_states[self.layer_idx] if continuing else None,",
        "initial_states=None,",
    ),
    "dt_softplus missing (mamba_chunk_scan_combined)": (
        "mamba2",
        "if continuing else None,\n                dt_softplus=True,",
        "if continuing else None,\n                dt_softplus=False,",
    ),
    "dt_bias left out of the Mamba2 step (selective_state_update)": (
        "mamba2",
        "dt_bias=self.dt_bias[:, None].expand(heads, p),",
        "dt_bias=None,",
    ),
    "B and C swapped in the Mamba2 step (selective_state_update)": (
        "mamba2",
        "B[:, 0].reshape(b, self.ngroups, n),\n                C[:, 0].reshape(b, self.ngroups, n),",
        "C[:, 0].reshape(b, self.ngroups, n),\n                B[:, 0].reshape(b, self.ngroups, n),",
    ),
}


def _mutant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, old: str, new: str) -> types.ModuleType:
    """A copy of the shipped model files, as its own package, with `old` replaced by `new` once."""
    package = tmp_path / f"xatl_mutant_{uuid.uuid4().hex}"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in MODELING_FILES:
        shutil.copy(MODELS_DIR / name, package / name)
    source = (package / "modeling_xatl.py").read_text()
    assert source.count(old) == 1, f"the call site {old!r} is no longer in modeling_xatl.py once"
    (package / "modeling_xatl.py").write_text(source.replace(old, new))
    monkeypatch.syspath_prepend(str(tmp_path))
    return importlib.import_module(f"{package.name}.modeling_xatl")


@pytest.mark.parametrize("mutation", ["unchanged copy", *MUTATIONS])
def test_a_call_site_broken_on_purpose_fails_the_check(
    mutation: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kind, old, new = MUTATIONS.get(mutation, ("mamba2", "weight = conv.weight.squeeze(1)", None))
    modeling = _mutant(tmp_path, monkeypatch, old, old if new is None else new)
    torch.manual_seed(0)
    cfg = modeling.XatlConfig(**config_for(kind, "attention").to_dict())
    model = modeling.XatlForCausalLM(cfg).eval()
    comparisons = compare_call_sites(model.model.layers[0].mixer, cfg, _hidden())
    failed = [(c.scenario, c.dtype, c.refused or f"{c.error:.1e}") for c in comparisons if not c.passed]
    if new is None:
        assert failed == []  # the copy itself passes: what fails below fails for the mutation
    else:
        assert failed, f"{mutation}: no scenario caught it"
    sys.modules.pop(type(model).__module__, None)


# ---------------------------------------------------------------------------------------------------------------
# The stand-ins: the kernels' semantics and refusals
# ---------------------------------------------------------------------------------------------------------------


def test_conv_update_continues_what_conv_fn_started() -> None:
    g = torch.Generator().manual_seed(0)
    x, weight, bias = torch.randn(2, 16, 12, generator=g), torch.randn(16, 4, generator=g), torch.randn(16, generator=g)
    full = kx.causal_conv1d_fn(x, weight, bias, activation="silu")
    state = torch.nn.functional.pad(x[..., :5], (-1, 0))  # the last 4 inputs, mamba-ssm's window
    rest = kx.causal_conv1d_update(x[..., 5:], state, weight, bias, "silu")
    torch.testing.assert_close(rest, full[..., 5:])
    torch.testing.assert_close(state, x[..., -4:])
    one = kx.causal_conv1d_update(x[..., 5], torch.nn.functional.pad(x[..., :5], (-1, 0)), weight, bias, "silu")
    torch.testing.assert_close(one, full[..., 5])  # the (batch, dim) form of a decoding step


def test_state_updates_continue_the_scans_in_both_layouts() -> None:
    g = torch.Generator().manual_seed(0)
    b, d, n, length = 2, 6, 4, 9
    u, dt, z = (torch.randn(b, d, length, generator=g) for _ in range(3))
    A, B, C = (
        -torch.rand(d, n, generator=g),
        torch.randn(b, n, length, generator=g),
        torch.randn(b, n, length, generator=g),
    )
    D, bias = torch.randn(d, generator=g), torch.randn(d, generator=g)
    full, last = kx.selective_scan_fn(u, dt, A, B, C, D, z, bias, True, return_last_state=True)
    state = torch.zeros(b, d, n)
    steps = [kx.selective_state_update(state, u[..., t], dt[..., t], A, B[..., t], C[..., t], D, z[..., t], bias, True)
             for t in range(length)]  # fmt: skip
    torch.testing.assert_close(torch.stack(steps, -1), full)
    torch.testing.assert_close(state, last)

    heads, p, groups = 4, 3, 2
    x, dt2 = torch.randn(b, length, heads, p, generator=g), torch.randn(b, length, heads, generator=g)
    A2, D2, bias2 = -torch.rand(heads, generator=g), torch.randn(heads, generator=g), torch.randn(heads, generator=g)
    B2, C2 = (torch.randn(b, length, groups, n, generator=g) for _ in range(2))
    kwargs = {"D": D2, "dt_bias": bias2, "dt_softplus": True, "return_final_states": True}
    y, final = kx.mamba_chunk_scan_combined(x, dt2, A2, B2, C2, 4, **kwargs)
    y1, h1 = kx.mamba_chunk_scan_combined(x[:, :5], dt2[:, :5], A2, B2[:, :5], C2[:, :5], 4, **kwargs)
    state = h1.clone()
    last_step = kx.selective_state_update(
        state, x[:, 5], dt2[:, 5, :, None].expand(b, heads, p), A2[:, None, None].expand(heads, p, n), B2[:, 5],
        C2[:, 5], D2[:, None].expand(heads, p), dt_bias=bias2[:, None].expand(heads, p), dt_softplus=True,
    )  # fmt: skip
    torch.testing.assert_close(last_step, y[:, 5])
    y2, h2 = kx.mamba_chunk_scan_combined(
        x[:, 6:], dt2[:, 6:], A2, B2[:, 6:], C2[:, 6:], 4, initial_states=state, **kwargs
    )
    torch.testing.assert_close(torch.cat([y1, y2], 1), torch.cat([y[:, :5], y[:, 6:]], 1))
    torch.testing.assert_close(h2, final)


def _conv_args(dim: int = 16, width: int = 4, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    return torch.randn(2, dim, 10, dtype=dtype), torch.randn(dim, width, dtype=dtype), torch.randn(dim, dtype=dtype)


REFUSALS = {
    "conv width 5": (lambda: kx.causal_conv1d_fn(*_conv_args(width=5)), "width between 2 and 4"),
    "conv weight (dim, 1, width)": (
        lambda: kx.causal_conv1d_fn(_conv_args()[0], _conv_args()[1][:, None], None),
        "weight must be",
    ),
    "channel-last x with dim not divisible by 8": (
        lambda: kx.causal_conv1d_fn(torch.randn(2, 10, 12).transpose(1, 2), torch.randn(12, 4)),
        "divisible by 8",
    ),
    "conv initial states on channel-first x": (
        lambda: kx.causal_conv1d_fn(*_conv_args(), initial_states=torch.zeros(2, 16, 3)),
        "channel last",
    ),
    "conv bias in another dtype than the weight": (
        lambda: kx.causal_conv1d_fn(_conv_args()[0], _conv_args()[1], _conv_args()[2].half()),
        "bias dtype",
    ),
    "conv state in another dtype than x": (
        lambda: kx.causal_conv1d_update(
            torch.randn(2, 16), torch.zeros(2, 16, 4, dtype=torch.bfloat16), torch.randn(16, 4)
        ),
        "conv_state dtype",
    ),
    "scan D in bf16": (
        lambda: kx.selective_scan_fn(*_scan_args(), D=torch.ones(6, dtype=torch.bfloat16)),
        "D must be fp32",
    ),
    "scan A in bf16": (lambda: kx.selective_scan_fn(*_scan_args(a_dtype=torch.bfloat16)), "A must be fp32"),
    "scan B as (b, L, n)": (
        lambda: kx.selective_scan_fn(*[t.transpose(1, 2) if i == 3 else t for i, t in enumerate(_scan_args())]),
        "B must be",
    ),
    "state update without dt_bias": (
        lambda: kx.selective_state_update(torch.zeros(2, 6, 4), *_step_args(), D=torch.ones(6)),
        "dt_bias are required",
    ),
    "chunk scan with a per-headdim dt_bias": (
        lambda: kx.mamba_chunk_scan_combined(
            torch.randn(1, 8, 4, 3),
            torch.randn(1, 8, 4),
            -torch.rand(4),
            *(torch.randn(1, 8, 1, 5),) * 2,
            4,
            dt_bias=torch.randn(4, 3),
        ),
        "dt_bias must be",
    ),
}


def _scan_args(a_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    u, dt = torch.randn(2, 6, 9), torch.randn(2, 6, 9)
    return u, dt, -torch.rand(6, 4).to(a_dtype), torch.randn(2, 4, 9), torch.randn(2, 4, 9)


def _step_args() -> tuple[torch.Tensor, ...]:
    return torch.randn(2, 6), torch.randn(2, 6), -torch.rand(6, 4), torch.randn(2, 4), torch.randn(2, 4)


@pytest.mark.parametrize("case", list(REFUSALS))
def test_stand_ins_refuse_what_the_kernels_refuse(case: str) -> None:
    call, message = REFUSALS[case]
    with pytest.raises(KernelArgumentError, match=message):
        call()


# ---------------------------------------------------------------------------------------------------------------
# Dispatch: per device, through transformers' mechanism, and from the Hub through `kernels`
# ---------------------------------------------------------------------------------------------------------------


def test_on_cpu_the_mixers_take_the_reference_path_unless_told() -> None:
    x = torch.zeros(1)
    assert kernels_for(x) is None
    with kernel_path("kernels"):
        found = kernels_for(x)
        assert found is not None and set(found.sources.values()) == {"stand-in"}
        assert found.describe() == "stand-ins"
        with kernel_path("reference"):
            assert kernels_for(x) is None
    with pytest.raises(ValueError, match="expected one of"):
        kernel_path("fast").__enter__()


def _install_fake_causal_conv1d(monkeypatch: pytest.MonkeyPatch, calls: list[str]) -> None:
    """A package named causal_conv1d whose `causal_conv1d_fn` takes fewer arguments than today's (an older release)."""

    def causal_conv1d_fn(x, weight, bias=None, activation=None):
        calls.append("causal_conv1d_fn")
        return kx.causal_conv1d_fn(x, weight, bias, activation=activation)

    interface = types.ModuleType("causal_conv1d.causal_conv1d_interface")
    interface.causal_conv1d_fn = causal_conv1d_fn
    package = types.ModuleType("causal_conv1d")
    package.causal_conv1d_fn, package.causal_conv1d_interface = causal_conv1d_fn, interface
    monkeypatch.setitem(sys.modules, "causal_conv1d", package)
    monkeypatch.setitem(sys.modules, "causal_conv1d.causal_conv1d_interface", interface)


def test_an_installed_kernel_serves_cuda_tensors_only_through_transformers_mechanism(monkeypatch) -> None:
    calls: list[str] = []
    _install_fake_causal_conv1d(monkeypatch, calls)
    hub_kernels = importlib.import_module("transformers.integrations.hub_kernels")
    if hasattr(hub_kernels, "_PACKAGE_SUPPORTED_DEVICES"):  # transformers >= 5.25 also routes by the inputs' device:
        # let the fake package take these CPU tensors, as the real one takes CUDA tensors
        monkeypatch.setitem(hub_kernels._PACKAGE_SUPPORTED_DEVICES, "causal_conv1d", ("cuda", "cpu"))
    on_cuda, on_cpu = kx.kernel_set("cuda"), kx.kernel_set("cpu")
    assert on_cuda.sources["causal_conv1d_fn"] == "causal_conv1d"
    assert on_cuda.sources["selective_scan_fn"] == "stand-in"  # mamba-ssm is not installed: per function
    assert set(on_cpu.sources.values()) == {"stand-in"}  # the device decides, not the import
    assert on_cuda.describe().startswith("causal_conv1d: causal_conv1d_fn; stand-in: ")
    x, weight, bias = _conv_args()
    out = on_cuda.causal_conv1d_fn(x, weight, bias, seq_idx=None, activation="silu")  # seq_idx: not in its signature
    assert calls == ["causal_conv1d_fn"]
    torch.testing.assert_close(out, kx.causal_conv1d_fn(x, weight, bias, activation="silu"))
    assert kx.kernels_available("mamba2") is False


def test_our_fallback_for_older_transformers_has_the_same_effect(monkeypatch) -> None:
    calls: list[str] = []
    _install_fake_causal_conv1d(monkeypatch, calls)
    dispatch = kx._own_fallback("causal_conv1d_fn", "causal_conv1d")(kx.causal_conv1d_fn)
    x, weight, bias = _conv_args()
    dispatch(x, weight, bias, seq_idx=None, activation="silu")
    assert calls == ["causal_conv1d_fn"]
    plain = kx._own_fallback("selective_scan_fn", "mamba_ssm")(kx.selective_scan_fn)  # not installed: stand-in
    assert plain(*_scan_args()).shape == (2, 6, 9)
    monkeypatch.setitem(sys.modules, "transformers.integrations", types.ModuleType("transformers.integrations"))
    kx._installed_dispatch("causal_conv1d_fn")(x, weight, bias, activation="silu")  # transformers 5.0 had no mechanism
    assert calls == ["causal_conv1d_fn", "causal_conv1d_fn"]


FAKE_HUB_KERNEL = """
from xatl_convert.models.kernels_xatl import STAND_INS

CALLS = []


def _counted(name):
    def call(*args, **kwargs):
        CALLS.append(name)
        return STAND_INS[name](*args, **kwargs)

    return call


for _name in STAND_INS:
    globals()[_name] = _counted(_name)
"""


def _fake_hub_repo(root: Path) -> Path:
    """A kernel repository as the `kernels` package lays them out, with a build for CPU-only torch."""
    build = root / "build" / "torch-cpu"
    (build / "mamba_ssm").mkdir(parents=True)
    (build / "mamba_ssm" / "__init__.py").write_text(FAKE_HUB_KERNEL)
    metadata = {"id": "fake-mamba-ssm", "name": "mamba-ssm", "version": 5, "license": "Apache-2.0"}
    (build / "metadata.json").write_text(json.dumps({**metadata, "backend": {"type": "cpu"}, "python-depends": []}))
    return root


def test_prebuilt_hub_kernels_are_used_when_the_user_allows_them(tmp_path, monkeypatch) -> None:
    pytest.importorskip("kernels")
    repo = _fake_hub_repo(tmp_path / "repo")
    monkeypatch.setenv("LOCAL_KERNELS", f"kernels-community/mamba-ssm={repo}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    torch.manual_seed(0)
    model = XatlForCausalLM(config_for("mamba", "attention", "mamba2")).eval()
    ids = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        reference = model(ids).logits
        monkeypatch.setenv(kx.HUB_KERNELS_ENV, "1")
        found = kx.kernel_set("cpu", kx.hub_kernels_setting())
        assert set(found.sources.values()) == {"hub:kernels-community/mamba-ssm@v5"}
        hub = model(ids).logits  # "auto": a kernel serves the CPU now, so the kernel call path runs
    calls = found.functions["selective_scan_fn"].__globals__["CALLS"]
    assert {"causal_conv1d_fn", "selective_scan_fn", "mamba_chunk_scan_combined"} <= set(calls)
    torch.testing.assert_close(hub, reference, rtol=1e-5, atol=1e-5)


def test_an_unavailable_hub_kernel_falls_back_with_one_warning(tmp_path, monkeypatch, caplog) -> None:
    pytest.importorskip("kernels")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # nothing in the cache, no network
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv(kx.HUB_KERNELS_ENV, "kernels-community/mamba-ssm@5")
    monkeypatch.delenv("LOCAL_KERNELS", raising=False)
    with caplog.at_level("WARNING"):
        found = kx.kernel_set("cpu", kx.hub_kernels_setting())
    assert set(found.sources.values()) == {"stand-in"}
    warnings = [r.getMessage() for r in caplog.records if kx.HUB_KERNELS_ENV in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith("XATL_HUB_KERNELS: no kernels-community/mamba-ssm@v5 build for cpu")


@pytest.mark.parametrize(
    ("value", "expected"),
    [("", None), ("0", None), ("1", ("kernels-community/mamba-ssm", 5)), ("me/my-mamba@2", ("me/my-mamba", 2))],
)
def test_the_hub_kernels_setting(value: str, expected, monkeypatch) -> None:
    monkeypatch.setenv(kx.HUB_KERNELS_ENV, value)
    assert kx.hub_kernels_setting() == expected


@pytest.mark.parametrize("value", ["me/my-mamba@v2", "@3"])
def test_a_malformed_hub_kernels_setting_is_a_clear_error(value: str, monkeypatch) -> None:
    monkeypatch.setenv(kx.HUB_KERNELS_ENV, value)
    with pytest.raises(ValueError, match=f"XATL_HUB_KERNELS={value!r}: expected 1, 0, a kernel repository"):
        kx.hub_kernels_setting()
    from typer.testing import CliRunner

    from xatl_convert.cli import app

    result = CliRunner().invoke(app, ["verify", "anything"])  # named before any folder is read
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: XATL_HUB_KERNELS={value!r}: expected 1, 0, a kernel repository, or " + (
        "REPOSITORY@VERSION"
    )


def test_a_long_memory_mamba_continues_a_prefix_in_bf16_as_the_scan_does() -> None:
    """Found on OLMo2's raw (post-norm) inputs: 120 steps through a bf16 state drifted by 7e-2 from the scan. The
    chunk's running state stays fp32 and is rounded once, as the reference scan rounds it."""
    torch.manual_seed(0)
    model = XatlForCausalLM(config_for("mamba")).eval()
    mixer = model.model.layers[0].mixer
    with torch.no_grad():
        mixer.A_log.fill_(-4.6)  # A = -0.01: states decay slowly, so every rounding stays in them
    (continued,) = [
        c
        for c in compare_call_sites(mixer, model.config, 4 * _hidden(), dtypes=(torch.bfloat16,))
        if c.scenario == "continue a cached prefix"
    ]
    assert continued.error <= 5e-3, continued.error


def test_a_mixer_outside_the_kernels_limits_takes_the_reference_path_and_verify_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from xatl_convert.conversion import convert
    from xatl_convert.verify import verify

    served = kx.KernelSet(dict(kx.STAND_INS), dict.fromkeys(kx.STAND_INS, "somewhere"))
    monkeypatch.setattr(kx, "kernel_set", lambda *args: served)  # as if kernels served this device
    x = torch.zeros(1)
    assert kernels_for(x) is served
    with caplog.at_level("WARNING"):
        assert kernels_for(x, "mamba.d_conv 5 is outside causal-conv1d's widths 2 to 4") is None
    assert "mamba.d_conv 5 is outside causal-conv1d's widths 2 to 4: those mixers run the reference path" in caplog.text
    monkeypatch.undo()

    convert(EXAMPLE, tmp_path / "out", to="mamba", overrides={"mamba.d_conv": 5})
    report = verify(tmp_path / "out", EXAMPLE, device="cpu")
    (row,) = [check for check in report.checks if "kernel call sites" in check.name]
    assert row.status == "skip"
    assert row.value.startswith("mamba.d_conv 5 is outside causal-conv1d's widths 2 to 4")
    assert report.passed
