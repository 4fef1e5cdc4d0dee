"""Rich tables for the terminal: the transfer plan and the verify report."""

from __future__ import annotations

from rich.table import Table
from rich.tree import Tree

from xatl_convert.plan import ConversionPlan
from xatl_convert.sources.inventory import Inventory
from xatl_convert.verify.report import VerifyReport

_STATUS_STYLE = {"pass": "[green]pass[/]", "fail": "[bold red]FAIL[/]", "skip": "[dim]skip[/]"}


def plan_table(plan: ConversionPlan) -> Table:
    """One row per target tensor: sources, transform, shape, dtype, bytes, transferred or initialised."""
    table = Table(title=f"{plan.source.reference} → xatl ({plan.mapping.name})", show_footer=True)
    transferred, initialised = plan.by_status("transferred"), plan.by_status("initialised")
    table.add_column("target tensor", footer=f"{len(plan.tensors)} tensors", overflow="fold")
    table.add_column("source tensors", overflow="fold")
    table.add_column("transform / init")
    table.add_column("shape")
    table.add_column("dtype")
    table.add_column("bytes", justify="right", footer=f"{plan.total_bytes():,}")
    table.add_column(
        "status",
        footer=f"{len(transferred)} transferred ({plan.total_bytes('transferred'):,} B), "
        f"{len(initialised)} initialised ({plan.total_bytes('initialised'):,} B)",
    )
    for tensor in plan.tensors:
        how = tensor.transform.describe() if tensor.transform else f"init: {tensor.strategy}"
        sources = list(tensor.sources)
        for part in tensor.parts:
            how += f"\n{part.part} ← {part.transform.describe()}"
            sources += [f"{name} → {part.part}" for name in part.sources]
        status = "[green]transferred[/]" if tensor.status == "transferred" else "[yellow]initialised[/]"
        table.add_row(
            tensor.name,
            "\n".join(sources),
            how,
            "×".join(map(str, tensor.shape)),
            str(tensor.dtype).removeprefix("torch."),
            f"{tensor.nbytes:,}",
            status,
        )
    return table


def dropped_table(plan: ConversionPlan) -> Table:
    """Source tensors left out of the output, with the reason for each."""
    table = Table(title=f"{len(plan.dropped)} source tensors dropped")
    table.add_column("source tensor")
    table.add_column("reason")
    for name, reason in plan.dropped.items():
        table.add_row(name, reason)
    return table


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
