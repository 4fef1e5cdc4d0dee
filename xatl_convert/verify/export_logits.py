"""The logits check of `xatl verify` on an export: transformers' own class for the format (no remote code) against
the xatl model the export came from, on the same tokens, in float32 or float64.

Both models are streamed as conversion verify streams (see `streaming`): built on the meta device, each decoder
block loaded from its own safetensors just before it runs and freed just after, so memory is one block of either
model, the activations and the two logits, whatever the model's size. Each block's output is compared too, so a
failure names the first block that goes beyond the bound (where a wrong tensor or config key shows first).

Two float32 implementations of the same model can differ by more than the fixed bound without either being wrong: a
deep model amplifies rounding, and a format whose class computes a mixer in another order (Qwen3-Next's chunked delta
rule) differs from the xatl model by about what the xatl model differs from itself in float64. So an export over the
fixed bound is judged against that measured floor: one more pass of the xatl model in the other precision gives the
float64 answer, and the export passes when it is no further from it than `ROUNDING_MARGIN` times the xatl model's
own float32 pass (and under `ROUNDING_CEILING`, so a model too ill-conditioned to check in float32 never passes on
rounding alone). benchmarks/export_verify_bound.py measures both sides of that rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xatl_convert.errors import OutputError, SourceError, first_line
from xatl_convert.json_files import read_json
from xatl_convert.sources import SourceCheckpoint
from xatl_convert.sources.checkpoint import open_written_weights
from xatl_convert.verify.passes import Run
from xatl_convert.verify.readers import CheckpointTensors
from xatl_convert.verify.report import CheckResult
from xatl_convert.verify.streaming import LayerCall, StreamingError, decoder_blocks, relative_error

# The export may be this many times further from the float64 answer than the xatl model's own float32 pass. The worst
# ratio measured on SmolLM2-135M's Gated DeltaNet export to qwen3_next (30 layers, 100 to 1395 tokens) is 1.75:
# two float32 implementations of the same sums, each about as far from float64. Real export bugs measure > 3700.
ROUNDING_MARGIN = 4.0
ROUNDING_CEILING = 1e-2  # beyond this, float32 rounding alone cannot pass an export: check it in another way


@dataclass(frozen=True)
class RoundingFloor:
    """The xatl model's own float32 rounding, measured in the same run: how far its float32 logits and the
    export's are from the float64 answer (the xatl model run in float64)."""

    xatl_float32: float
    export: float

    @property
    def ratio(self) -> float:
        return self.export / self.xatl_float32 if self.xatl_float32 > 0 else float("inf")

    @property
    def passes(self) -> bool:
        return self.export <= min(ROUNDING_MARGIN * self.xatl_float32, ROUNDING_CEILING)

    def as_dict(self) -> dict[str, float | None]:
        return {
            "xatl_float32_vs_float64": self.xatl_float32,
            "export_vs_float64": self.export,
            "ratio": self.ratio if math.isfinite(self.ratio) else None,  # JSON has no infinity
            "margin": ROUNDING_MARGIN,
            "ceiling": ROUNDING_CEILING,
        }


def check_name(format: str) -> str:
    return f"logits = xatl model ({format}, no remote code)"


