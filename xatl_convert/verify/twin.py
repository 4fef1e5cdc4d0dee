"""The source twin: the user's conversion re-planned with every layer kept as attention, against the source's
own transformers model, block by block.

The twin is planned in memory from the same source, mapping, options and `--set` overrides as the conversion
(nothing is written), so it shares every transferred tensor's rule with the user's output: embeddings, norms,
residual layout, MLP, head and rope. Each twin block gets the source block's input (teacher forcing) and must give
its output, so the first layer that diverges names the rule that is wrong. A mapping that cannot have a twin (it
drops a tensor the source uses, or initialises part of an attention layer) makes the check say why, not pass.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from xatl_convert.errors import XatlError, first_line
from xatl_convert.mapping import Mapping, builtin_mappings, load_mapping
from xatl_convert.plan import ConversionPlan, build_plan
from xatl_convert.sources import SourceCheckpoint
from xatl_convert.verify.passes import Run, next_token_loss
from xatl_convert.verify.readers import CheckpointTensors, PlannedTensors
from xatl_convert.verify.report import CheckResult
from xatl_convert.verify.streaming import LayerCall, StreamingError, decoder_blocks, relative_error

NAME = "source twin = source"
EXACT_STRATEGIES = ("zeros", "ones")  # an initialised tensor the twin can still match with (a zero bias)


@dataclass
class TwinPass:
    """The check's row, and the source's logits for the loss check (None when the source cannot run)."""

    result: CheckResult
    source_logits: torch.Tensor | None = None


class NoTwin(Exception):
    """Why this conversion has no twin to compare; the check shows it instead of passing."""


def run_twin(
    run: Run,
    manifest: dict[str, Any],
    checkpoint: SourceCheckpoint | None,
    no_source: str,
    output_logits: torch.Tensor | None = None,
) -> TwinPass:
    """Stream the source and its twin; see the module docstring. `output_logits`, the converted model's own, are
    compared with the source's too when the output keeps every layer as attention (it is then its own twin)."""
    bound = f"per layer, relative ≤ {run.bounds.twin:g}"
    if checkpoint is None:
        return TwinPass(CheckResult(NAME, "skip", no_source, bound, {"reason": no_source}))
    try:
        source_model, source_layers, reader = source_skeleton(checkpoint, run.dtype)
        source = run.stream("source", source_model, reader, source_layers)
    except NoTwin as reason:
        return TwinPass(CheckResult(NAME, "skip", str(reason), bound, {"reason": str(reason)}))
    states: list[torch.Tensor] = []  # states[i]: block i's input; states[i + 1]: its output

    def record(call: LayerCall) -> None:
        if call.index == 0:
            states.append(call.hidden_states.clone())
        states.append(call.output.clone())

    try:
        plan = twin_plan(manifest, checkpoint, run.dtype)
        unusable_reason(plan, source_model, source_layers)
    except NoTwin as reason:  # the source still runs: its loss is reported
        logits = source.forward(run.input_ids, layers=run.layers)
        return TwinPass(CheckResult(NAME, "skip", str(reason), bound, {"reason": str(reason)}), logits)
    source_logits = source.forward(run.input_ids, on_layer=record, layers=run.layers)
    result = _compare(run, plan, states, source_logits, bound)
    all_attention = all(kind == "attention" for kind in run.config.layer_types)
    if all_attention and output_logits is not None and source_logits is not None:
        result.details["output_logits"] = relative_error(output_logits, source_logits)
        result = _result(result.details, run.bounds.twin, bound)
    return TwinPass(result, source_logits)


def _compare(
    run: Run, plan: ConversionPlan, states: list[torch.Tensor], source_logits: torch.Tensor | None, bound: str
) -> CheckResult:
    per_layer: list[float] = []
    embedding: list[float] = []

    def teacher(index: int, own_input: torch.Tensor) -> torch.Tensor:
        if index == 0:
            embedding.append(relative_error(own_input, states[0]))
        return states[index]

    def compare(call: LayerCall) -> None:
        per_layer.append(relative_error(call.output, states[call.index + 1]))

    layers = plan.target_config.num_hidden_layers
    twin = run.stream("source twin", run.xatl_skeleton(plan.target_config), PlannedTensors(plan), layers)
    twin_logits = twin.forward(run.input_ids, on_layer=compare, replace_input=teacher, layers=run.layers)
    details: dict[str, Any] = {"embeddings": embedding[0] if embedding else None, "per_layer": per_layer}
    if twin_logits is not None and source_logits is not None:
        details["logits"] = relative_error(twin_logits, source_logits)
        details["source_loss"] = next_token_loss(source_logits, run.input_ids)
    return _result(details, run.bounds.twin, bound)


