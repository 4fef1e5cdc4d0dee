"""Every kernel call site of an LCI mixer, run against the mixer's readable reference path.

The kernel call path (`kernels_xatl`) calls mamba-ssm's and causal-conv1d's functions exactly as CUDA runs them;
on a CPU its stand-ins take the same arguments, refuse what the kernels refuse and compute the same thing. So the
same comparison proves the call sites everywhere (argument order, layouts, dtypes, cached states) and, on CUDA,
the kernels themselves. One mixer, every path it has: a prefill without and with a cache, a chunk continuing a
cached prefix (initial states), single-token steps, and a left-padded batch, each in fp32 and bf16.
"""

from __future__ import annotations

import copy
import functools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from xatl_convert.models.configuration_xatl import XatlConfig
from xatl_convert.models.kernels_xatl import kernel_path, kernels_for

# (first token, end token) segments; a cache is kept across the segments of one scenario.
PREFIX, CHUNK, STEPS = 200, 120, 3
SITE_TOKENS = 330  # enough for every scenario; the prefill and the continuation cross a 256-token Mamba2 chunk
BOUNDS = {torch.float32: 1e-3, torch.bfloat16: 2e-2}  # relative, outputs and final states alike


@dataclass(frozen=True)
class SiteComparison:
    """One scenario in one dtype: the largest relative error of the kernel path's outputs and final states."""

    scenario: str
    dtype: torch.dtype
    error: float
    bound: float
    refused: str | None = None  # why the kernel path gave no comparable result (the error it raised, a shape)
    kernel_ms: float | None = None
    reference_ms: float | None = None

    @property
    def passed(self) -> bool:
        return self.refused is None and self.error <= self.bound


def scenarios(total: int) -> dict[str, tuple[list[tuple[int, int]], bool, bool]]:
    """name → (segments, with a cache, left-padded batch). `total` tokens in all."""
    prefix = min(PREFIX, total // 2)
    chunk_end = min(prefix + CHUNK, total - STEPS)
    steps = [(t, t + 1) for t in range(chunk_end, chunk_end + STEPS)]
    return {
        "prefill": ([(0, total)], False, False),
        "prefill into a cache": ([(0, total)], True, False),
        "continue a cached prefix": ([(0, prefix), (prefix, chunk_end)], True, False),
        "decode steps": ([(0, prefix), *[(t, t + 1) for t in range(prefix, prefix + STEPS)]], True, False),
        "padded batch, then steps": ([(0, chunk_end), *steps], True, True),
    }


def compare_call_sites(
    mixer: torch.nn.Module,
    config: XatlConfig,
    hidden: torch.Tensor,
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16),
) -> list[SiteComparison]:
    """Run `mixer` (an XatlMamba or XatlMamba2) on `hidden` (batch ≥ 2, L tokens) through every scenario, kernel
    path against reference path, in each dtype. The mixer itself is not changed (copies are cast).

    The paths are switched through the mixer's own modeling module, so a model loaded as remote code (a copy of
    the modeling files) is checked as it runs.
    """
    modeling = sys.modules[type(mixer).__module__]
    results = []
    for dtype in dtypes:
        module = copy.deepcopy(mixer).to(dtype)
        states = hidden.to(dtype)
        for name, (segments, cached, padded) in scenarios(states.shape[1]).items():
            padding = _left_padding(states, segments[-1][1]) if padded else None
            run = functools.partial(_run, modeling.XatlCache, module, config, states, segments, cached, padding)
            try:
                with modeling.kernel_path("kernels"):
                    kernel, kernel_ms = _timed(run)
            except (RuntimeError, TypeError, ValueError, AssertionError, NotImplementedError) as error:
                message = f"{type(error).__name__}: {error}".splitlines()[0]
                results.append(SiteComparison(name, dtype, float("inf"), BOUNDS[dtype], refused=message))
                continue
            with modeling.kernel_path("reference"):
                reference, reference_ms = _timed(run)
            shapes = [(tuple(k.shape), tuple(r.shape)) for k, r in zip(kernel, reference, strict=True)]
            wrong = next((f"shape {k} where the reference has {r}" for k, r in shapes if k != r), None)
            error = float("inf") if wrong else max(_relative(k, r) for k, r in zip(kernel, reference, strict=True))
            results.append(SiteComparison(name, dtype, error, BOUNDS[dtype], wrong, kernel_ms, reference_ms))
    return results


def site_inputs(normed: torch.Tensor, tokens: int = SITE_TOKENS) -> torch.Tensor:
    """(2, tokens, hidden) mixer inputs from a real one (1, L, hidden): the sequence repeated to `tokens` (enough
    for every scenario, and to cross a 256-token Mamba2 chunk), and a second row rolled by a third of it, so the
    batch's rows differ. Real activations keep the scale and outliers a checkpoint's mixers see."""
    sequence = normed[0]
    sequence = sequence.repeat(-(-tokens // sequence.shape[0]), 1)[:tokens]
    return torch.stack([sequence, sequence.roll(tokens // 3, dims=0)])


def used_kernels(device: torch.device) -> str:
    """Which implementation the kernel call path had on `device`, in a few words (per function where they differ)."""
    with kernel_path("kernels"):
        found = kernels_for(torch.empty(0, device=device))
    assert found is not None
    return f"{found.describe()} on {device.type}"


def _run(
    cache_class: type,
    module: torch.nn.Module,
    config: XatlConfig,
    hidden: torch.Tensor,
    segments: list[tuple[int, int]],
    cached: bool,
    padding: torch.Tensor | None,
) -> list[torch.Tensor]:
    """The outputs of every segment (joined) and, with a cache, the final conv and SSM states."""
    cache = cache_class(config, hidden.shape[0], dtype=hidden.dtype, device=hidden.device) if cached else None
    outputs = []
    with torch.no_grad():
        for start, stop in segments:
            mask = None if padding is None else padding[:, start:stop]
            outputs.append(module(hidden[:, start:stop], padding_mask=mask, cache=cache))
            if cache is not None:
                cache.seen_tokens = stop
    results = [torch.cat(outputs, dim=1)]
    if cache is not None:
        results += [cache.conv_states[module.layer_idx], cache.ssm_states[module.layer_idx]]
    return results


def _left_padding(hidden: torch.Tensor, length: int) -> torch.Tensor:
    """(batch, length) mask: row 1 starts with 7 padding positions (zeros), the others have none."""
    mask = torch.ones(hidden.shape[0], hidden.shape[1], dtype=torch.long, device=hidden.device)
    mask[1, :7] = 0
    return mask


def _timed(run: Callable[[], list[torch.Tensor]]) -> tuple[list[torch.Tensor], float]:
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = run()
    if cuda:
        torch.cuda.synchronize()
    return result, 1000 * (time.perf_counter() - start)


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.float()
    scale = want.norm().item()
    return (got.float() - want).norm().item() / max(scale, 1e-30)


__all__ = ["BOUNDS", "SITE_TOKENS", "SiteComparison", "compare_call_sites", "scenarios", "site_inputs", "used_kernels"]