def check_export_logits(run: Run, xatl: SourceCheckpoint, folder: Path, format: str) -> CheckResult:
    """Stream the xatl model (tensors from `xatl`), then the export (transformers' class for `format`, tensors
    from `folder`), over `run.input_ids`; compare each block's output and the logits (max |Δ| / max |xatl|)."""
    tokens = int(run.input_ids.shape[1])
    limit = run.bounds.export
    bound = f"relative ≤ {limit:.1e} ({str(run.dtype).removeprefix('torch.')}, {tokens} tokens)"
    model, layers, reader = export_skeleton(folder, run.dtype)
    if layers != run.config.num_hidden_layers:
        raise OutputError(f"{folder / 'config.json'}: {layers} layers where the xatl folder has "
                          f"{run.config.num_hidden_layers}; export again")  # fmt: skip
    states: list[torch.Tensor] = []  # the xatl model's block outputs, compared as the export's blocks run
    per_layer: list[float] = []
    xatl_pass = run.stream("xatl model", run.xatl_skeleton(), CheckpointTensors(xatl), layers)
    xatl_logits = xatl_pass.forward(run.input_ids, on_layer=lambda call: states.append(call.output.clone()))
    export_pass = run.stream(f"{format} export", model, reader, layers)

    def compare(call: LayerCall) -> None:
        per_layer.append(relative_error(call.output, states[call.index]))
        states[call.index] = torch.empty(0)  # compared: free it

    export_logits = export_pass.forward(run.input_ids, on_layer=compare)
    assert xatl_logits is not None and export_logits is not None  # no --layers here: every block runs
    error = relative_error(export_logits, xatl_logits)
    floor = None if error <= limit else rounding_floor(run, xatl, layers, xatl_logits, export_logits)
    over = next((i for i, value in enumerate(per_layer) if not value <= limit), None)
    worst = max(range(len(per_layer)), key=lambda i: per_layer[i]) if per_layer else None
    details: dict[str, Any] = {
        "relative_error": error,
        "bound": limit,
        "ratio": error / limit,
        "precision": str(run.dtype).removeprefix("torch."),
        "tokens": tokens,
        "per_layer": per_layer,
        "worst_layer": {"where": f"layer {worst}", "error": per_layer[worst]} if worst is not None else None,
        "peak_block_bytes": max(xatl_pass.peak_unit_bytes, export_pass.peak_unit_bytes),
    }
    passed = error <= limit or (floor is not None and floor.passes)
    value = f"{error:.1e}" if error else "bit-identical"
    if floor is not None:
        details["rounding_floor"] = floor.as_dict()
        verdict = "within" if floor.passes else "beyond"
        value += (
            f" (over the fixed bound; {verdict} the model's own float32 rounding: {floor.export:.1e} from float64, "
            f"the xatl model's float32 {floor.xatl_float32:.1e}, ×{floor.ratio:.2f})"
        )
    if over is not None:
        details["first_block_over_bound"] = {"where": f"layer {over}", "error": per_layer[over]}
        if not passed:
            value += f"; first block over the bound: layer {over} ({per_layer[over]:.1e})"
    bound += f", or ≤ {ROUNDING_MARGIN:g}× the xatl model's own float32 distance from float64"
    return CheckResult(check_name(format), "pass" if passed else "fail", value, bound, details)


def rounding_floor(
    run: Run, xatl: SourceCheckpoint, layers: int, xatl_logits: torch.Tensor, export_logits: torch.Tensor
) -> RoundingFloor:
    """The xatl model once more in the other precision (float64 beside a float32 run, float32 beside a float64
    one), streamed as the other passes: the float64 answer and the xatl model's float32 distance from it."""
    other = torch.float64 if run.dtype == torch.float32 else torch.float32
    other_run = replace(run, dtype=other)
    label = f"xatl model ({str(other).removeprefix('torch.')}: rounding floor)"
    logits = other_run.stream(label, other_run.xatl_skeleton(), CheckpointTensors(xatl), layers).forward(run.input_ids)
    assert logits is not None
    exact, own = (logits, xatl_logits) if other == torch.float64 else (xatl_logits, logits)
    return RoundingFloor(relative_error(own, exact), relative_error(export_logits, exact))


def export_skeleton(folder: Path, dtype: torch.dtype) -> tuple[nn.Module, int, CheckpointTensors]:
    """transformers' own model class for the export (never remote code) on the meta device in `dtype`, its number
    of decoder blocks, and the reader of the export's tensors under that class's parameter names."""
    from transformers import AutoModelForCausalLM

    from xatl_convert.sources.transformers_config import transformers_config

    path = folder / "config.json"
    data = read_json(path, OutputError, "export again", expect_object=True)
    try:
        config = transformers_config(data, path)
    except SourceError as error:
        raise OutputError(f"{error}; export again") from None
    if config is None:
        raise OutputError(f"{path}: transformers has no model class for model_type {data.get('model_type')!r}")
    try:
        with torch.device("meta"):  # no memory until a block is loaded
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
        layers = config.num_hidden_layers
        reader = CheckpointTensors(_export_weights(folder), model)
        decoder_blocks(model, layers)
    except (StreamingError, ValueError, KeyError, TypeError) as error:
        raise OutputError(
            f"{folder}: transformers cannot stream this export ({first_line(error)}); export again"
        ) from None
    return model, layers, reader


def _export_weights(folder: Path) -> SourceCheckpoint:
    """The export's tensors, through its index or its one file, checked as `ExportedTensors` checks them."""
    try:
        return open_written_weights(folder)
    except SourceError as error:
        raise OutputError(f"{error}; export again") from None
