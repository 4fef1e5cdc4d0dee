"""Verify's bounds on a real checkpoint: SmolLM2-135M (30 layers, bf16), its rounding against injected bugs.

Converts the real model (benchmarks/real_model.py builds it) to Mamba and Mamba2, in bf16 and fp32, verifies
each, and prints every check; then injects the bugs verify must catch (a wrong cache update, a transposed
transfer, a lost norm offset, all in the first blocks; B and C swapped at the selective-scan call site) and prints
the error each gives against the rounding of the clean run, measured in the same run: the margin is their ratio.

    python benchmarks/verify_real_model.py
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from unittest import mock

import torch

from benchmarks.real_model import WORK, build
from xatl_convert.conversion import convert
from xatl_convert.models import kernels_xatl, modeling_xatl
from xatl_convert.verify import verify
from xatl_convert.verify.readers import PlannedTensors
from xatl_convert.verify.report import CheckResult

TWIN, DECODING = "source twin = source", "incremental decoding = full forward"
KERNELS = "mamba kernel call sites = reference"
CASES = [("mamba", None), ("mamba", torch.float32), ("mamba2", None), ("mamba2", torch.float32)]


def main() -> None:
    source = build()
    folder = WORK / "verify"
    shutil.rmtree(folder, ignore_errors=True)
    for target, dtype in CASES:
        out = folder / f"{target}-{'fp32' if dtype else 'bf16'}"
        convert(source, out, to=target, dtype=dtype)
        report = verify(out)
        print(f"\n{out.name}: {'PASSED' if report.passed else 'FAILED'}")
        for check in report.checks:
            print(f"  {check.name:38} {check.status:5} {check.value}  [{check.bound}]")
    out = folder / "mamba-bf16"
    clean = verify(out, layers=4)
    print("\ninjected bugs (first 4 blocks), error against the clean run's worst rounding:")
    for label, check, patch in _bugs():
        with patch:
            result = verify(out, layers=4).check(check)
        error, where = _divergence(result)
        rounding = _divergence(clean.check(check))[0] or 1e-12
        print(f"  {label:28} {result.status:5} at {where:8} error {error:.2e}  margin x{error / rounding:.1e}")


def _divergence(result: CheckResult) -> tuple[float, str]:
    """The error a check measured where it diverged (its worst value when it passed), and where."""
    if result.name == KERNELS:  # per scenario and dtype, not per layer
        worst = max(result.details["comparisons"], key=lambda c: c["relative_error"])
        return worst["relative_error"], f"{worst['scenario']} ({worst['dtype']})" if result.status == "fail" else "-"
    divergence = result.details.get("first_divergence")
    if divergence is None:
        return result.details["worst"]["error"], "-"
    return divergence["error"], divergence["where"]


def _swapped_b_and_c() -> AbstractContextManager[object]:
    """A call site that passes C where selective_scan_fn takes B (and B for C)."""
    resolve = kernels_xatl.kernel_set

    def kernel_set(*args: object) -> kernels_xatl.KernelSet:
        found = resolve(*args)
        scan = found.functions["selective_scan_fn"]
        swapped = lambda u, delta, A, B, C, *rest, **kwargs: scan(u, delta, A, C, B, *rest, **kwargs)  # noqa: E731
        return kernels_xatl.KernelSet({**found.functions, "selective_scan_fn": swapped}, found.sources)

    return mock.patch.object(kernels_xatl, "kernel_set", kernel_set)


def _bugs() -> list[tuple[str, str, AbstractContextManager[object]]]:
    forgetful = modeling_xatl._causal_conv_silu
    produce = PlannedTensors.__call__

    def twin_damage(damage: Callable[[str, torch.Tensor], torch.Tensor]) -> AbstractContextManager[object]:
        return mock.patch.object(PlannedTensors, "__call__", lambda self, name: damage(name, produce(self, name)))

    def transpose_q(name: str, tensor: torch.Tensor) -> torch.Tensor:  # q_proj is square in SmolLM2
        return tensor.t().contiguous() if name == "model.layers.2.mixer.q_proj.weight" else tensor

    def lose_offset(name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor - 1 if name == "model.layers.1.mlp_norm.weight" else tensor

    return [
        ("wrong cache update (conv)", DECODING, mock.patch.object(
            modeling_xatl, "_causal_conv_silu", lambda x, conv, previous: forgetful(x, conv, None))),
        ("transposed transfer (q)", TWIN, twin_damage(transpose_q)),
        ("lost norm offset", TWIN, twin_damage(lose_offset)),
        ("B, C swapped at a call site", KERNELS, _swapped_b_and_c()),
        ("none (clean)", TWIN, nullcontext()),
    ]  # fmt: skip


if __name__ == "__main__":
    main()
