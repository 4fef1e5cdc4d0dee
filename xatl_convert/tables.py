"""Rich tables for the terminal: the transfer plan, the verify report, eval's losses and the layer ranking."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from xatl_convert.plan import ConversionPlan
from xatl_convert.sources.inventory import Inventory
from xatl_convert.verify.report import VerifyReport

if TYPE_CHECKING:
    from xatl_convert.layer_selection import LayerSelection
    from xatl_convert.training.evaluate import Evaluation

_STATUS_STYLE = {"pass": "[green]pass[/]", "fail": "[bold red]FAIL[/]", "skip": "[dim]skip[/]"}


_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


class NameCell:
    """A tensor name (or several, one per line) that wraps only after a `.` or a space, never inside a word:
    `model.layers.{i}.` / `post_attention_layernorm.weight`. A single piece wider than the column is folded."""

    def __init__(self, text: str, style: str = "") -> None:
        self.lines = text.split("\n")
        self.style = style

    @staticmethod
    def _pieces(line: str) -> list[str]:
        return [piece for piece in re.split(r"(?<=[.\s])", line) if piece]

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        pieces = [piece.rstrip() for line in self.lines for piece in self._pieces(line)]
        shortest = max((cell_len(piece) for piece in pieces), default=0)
        longest = max((cell_len(line) for line in self.lines), default=0)
        return Measurement(shortest, longest).with_maximum(options.max_width)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = max(options.max_width, 1)
        for line in self.lines:
            current = ""
            for piece in self._pieces(line):
                if current and cell_len(current + piece.rstrip()) > width:
                    yield from self._fold(current.rstrip(), width)
                    current = ""
                current += piece
            yield from self._fold(current.rstrip(), width)

    def _fold(self, text: str, width: int) -> RenderResult:
        for start in range(0, max(len(text), 1), width):
            yield Text(text[start : start + width], style=self.style, end="\n")


class FittedTable:
    """A table whose wrapping columns each get at least their widest unbreakable piece (a tensor name's longest
    segment) whenever the console is wide enough for that: rich alone narrows the widest columns first, and so
    breaks names mid-word on a 100-column terminal while a narrower column still has room to give."""

    def __init__(self, table: Table) -> None:
        self.table = table

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement.get(console, options, self.table)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        table, columns = self.table, self.table.columns
        for column in columns:
            column.width = None
        ranges = []
        for column in columns:
            cells = [column.header, *column.cells]
            measured = [Measurement.get(console, options, cell) for cell in cells]
            ranges.append((max(m.minimum for m in measured), max(m.maximum for m in measured)))
        chrome = len(columns) + 1 + sum(table.padding[1] + table.padding[3] for _ in columns)  # borders, padding
        available = options.max_width - chrome
        fixed = sum(ranges[index][1] for index, column in enumerate(columns) if column.no_wrap)
        wrapping = [index for index, column in enumerate(columns) if not column.no_wrap]
        lows = sum(ranges[index][0] for index in wrapping)
        highs = sum(ranges[index][1] for index in wrapping)
        if fixed + highs > available >= fixed + lows:  # narrow, but every piece fits: widen the narrowest first
            widths = {index: ranges[index][0] for index in wrapping}
            for _ in range(available - fixed - lows):
                growing = [index for index in wrapping if widths[index] < ranges[index][1]]
                widths[min(growing, key=lambda index: widths[index])] += 1
            for index, width in widths.items():
                columns[index].width = width
        yield table


def plan_table(plan: ConversionPlan, per_tensor: bool = False) -> FittedTable:
    """The transfer plan: one row per `{i}` pattern (the layers it covers named), or one per tensor. Tensor names
    wrap only after a `.`; the transform is green for a transfer and yellow for an initialisation. One dtype for all
    is said once, in the caption, leaving its column's width to the names."""
    transferred, initialised = plan.by_status("transferred"), plan.by_status("initialised")
    dtypes = {str(tensor.dtype).removeprefix("torch.") for tensor in plan.tensors}
    one_dtype = f" in {next(iter(dtypes))}" if len(dtypes) == 1 else ""
    table = Table(
        title=f"{plan.source.reference} → xatl ({plan.mapping.name})",
        caption=f"{len(plan.tensors)} tensors{one_dtype}, {plan.total_bytes():,} bytes: {len(transferred)} "
        f"transferred ({plan.total_bytes('transferred'):,} B), {len(initialised)} initialised "
        f"({plan.total_bytes('initialised'):,} B)",
    )
    table.add_column("target tensor")
    if not per_tensor:
        table.add_column("layers", no_wrap=True)
    table.add_column("source tensors")
    table.add_column("transform / init")
    table.add_column("shape", no_wrap=True)
    if not one_dtype:
        table.add_column("dtype", no_wrap=True)
    table.add_column("bytes", justify="right", no_wrap=True)
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
        style = "green" if status == "transferred" else "yellow"
        layers = [] if per_tensor else [_layer_ranges(row.layers)]
        dtype_cell = [] if one_dtype else [dtype]
        cells = (
            NameCell(name),
            *layers,
            NameCell(sources),
            NameCell(how, style),
            shape,
            *dtype_cell,
            f"{row.nbytes:,}",
        )
        table.add_row(*cells)
    return FittedTable(table)


