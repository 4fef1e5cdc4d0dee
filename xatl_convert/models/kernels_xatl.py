"""One dispatch point for the kernels the xatl mixers call, by their packages' own names and signatures.

The mixers' kernel call path calls the functions that each mixer's registry entry lists, exactly as the packages'
own modules do: `causal_conv1d_fn` and `causal_conv1d_update` (causal-conv1d), `selective_scan_fn`,
`selective_state_update` and `mamba_chunk_scan_combined` (mamba-ssm), `chunk_gated_delta_rule` and
`fused_recurrent_gated_delta_rule` (fla, for Gated DeltaNet). Each is
resolved per call, from the tensors' device, to the first of:
  1. a prebuilt kernel from the Hub through the `kernels` package, when the user allows it (XATL_HUB_KERNELS);
  2. the installed package's kernel (mamba-ssm, causal-conv1d), for CUDA tensors, through transformers'
     `use_kernel_func_from_hub_with_fallback` (an equivalent of ours on transformers releases without it);
  3. the PyTorch stand-in of this module: the same signature and semantics, and the same argument checks as the
     kernel (shapes, dtypes, layouts), so that a call the kernel would refuse fails on a CPU too.
The mixers take the kernel call path when (1) or (2) gives a kernel for their inputs, or inside
`kernel_path("kernels")`, where the stand-ins fill in (how verify and the tests run every CUDA call site on a
CPU); otherwise they take the readable reference path (`scans_xatl`, `delta_rule_xatl`).

Self-contained (torch, transformers and the stdlib; `kernels`, mamba-ssm, causal-conv1d and fla optional): copied into
every converted folder with the modeling file.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .mixers_xatl import KERNEL_MODULES as REGISTERED_KERNELS
from .mixers_xatl import MIXERS
from .scans_xatl import selective_scan_chunked, ssd_chunk_scan_reference

logger = logging.getLogger(__name__)

# Function name → (package, module inside it that defines the function), as each mixer's registry entry declares.
KERNEL_MODULES: dict[str, tuple[str, str]] = REGISTERED_KERNELS
HUB_KERNELS_ENV = "XATL_HUB_KERNELS"
# Where transformers' own kernel mapping reads the mamba-ssm and causal-conv1d functions (hub_kernels.py, v5).
DEFAULT_HUB_KERNELS = ("kernels-community/mamba-ssm", 5)
_HUB_REPOSITORY = re.compile(r"[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?/[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?", re.ASCII)
STAND_IN = "stand-in"
PATHS = ("auto", "kernels", "reference")
_PATH = "auto"  # set by `kernel_path()`


class KernelArgumentError(ValueError):
    """A call that the real kernel refuses, refused in the same place by its stand-in."""


def _require(condition: bool, function: str, message: str) -> None:
    if not condition:
        raise KernelArgumentError(f"{function}: {message}")


def _shape(function: str, label: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    """The kernels' CHECK_SHAPE / `assert t.shape == (...)`: exact sizes, so also the number of dimensions."""
    got = tuple(tensor.shape)
    _require(got == tuple(expected), function, f"{label} must be {tuple(expected)}, got {got}")


_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------------------------
# Stand-ins: the kernels' signatures, checks (csrc TORCH_CHECKs and Triton wrappers' asserts) and semantics
# --------------------------------------------------------------------------------------------------------------


def _check_activation(function: str, activation: str | None) -> None:
    if activation not in (None, "silu", "swish"):
        raise NotImplementedError(f"{function}: activation must be None, silu, or swish")