def _result(details: dict[str, Any], limit: float, bound: str) -> CheckResult:
    """Pass when the embeddings, every layer and the logits are within the bound; else name the first that is not."""
    steps = [("embeddings", details["embeddings"])]
    steps += [(f"layer {i}", error) for i, error in enumerate(details["per_layer"])]
    steps.append(("logits", details.get("logits")))
    steps.append(("the output's logits", details.get("output_logits")))
    measured = [(where, error) for where, error in steps if error is not None]
    failing = next(((where, error) for where, error in measured if not error <= limit), None)
    worst = max(measured, key=lambda item: item[1]) if measured else ("", 0.0)
    details["worst"] = {"where": worst[0], "error": worst[1]}
    if failing is not None:
        details["first_divergence"] = {"where": failing[0], "error": failing[1]}
        return CheckResult(NAME, "fail", f"diverges at {failing[0]}: {failing[1]:.2e}", bound, details)
    return CheckResult(NAME, "pass", _summary(details, len(measured)), bound, details)


def _summary(details: dict[str, Any], comparisons: int) -> str:
    """e.g. "24 layers ≤ 3.1e-07, logits 2.0e-07": each part of the model at a glance."""
    if details["worst"]["error"] == 0:
        return f"bit-identical ({comparisons} comparisons)"
    per_layer = details["per_layer"]
    parts = [f"{len(per_layer)} layers ≤ {max(per_layer):.1e}"] if per_layer else []
    if details.get("embeddings"):
        parts.insert(0, f"embeddings {details['embeddings']:.1e}")
    if details.get("logits") is not None:
        parts.append(f"logits {details['logits']:.1e}")
    if details.get("output_logits") is not None:
        parts.append(f"output's logits {details['output_logits']:.1e}")
    return ", ".join(parts)


def source_skeleton(checkpoint: SourceCheckpoint, dtype: torch.dtype) -> tuple[torch.nn.Module, int, CheckpointTensors]:
    """transformers' own model class for the source, on the meta device (no remote code, ever), its number of
    decoder blocks, and the reader of its tensors under that class's names."""
    from transformers import AutoModelForCausalLM

    from xatl_convert.sources.transformers_config import transformers_config

    config = transformers_config(checkpoint.config, checkpoint.path / "config.json")
    if config is None:
        raise NoTwin(f"transformers has no model class for the source (model_type {checkpoint.model_type!r})")
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    except (ValueError, KeyError, OSError, TypeError) as error:
        raise NoTwin(f"transformers has no model class for the source ({first_line(error)})") from None
    layers = getattr(config.get_text_config(), "num_hidden_layers", None)
    if not isinstance(layers, int):
        raise NoTwin(f"the source config ({type(config).__name__}) does not say its number of layers")
    try:
        reader = CheckpointTensors(checkpoint, model)
        decoder_blocks(model, layers)
    except StreamingError as error:
        raise NoTwin(str(error)) from None
    return model, layers, reader


def twin_plan(manifest: dict[str, Any], checkpoint: SourceCheckpoint, dtype: torch.dtype) -> ConversionPlan:
    """The conversion's plan again, with every layer kept as attention, tensors made in the compute dtype."""
    mapping = recorded_mapping(manifest)
    recorded = manifest["mapping"]
    try:
        return build_plan(
            checkpoint, mapping, "all", recorded.get("overrides") or {}, dtype, manifest["target"].get("seed", 0)
        )
    except XatlError as error:
        raise NoTwin(f"the mapping has no all-attention form: {first_line(error)}") from None


def recorded_mapping(manifest: dict[str, Any]) -> Mapping:
    """The mapping that made the conversion: its recorded file, or the built-in of that name, if unchanged."""
    recorded = manifest["mapping"]
    digest = recorded.get("sha256")
    candidates = [recorded.get("file"), builtin_mappings().get(recorded.get("name", ""))]
    for candidate in candidates:
        if not candidate or not Path(candidate).is_file():
            continue
        try:
            mapping = load_mapping(candidate)
        except XatlError:
            continue
        if digest is None or hashlib.sha256(mapping.text.encode()).hexdigest() == digest:
            return mapping
    raise NoTwin(
        f"the mapping that made this conversion ({recorded.get('file') or recorded.get('name')}) is missing or "
        "has changed since; convert again to check the twin"
    )


def unusable_reason(plan: ConversionPlan, source_model: torch.nn.Module, source_layers: int) -> None:
    """Raise NoTwin when the all-attention plan cannot reproduce the source whatever the numbers say."""
    if plan.target_config.num_hidden_layers != source_layers:
        raise NoTwin(f"the target has {plan.target_config.num_hidden_layers} layers, the source {source_layers}")
    random = [t.name for t in plan.by_status("initialised") if t.strategy not in EXACT_STRATEGIES and not t.parts]
    if random:
        raise NoTwin(f"the mapping initialises {random[0]} even with every layer kept as attention")
    parameters = {name for name, _ in source_model.named_parameters()}
    used = [name for name in plan.dropped if name in parameters]
    if used:
        raise NoTwin(f"the target has no place for source tensor {used[0]} ({plan.dropped[used[0]]})")