def dropped_table(plan: ConversionPlan, per_tensor: bool = False) -> FittedTable:
    """Source tensors left out of the output, with the reason for each (folded per `{i}` pattern)."""
    table = Table(title=f"{len(plan.dropped)} source tensors dropped")
    table.add_column("source tensor")
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
        table.add_row(NameCell(name), *([] if per_tensor else [_layer_ranges(layers)]), reason)
    return FittedTable(table)


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


def layer_summary(layer_types: list[str]) -> str:
    """`28 mamba2, 2 attention (1, 14)`: the count of each layer kind, most common first, and where the others are."""
    positions: dict[str, list[int | None]] = {}
    for index, kind in enumerate(layer_types):
        positions.setdefault(kind, []).append(index)
    kinds = sorted(positions, key=lambda kind: -len(positions[kind]))  # stable: ties keep the order of first use
    return ", ".join(
        f"{len(positions[kind])} {kind}" + (f" ({_layer_ranges(positions[kind])})" if rank else "")
        for rank, kind in enumerate(kinds)
    )


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
    """One row per model scored, named by its folder (the teacher as the user named it): loss, perplexity, tokens."""
    scope = "held-out split" if result.split == "held_out" else "all of it"
    table = Table(title=f"xatl eval {result.model} on {result.data} ({scope})")
    for column in ("model", "loss", "perplexity", "tokens"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for role, scored in result.losses.items():
        table.add_row(
            _eval_label(result, role), f"{scored.loss:.3f}", f"{scored.perplexity:,.1f}", f"{scored.tokens:,}"
        )
    return table


def _eval_label(result: Evaluation, role: str) -> str:
    """`smol-distilled` for the model, `HuggingFaceTB/SmolLM2-135M (teacher)` for its teacher: a local folder by its
    name, a Hub id or alias as given."""
    reference = result.model if role == "model" else (result.teacher or role)
    path = Path(reference)
    name = (path.resolve().name or str(path)) if path.exists() else reference
    return name if role == "model" else f"{name} ({role})"


def eval_gap_line(result: Evaluation) -> str | None:
    """The gap recovered, when the manifest says where the student started (with what a number beyond 0–100% means);
    why not, when it does not."""
    from xatl_convert.training.evaluate import gap_meaning

    if result.gap is not None:
        now, teacher = result.losses["model"].loss, result.losses["teacher"].loss
        return (
            f"gap recovered: {result.gap:.0%} = (start − now) / (start − teacher) = ({result.start:.3f} − {now:.3f}) / "
            f"({result.start:.3f} − {teacher:.3f}){gap_meaning(result.gap)}"
        )
    if "teacher" in result.losses:
        return f"gap recovered: n/a ({result.no_start})"
    return None


def layer_selection_table(selection: LayerSelection) -> Table:
    """Every layer, best first: the KL to the teacher with it alone restored to attention, how far that is below the
    all-LCI student's (the score), and which layers the greedy picks keep."""
    budget = selection.budget
    table = Table(
        title=f"layers ranked for auto:{selection.keep} ({selection.method})",
        caption=f"KL to the teacher with every layer LCI: {selection.baseline_kl:.4f}; {budget.tokens:,} tokens read "
        f"({budget.align_tokens:,} to align, {budget.score_tokens:,} to score)",
    )
    for column in ("rank", "layer", "KL restored", "score", "kept"):
        table.add_column(column, justify="left" if column == "kept" else "right")
    order = {pick.layer: position for position, pick in enumerate(selection.picks, 1)}
    for rank, entry in enumerate(selection.ranking(), 1):
        kept = f"[green]pick {order[entry.layer]}[/]" if entry.layer in order else ""
        table.add_row(str(rank), str(entry.layer), f"{entry.kl:.4f}", f"{entry.score:+.4f}", kept)
    return table


def layer_selection_line(selection: LayerSelection) -> str:
    """`keep 3, 17: greedy 17 (KL 1.234), then 3 (KL 0.987); 16,384 of 16,384 tokens, 12.3 s`."""
    picks = ", then ".join(f"{pick.layer} (KL {pick.kl:.4f})" for pick in selection.picks)
    budget = selection.budget
    return (
        f"keep {', '.join(map(str, selection.chosen))}: greedy {picks}; {budget.tokens:,} of {budget.select_tokens:,} "
        f"tokens, {selection.seconds:.1f} s"
    )
