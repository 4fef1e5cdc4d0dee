"""Rich tables for the terminal: the transfer plan and the verify report."""

from __future__ import annotations

from rich.table import Table

from xatl_convert.plan import ConversionPlan
from xatl_convert.verify.report import VerifyReport

_STATUS_STYLE = {"pass": "[green]pass[/]", "fail": "[bold red]FAIL[/]", "skip": "[dim]skip[/]"}


def plan_table(plan: ConversionPlan) -> Table:
    """One row per target tensor: sources, transform, shape, dtype, bytes, transferred or initialised."""
    table = Table(title=f"{plan.source.reference} → xatl ({plan.mapping.name})", show_footer=True)
    transferred, initialised = plan.by_status("transferred"), plan.by_status("initialised")
    table.add_column("target tensor", footer=f"{len(plan.tensors)} tensors")
    table.add_column("source tensors")
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
        status = "[green]transferred[/]" if tensor.status == "transferred" else "[yellow]initialised[/]"
        table.add_row(
            tensor.name,
            "\n".join(tensor.sources),
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