def _check_conv_weights(function: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> int:
    """causal-conv1d's shared checks on x (batch, dim, L), weight (dim, width) and bias (dim,); returns width."""
    _require(x.dtype in _FLOATS, function, f"x must be fp32, fp16 or bf16, not {x.dtype}")
    _require(weight.dtype in _FLOATS, function, f"weight must be fp32, fp16 or bf16, not {weight.dtype}")
    _require(x.dim() == 3, function, f"x must be (batch, dim, seqlen), got {tuple(x.shape)}")
    _require(
        weight.dim() == 2 and weight.shape[0] == x.shape[1],
        function,
        f"weight must be (dim={x.shape[1]}, width), got {tuple(weight.shape)}",
    )
    width = weight.shape[-1]
    _require(2 <= width <= 4, function, "causal_conv1d only supports width between 2 and 4")
    if bias is not None:
        _require(bias.dtype == weight.dtype, function, f"bias dtype {bias.dtype} != weight dtype {weight.dtype}")
        _shape(function, "bias", bias, (x.shape[1],))
        _require(bias.stride(-1) == 1, function, "bias must be contiguous in its last dimension")
    return width


def _conv_silu(full: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None) -> Any:
    """The depthwise causal conv over `full` (the taps before the outputs included), in fp32 as the kernels."""
    out = F.conv1d(
        full.float(), weight.float().unsqueeze(1), None if bias is None else bias.float(), groups=full.shape[1]
    )
    return F.silu(out) if activation in ("silu", "swish") else out


def causal_conv1d_fn(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
    final_states_out: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Stand-in for causal-conv1d's `causal_conv1d_fn`: x (batch, dim, L), weight (dim, width) → (batch, dim, L)."""
    name = "causal_conv1d_fn"
    _check_activation(name, activation)
    if x.dim() == 3 and x.stride(2) != 1 and x.stride(1) != 1:
        x = x.contiguous()  # as the wrapper does
    width = _check_conv_weights(name, x, weight, bias)
    batch, dim, _ = x.shape
    _require(x.stride(2) == 1 or x.stride(1) == 1, name, "x must be contiguous in dim or in seqlen")
    channel_last = x.stride(1) == 1 and x.stride(2) > 1
    if channel_last:
        _require(dim % 8 == 0, name, "causal_conv1d only supports channel dimension divisible by 8 for now")
        _require(
            x.stride(2) % 8 == 0 and x.stride(0) % 8 == 0,
            name,
            "causal_conv1d with channel last layout requires strides (x.stride(0) and x.stride(2)) to be "
            "multiples of 8",
        )
    if seq_idx is not None:
        raise NotImplementedError(f"{name}: the stand-in does not implement seq_idx (xatl never passes it)")
    if initial_states is not None:
        _require(channel_last, name, "initial_states is only supported for channel last layout")
        _require(initial_states.dtype == x.dtype, name, "initial_states must have x's dtype")
        _shape(name, "initial_states", initial_states, (batch, dim, width - 1))
        _require(initial_states.stride(1) == 1, name, "initial_states must be channel last (stride(1) == 1)")
    if return_final_states:
        _require(x.stride(1) == 1, name, "Only channel-last layout support returning final_states_out")
    previous = x.new_zeros(batch, dim, width - 1) if initial_states is None else initial_states
    full = torch.cat([previous.to(x.dtype), x], dim=-1)
    out = _conv_silu(full, weight, bias, activation).to(x.dtype)
    if not return_final_states:
        return out
    final = full[..., -(width - 1) :]
    if final_states_out is not None:
        final_states_out.copy_(final)
        return out, final_states_out
    return out, final.transpose(1, 2).contiguous().transpose(1, 2)  # channel last, as the kernel allocates it


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    cache_seqlens: torch.Tensor | None = None,
    conv_state_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stand-in for causal-conv1d's `causal_conv1d_update`: x (batch, dim) or (batch, dim, L) continues from
    conv_state (batch, dim, state_len), which is shifted in place by L with x appended."""
    name = "causal_conv1d_update"
    _check_activation(name, activation)
    if cache_seqlens is not None or conv_state_indices is not None:
        raise NotImplementedError(f"{name}: the stand-in does not implement cache_seqlens / conv_state_indices")
    unsqueeze = x.dim() == 2
    if unsqueeze:
        x = x.unsqueeze(-1)
    width = _check_conv_weights(name, x, weight, bias)
    _require(conv_state.dtype == x.dtype, name, f"conv_state dtype {conv_state.dtype} != x dtype {x.dtype}")
    batch, dim, _ = x.shape
    _require(
        conv_state.dim() == 3 and tuple(conv_state.shape[:2]) == (batch, dim),
        name,
        f"conv_state must be ({batch}, {dim}, state_len), got {tuple(conv_state.shape)}",
    )
    state_len = conv_state.shape[-1]
    _require(state_len >= width - 1, name, f"conv_state length {state_len} < width - 1 = {width - 1}")
    full = torch.cat([conv_state[..., state_len - (width - 1) :], x], dim=-1)
    out = _conv_silu(full, weight, bias, activation).to(x.dtype)
    conv_state.copy_(torch.cat([conv_state, x], dim=-1)[..., -state_len:])
    return out.squeeze(-1) if unsqueeze else out


def selective_scan_fn(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Stand-in for mamba-ssm's `selective_scan_fn` (u, delta, z (batch, dim, L); A (dim, n) fp32; B, C (batch, n,
    L) or (batch, 1, n, L); D, delta_bias (dim,) fp32). Computes with `selective_scan_chunked` (what
    `selective_scan_reference` defines)."""
    name = "selective_scan_fn"
    _require(u.dtype in _FLOATS, name, f"u must be fp32, fp16 or bf16, not {u.dtype}")
    _require(A.dtype in (torch.float32, torch.complex64), name, f"A must be fp32 (or complex64), not {A.dtype}")
    _require(delta.dtype == u.dtype, name, f"delta dtype {delta.dtype} != u dtype {u.dtype}")
    _require(u.dim() == 3, name, f"u must be (batch, dim, seqlen), got {tuple(u.shape)}")
    batch, dim, length = u.shape
    _shape(name, "delta", delta, (batch, dim, length))
    _require(A.dim() == 2 and A.shape[0] == dim, name, f"A must be ({dim}, dstate), got {tuple(A.shape)}")
    dstate = A.shape[1]
    _require(dstate <= 256, name, "selective_scan only supports state dimension <= 256")
    groups = B.shape[1] if B.dim() == 4 else 1
    for label, t in (("B", B), ("C", C)):
        variable = t.dim() >= 3
        _require(t.dtype == (u.dtype if variable else A.dtype), name, f"{label} dtype {t.dtype} does not match")
        shape = (batch, groups, dstate, length) if t.dim() == 4 else (batch, dstate, length)
        _require(variable and tuple(t.shape) == shape, name, f"{label} must be {shape}, got {tuple(t.shape)}")
    if groups != 1:
        raise NotImplementedError(f"{name}: the stand-in implements one group of B and C (xatl passes one)")
    if D is not None:
        _require(D.dtype == torch.float32, name, f"D must be fp32, not {D.dtype}")
        _shape(name, "D", D, (dim,))
    if z is not None:
        _require(z.dtype == u.dtype, name, f"z dtype {z.dtype} != u dtype {u.dtype}")
        _shape(name, "z", z, (batch, dim, length))
    if delta_bias is not None:
        _require(delta_bias.dtype == torch.float32, name, f"delta_bias must be fp32, not {delta_bias.dtype}")
        _shape(name, "delta_bias", delta_bias, (dim,))
        _require(delta_bias.stride(-1) == 1 or dim == 1, name, "delta_bias must be contiguous")
    if B.dim() == 4:
        B, C = B[:, 0], C[:, 0]
    return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def selective_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    state_batch_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stand-in for mamba-ssm's Triton `selective_state_update`: one token, state updated in place.

    Mamba layout: state (batch, dim, n), x/dt/z (batch, dim), A (dim, n), B/C (batch, n), D/dt_bias (dim,).
    Multi-head layout: state (batch, heads, dim, n), x/dt/z (batch, heads, dim), A (heads, dim, n), B/C (batch,
    groups, n), D/dt_bias (heads, dim). Computed element by element in fp32, as the kernel.
    """
    name = "selective_state_update"
    if state_batch_indices is not None:
        raise NotImplementedError(f"{name}: the stand-in does not implement state_batch_indices")
    # mamba-ssm 2.3 unpacks D's and dt_bias's strides unconditionally: None raises a TypeError there.
    _require(D is not None and dt_bias is not None, name, "D and dt_bias are required (mamba-ssm fails on None)")
    has_heads = state.dim() > 3
    if not has_heads:
        state = state.unsqueeze(1)
    x, dt = (t.unsqueeze(1) if t.dim() == 2 else t for t in (x, dt))
    z = z.unsqueeze(1) if z is not None and z.dim() == 2 else z
    A = A.unsqueeze(0) if A.dim() == 2 else A
    B, C = (t.unsqueeze(1) if t.dim() == 2 else t for t in (B, C))
    D, dt_bias = (t.unsqueeze(0) if t.dim() == 1 else t for t in (D, dt_bias))
    _, heads, dim, dstate = state.shape
    batch = x.shape[0]
    _shape(name, "x", x, (batch, heads, dim))
    _require(state.shape[0] == batch, name, f"state holds {state.shape[0]} sequences, x {batch}")
    _shape(name, "dt", dt, tuple(x.shape))
    _shape(name, "A", A, (heads, dim, dstate))
    groups = B.shape[1]
    _require(heads % groups == 0, name, "nheads must be divisible by ngroups")
    _shape(name, "B", B, (batch, groups, dstate))
    _shape(name, "C", C, tuple(B.shape))
    _shape(name, "D", D, (heads, dim))
    _require(z is None or z.shape == x.shape, name, f"z must be {tuple(x.shape)}")
    _shape(name, "dt_bias", dt_bias, (heads, dim))
    delta = dt.float() + dt_bias.float()
    if dt_softplus:
        delta = torch.where(delta <= 20.0, F.softplus(delta), delta)
    rep = heads // groups
    B, C = (t.float().repeat_interleave(rep, dim=1)[:, :, None, :] for t in (B, C))  # (batch, heads, 1, n)
    new = state.float() * torch.exp(A.float() * delta[..., None]) + B * (delta * x.float())[..., None]
    state.copy_(new.to(state.dtype))
    out = (new * C).sum(-1) + x.float() * D.float()
    if z is not None:
        out = out * F.silu(z.float())
    out = out.to(x.dtype)
    return out if has_heads else out.squeeze(1)


def mamba_chunk_scan_combined(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    return_final_states: bool = False,
    return_varlen_states: bool = False,
    state_dtype: torch.dtype | None = None,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Stand-in for mamba-ssm's `mamba_chunk_scan_combined`: x (batch, L, heads, headdim), dt (batch, L, heads),
    A (heads,), B/C (batch, L, groups, n), D (heads,) or (heads, headdim), dt_bias (heads,), initial_states
    (batch, heads, headdim, n). Returns y in x's dtype and, with return_final_states, fp32 final states."""
    name = "mamba_chunk_scan_combined"
    if seq_idx is not None or return_varlen_states:
        raise NotImplementedError(f"{name}: the stand-in does not implement seq_idx / varlen states")
    _require(x.dim() == 4, name, f"x must be (batch, seqlen, nheads, headdim), got {tuple(x.shape)}")
    _require(B.dim() == 4, name, f"B must be (batch, seqlen, ngroups, dstate), got {tuple(B.shape)}")
    batch, length, heads, headdim = x.shape
    groups, dstate = B.shape[2], B.shape[3]
    _require(heads % groups == 0, name, "nheads must be divisible by ngroups")
    _require(tuple(B.shape[:2]) == (batch, length), name, f"B must start ({batch}, {length}), got {tuple(B.shape)}")
    _shape(name, "dt", dt, (batch, length, heads))
    _shape(name, "A", A, (heads,))
    _shape(name, "C", C, tuple(B.shape))
    _require(z is None or z.shape == x.shape, name, f"z must be {tuple(x.shape)}")
    _require(
        D is None or tuple(D.shape) in ((heads, headdim), (heads,)),
        name,
        f"D must be ({heads}, {headdim}) or ({heads},), got {None if D is None else tuple(D.shape)}",
    )
    _require(dt_bias is None or tuple(dt_bias.shape) == (heads,), name, f"dt_bias must be ({heads},)")
    shape = (batch, heads, headdim, dstate)
    _require(initial_states is None or tuple(initial_states.shape) == shape, name, f"initial_states must be {shape}")
    delta = dt.float() if dt_bias is None else dt.float() + dt_bias.float()
    if dt_softplus:
        delta = torch.where(delta <= 20.0, F.softplus(delta), delta)
    delta = delta.clamp(min=dt_limit[0], max=dt_limit[1])
    # fp32 throughout, then one rounding to x's dtype, as the kernel: the D skip and the gate join before it
    y, final = ssd_chunk_scan_reference(
        x.float(), delta, A, B, C, chunk_size, initial_states=initial_states, return_final_states=True
    )
    if D is not None:
        y = y + x.float() * (D.float()[:, None] if D.dim() == 1 else D.float())
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(x.dtype)
    return (y, final.float()) if return_final_states else y


def _stand_ins() -> dict[str, Callable[..., Any]]:
    """Every registered kernel's stand-in: the function of its name in the file its mixer's entry names
    (`MixerSpec.stand_ins`), the shared causal-conv1d ones in this one. A mixer declares its stand-ins there, not here.
    """
    found: dict[str, Callable[..., Any]] = {}
    own = __name__.rpartition(".")[2]  # this file, still importing: read from sys.modules, not imported again
    for spec in MIXERS.values():
        if spec.stand_ins == own:
            module = sys.modules[__name__]
        else:
            module = importlib.import_module(f".{spec.stand_ins}", __package__)
        for name in spec.kernels:
            stand_in = getattr(module, name, None) or globals().get(name)
            if stand_in is None:
                raise ImportError(f"{spec.title}: no stand-in named {name} in {spec.stand_ins}.py or kernels_xatl.py")
            found.setdefault(name, stand_in)
    return found


STAND_INS: dict[str, Callable[..., Any]] = _stand_ins()


# --------------------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelSet:
    """The functions the kernel call path uses on one device, and where each came from ("stand-in",
    "mamba_ssm", "causal_conv1d", or "hub:REPO@vN")."""

    functions: dict[str, Callable[..., Any]]
    sources: dict[str, str] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        try:
            return self.functions[name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def has_kernels(self) -> bool:
        """Whether any function is a real kernel (not a stand-in)."""
        return any(source != STAND_IN for source in self.sources.values())

    def describe(self) -> str:
        """One line for a report: which implementation each function has ("stand-ins" when none is a kernel)."""
        by_source: dict[str, list[str]] = {}
        for name, source in self.sources.items():
            by_source.setdefault(source, []).append(name)
        if list(by_source) == [STAND_IN]:
            return "stand-ins"
        return "; ".join(f"{source}: {', '.join(names)}" for source, names in by_source.items())


@functools.cache
def _installed_kernel(name: str) -> Callable[..., Any] | None:
    """The installed package's function, if it imports (a broken CUDA build may raise anything, hence Exception)."""
    package, module = KERNEL_MODULES[name]
    try:
        return getattr(importlib.import_module(f"{package}.{module}"), name)
    except Exception:
        return None


def _own_fallback(func_name: str, package: str, internal_path: str | None = None) -> Callable[[Callable], Callable]:
    """Ours, for transformers releases without `use_kernel_func_from_hub_with_fallback` (5.0 has none): the package's
    function when it imports, else the decorated PyTorch function; arguments it does not take are dropped, as
    transformers does."""

    def decorator(torch_function: Callable[..., Any]) -> Callable[..., Any]:
        implementation = _installed_kernel(func_name) or torch_function
        accepted = set(inspect.signature(implementation).parameters)

        @functools.wraps(torch_function)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            return implementation(*args, **{k: v for k, v in kwargs.items() if k in accepted})

        return wrapped

    return decorator


@functools.cache
def _installed_dispatch(name: str) -> Callable[..., Any]:
    """`name` through transformers' kernel mechanism: the installed package's kernel, else the stand-in. Built on
    first use, so that importing this module never imports mamba-ssm (or Triton)."""
    try:
        from transformers.integrations import use_kernel_func_from_hub_with_fallback as with_fallback
    except (ImportError, AttributeError):  # transformers before the mechanism existed
        with_fallback = _own_fallback
    package, module = KERNEL_MODULES[name]
    return with_fallback(name, package, module)(STAND_INS[name])


def hub_kernels_setting() -> tuple[str, int] | None:
    """(repo, version) of the prebuilt kernels the user allows through XATL_HUB_KERNELS, else None.

    "1" / "true" / "yes" → kernels-community/mamba-ssm, version 5; "REPO" or "REPO@VERSION" → that repository.
    Read on every mixer call (a user may set it after import); parsed once per value.
    """
    return _parse_hub_kernels(os.environ.get(HUB_KERNELS_ENV, "").strip())


@functools.cache
def _parse_hub_kernels(value: str) -> tuple[str, int] | None:
    if value.lower() in ("", "0", "false", "no", "off"):
        return None
    if value.lower() in ("1", "true", "yes", "on"):
        return DEFAULT_HUB_KERNELS
    repo, at, version = value.partition("@")
    expected = f"{HUB_KERNELS_ENV}={value!r}: expected 1, 0, a kernel repository, or REPOSITORY@VERSION"
    if not repo or (at and not (version.isascii() and version.isdigit() and len(version) <= 6)):
        raise ValueError(expected)
    if not _HUB_REPOSITORY.fullmatch(repo):  # else `kernels` fails later, and only warns
        raise ValueError(f"{expected} ({repo!r} is not a Hub repository OWNER/NAME, as {DEFAULT_HUB_KERNELS[0]})")
    return repo, int(version) if version else DEFAULT_HUB_KERNELS[1]


@functools.cache
def _hub_module(repo: str, version: int, device_type: str) -> Any:
    """The `kernels` package's build of `repo` for `device_type`, or None (with one warning saying why)."""
    try:
        import kernels

        return kernels.get_kernel(repo, version=version, backend=device_type)
    except Exception as error:  # not installed, offline, no build for this device or torch: fall back
        logger.warning(f"{HUB_KERNELS_ENV}: no {repo}@v{version} build for {device_type} ({error}); not using it")
        return None


def _hub_function(module: Any, name: str) -> Callable[..., Any] | None:
    """`name` from a hub kernel module: at its top level, or where the package keeps it (ops.triton...)."""
    found = getattr(module, name, None)
    if found is not None:
        return found
    for part in (*KERNEL_MODULES[name][1].split("."), name):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


@functools.cache
def kernel_set(device_type: str, hub: tuple[str, int] | None = None) -> KernelSet:
    """The kernel call path's functions for tensors on `device_type` ("cuda", "cpu", ...), with the prebuilt
    Hub kernels `hub` (repo, version) allowed first."""
    functions, sources = {}, {}
    hub_module = _hub_module(*hub, device_type) if hub is not None else None
    for name in KERNEL_MODULES:
        found = _hub_function(hub_module, name) if hub_module is not None else None
        if found is not None:
            functions[name], sources[name] = found, f"hub:{hub[0]}@v{hub[1]}"
        elif device_type == "cuda" and _installed_kernel(name) is not None:
            functions[name], sources[name] = _installed_dispatch(name), KERNEL_MODULES[name][0]
        else:
            functions[name], sources[name] = STAND_INS[name], STAND_IN
    return KernelSet(functions, sources)


def outside_kernel_limits(kind: str, settings: dict[str, Any]) -> str | None:
    """Why the kernels cannot run mixer `kind` with these settings (the registry's limits: causal-conv1d takes
    widths 2 to 4, mamba-ssm's selective scan at most 256 states), or None when they can."""
    return MIXERS[kind].outside_kernel_limits(settings)


@functools.cache
def _warn_reference(reason: str) -> None:
    logger.warning(f"{reason}: those mixers run the reference path, not the kernels")


def kernels_for(tensor: torch.Tensor, outside_limits: str | None = None, scan: str | None = None) -> KernelSet | None:
    """What a mixer's kernel call path uses for inputs like `tensor`, or None for the readable reference path.

    "auto" (default): the kernel call path where a real kernel exists for the tensor's device and dtype (never for
    float64, which the kernels do not take) and the mixer's shape is within the kernels' limits (`outside_limits`
    says why not; warned once). Inside `kernel_path("kernels")` always, with stand-ins where no kernel exists;
    inside `kernel_path("reference")` never.
    """
    if _PATH == "reference":
        return None
    found = kernel_set(tensor.device.type, hub_kernels_setting())
    if _PATH == "kernels":
        return found
    served = found.has_kernels if scan is None else found.sources[scan] != STAND_IN
    if not served or tensor.dtype == torch.float64:
        return None
    if outside_limits is not None:
        _warn_reference(outside_limits)
        return None
    return found


@contextlib.contextmanager
def kernel_path(path: str) -> Iterator[None]:
    """Within this block the mixers take `path`: "kernels" (the CUDA call sites, stand-ins where no kernel exists),
    "reference" (the readable path, even on CUDA with kernels), or "auto"."""
    global _PATH
    if path not in PATHS:
        raise ValueError(f"kernel path {path!r}: expected one of {', '.join(PATHS)}")
    previous, _PATH = _PATH, path
    try:
        yield
    finally:
        _PATH = previous


def reference_path() -> contextlib.AbstractContextManager[None]:
    """Within this block the mixers run the readable reference path even for CUDA inputs with kernels."""
    return kernel_path("reference")


def kernels_available(kind: str, device_type: str = "cuda") -> bool:
    """Whether a real kernel (installed or from the Hub) serves layer type `kind` (a registered mixer) there."""
    return kernel_set(device_type, hub_kernels_setting()).sources[MIXERS[kind].scan_kernel] != STAND_IN
