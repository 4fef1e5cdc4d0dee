"""Rich tables for the terminal: the transfer plan and the verify report."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table
from rich.tree import Tree

from xatl_convert.plan import ConversionPlan
from xatl_convert.sources.inventory import Inventory
from xatl_convert.verify.report import VerifyReport

if TYPE_CHECKING:
    from xatl_convert.training.evaluate import Evaluation

_STATUS_STYLE = {"pass": "[green]pass[/]", "fail": "[bold red]FAIL[/]", "skip": "[dim]skip[/]"}


_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


def plan_table(plan: ConversionPlan, per_tensor: bool = False) -> Table:
    """The transfer plan: one row per `{i}` pattern (the layers it covers named), or one per tensor."""
    transferred, initialised = plan.by_status("transferred"), plan.by_status("initialised")
    table = Table(
        title=f"{plan.source.reference} → xatl ({plan.mapping.name})",
        caption=f"{len(plan.tensors)} tensors, {plan.total_bytes():,} bytes: {len(transferred)} transferred "
        f"({plan.total_bytes('transferred'):,} B), {len(initialised)} initialised "
        f"({plan.total_bytes('initialised'):,} B)",
    )
    table.add_column("target tensor", overflow="fold", ratio=3)
    if not per_tensor:
        table.add_column("layers", no_wrap=True)
    table.add_column("source tensors", overflow="fold", ratio=3)
    table.add_column("transform / init", overflow="fold", ratio=2)
    for column in ("shape", "dtype"):
        table.add_column(column, no_wrap=True)
    table.add_column("bytes", justify="right", no_wrap=True)
    table.add_column("status", no_wrap=True)
    rows: dict[tuple[str, ...], _FoldedRow] = {}
    for tensor in plan.tensors:
        layer, name = _fold(tensor.name, per_tensor)
        how = tensor.transform.describe() if tensor.transform else f"init: {tensor.strategy}"
        sources = [_fold(source, per_tensor, layer)[1] for source in tensor.sources]
        for part in tensor.parts:
            how += f"\n{part.part} ← {part.transform.describe()}"
            sources += [f"{_fold(source, per_tensor, layer)[1]} → {part.part}" for source in part.sources]
        shape, dtype = "×".join(map(str, tensor.shape)), str(tensor.dtype).removeprefix("torch.")
        key = (name, "\n".join(sources), how, shape, dtype, tensor.status)
        row = rows.setdefault(key, _FoldedRow())
        row.layers.append(layer)
        row.nbytes += tensor.nbytes
    for (name, sources, how, shape, dtype, status), row in rows.items():
        style = "[green]transferred[/]" if status == "transferred" else "[yellow]initialised[/]"
        layers = [] if per_tensor else [_layer_ranges(row.layers)]
        table.add_row(name, *layers, sources, how, shape, dtype, f"{row.nbytes:,}", style)
    return table


def dropped_table(plan: ConversionPlan, per_tensor: bool = False) -> Table:
    """Source tensors left out of the output, with the reason for each (folded per `{i}` pattern)."""
    table = Table(title=f"{len(plan.dropped)} source tensors dropped")
    table.add_column("source tensor", overflow="fold")
    if not per_tensor:
        table.add_column("layers", overflow="fold")
    table.add_column("reason", overflow="fold")
    mapping_file = plan.mapping.file
    rows: dict[tuple[str, str], list[int | None]] = {}
    for name, reason in plan.dropped.items():
        layer, folded = _fold(name, per_tensor)
        short_reason = reason.replace(mapping_file, Path(mapping_file).name) if mapping_file else reason
        rows.setdefault((folded, _fold(short_reason, per_tensor, layer)[1]), []).append(layer)
    for (name, reason), layers in rows.items():
        table.add_row(name, *([] if per_tensor else [_layer_ranges(layers)]), reason)
    return table


@dataclass
class _FoldedRow:
    """The layers one folded row covers, and their bytes together."""

    layers: list[int | None] = field(default_factory=list)
    nbytes: int = 0


def _fold(name: str, per_tensor: bool, layer: int | None = None) -> tuple[int | None, str]:
    """`model.layers.7.mlp.fc1.weight` → (7, `model.layers.{i}.mlp.fc1.weight`); unchanged when not folding.

    With `layer` given, only that index is folded (a source of layer 7 that reads layer 7), so cross-layer
    sources stay visible.
    """
    if per_tensor:
        return None, name

    def replace(match: re.Match[str]) -> str:
        index = int(match.group(1))
        return ".layers.{i}." if layer is None or index == layer else match.group(0)

    match = _LAYER_INDEX.search(name)
    found = int(match.group(1)) if match and layer is None else layer
    return found, _LAYER_INDEX.sub(replace, name)


def _layer_ranges(layers: list[int | None]) -> str:
    """[0, 1, 2, 5, 7, 8] → '0–2, 5, 7–8'; '' for tensors outside the layers."""
    indices = sorted({layer for layer in layers if layer is not None})
    if not indices:
        return ""
    spans: list[list[int]] = []
    for index in indices:
        if spans and index == spans[-1][1] + 1:
            spans[-1][1] = index
        else:
            spans.append([index, index])
    return ", ".join(str(start) if start == stop else f"{start}–{stop}" for start, stop in spans)


def verify_table(report: VerifyReport) -> Table:
    """One row per check: name, measured value, bound, pass/fail/skip."""
    verdict = "[green]passed[/]" if report.passed else "[bold red]FAILED[/]"
    table = Table(title=f"xatl verify {report.output}: {verdict}")
    table.add_column("check")
    table.add_column("value")
    table.add_column("bound")
    table.add_column("result")
    for check in report.checks:
        table.add_row(check.name, check.value, check.bound, _STATUS_STYLE[check.status])
    return table


def inventory_tree(reference: str, inventory: Inventory, applicable: dict[str, str]) -> Tree:
    """Tensors outside the layers, per-layer `{i}` patterns with shapes and dtypes, and the mappings that apply."""
    tree = Tree(
        f"[bold]{reference}[/] model_type {inventory.model_type!r}, {inventory.num_layers} layers, "
        f"{inventory.total_bytes:,} bytes"
    )
    outside = tree.add("tensors outside the layers")
    for info in inventory.outside:
        outside.add(f"{info.name}  {list(info.shape)} {str(info.dtype).removeprefix('torch.')}")
    layers = tree.add(f"per layer ({{i}} = 0..{inventory.num_layers - 1})")
    for pattern in inventory.per_layer:
        shape = list(pattern.shapes[0]) if pattern.uniform else "shapes differ by layer"
        missing = (
            "" if len(pattern.layers) == inventory.num_layers else f"  [yellow]only layers {list(pattern.layers)}[/]"
        )
        layers.add(f"{pattern.pattern}  {shape} {pattern.dtype}{missing}")
    mappings = tree.add("built-in mappings")
    if not applicable:
        mappings.add("[yellow]none for this model_type[/]; start one with: xatl mappings new --source SRC")
    for name, verdict in applicable.items():
        mappings.add(f"{name}: {verdict}")
    return tree


def eval_table(result: Evaluation) -> Table:
    """One row per model scored: held-out loss, perplexity, tokens."""
    scope = "held-out split" if result.split == "held_out" else "all of it"
    table = Table(title=f"xatl eval {result.model} on {result.data} ({scope})")
    for column in ("model", "loss", "perplexity", "tokens"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, scored in result.losses.items():
        table.add_row(name, f"{scored.loss:.3f}", f"{scored.perplexity:,.1f}", f"{scored.tokens:,}")
    return table


def eval_gap_line(result: Evaluation) -> str | None:
    """The gap recovered, when the manifest says where the student started; why not, when it does not."""
    if result.gap is not None:
        return f"gap recovered: {result.gap:.0%} (from {result.start:.3f} at the start towards the teacher)"
    if "teacher" in result.losses:
        return f"gap recovered: n/a ({result.no_start})"
    return None
