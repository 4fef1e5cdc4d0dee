"""The `xatl` command line: each command parses its options, calls one library function and prints."""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table

from xatl_convert.conversion import (
    TARGETS,
    applicable_mappings,
    convert,
    init_overrides,
    parse_overrides,
    plan_conversion,
)
from xatl_convert.errors import XatlError
from xatl_convert.mapping import Mapping, builtin_mappings, load_mapping
from xatl_convert.mapping.layers import PRESETS
from xatl_convert.mapping.scaffold import scaffold_mapping
from xatl_convert.plan import build_plan
from xatl_convert.sources import resolve_source
from xatl_convert.sources.aliases import ALIASES
from xatl_convert.sources.inventory import build_inventory
from xatl_convert.tables import dropped_table, inventory_tree, plan_table, verify_table
from xatl_convert.verify import verify as run_verify
from xatl_convert.writer import DEFAULT_MAX_SHARD_BYTES

app = typer.Typer(
    help="Convert pretrained Transformer checkpoints into linear-cost-inference models (Mamba, hybrids) by "
    "cross-architecture transfer, and verify the result.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
mappings_app = typer.Typer(help="List, show and validate mapping files.", no_args_is_help=True)
app.add_typer(mappings_app, name="mappings")

PIPED_WIDTH = 200  # tables written to a file or CI log are not squeezed to 80 columns


def _console(stderr: bool = False) -> Console:
    """A console bound to the current stdout/stderr (created per command, so tests can capture it)."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else int(os.environ.get("COLUMNS", PIPED_WIDTH))
    return Console(stderr=stderr, width=width)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)I?B?\s*$", re.IGNORECASE)
_PRESET_HELP = "; ".join(f"{name}: {text}" for name, text in PRESETS.items())


def parse_size(text: str) -> int:
    """Bytes from '2G', '500M', '1048576' (K/M/G/T are powers of 1024)."""
    match = _SIZE.match(text)
    if not match:
        raise typer.BadParameter(f"{text!r}: expected bytes with an optional K/M/G/T suffix, e.g. 2G")
    number, unit = float(match.group(1)), match.group(2).upper()
    return int(number * 1024 ** "_KMGT".index(unit or "_"))


def _command_line(context: typer.Context) -> str:
    """The command as the user typed it, rebuilt from the options given on the command line (for provenance)."""
    words = ["xatl", *context.command_path.split()[1:]]
    for parameter in context.command.params:
        name = parameter.name or ""
        source = context.get_parameter_source(name)
        if source is None or source.name != "COMMANDLINE":  # typer vendors click: compare by name
            continue
        value = context.params.get(name)
        if parameter.param_type_name == "argument":
            words.append(str(value))
        elif getattr(parameter, "is_flag", False):
            words.append(parameter.opts[0] if value else parameter.secondary_opts[0])
        else:
            for item in value if isinstance(value, list | tuple) else [value]:
                words += [parameter.opts[0], str(item)]
    return shlex.join(words)


def _print_warnings(warnings: list[str]) -> None:
    for warning in warnings:
        _console(stderr=True).print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)


def _fail(error: XatlError) -> typer.Exit:
    _console(stderr=True).print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
    return typer.Exit(error.exit_code)


@app.command("convert")
def convert_command(
    context: typer.Context,
    source: Annotated[
        str,
        typer.Argument(
            help="Source checkpoint: a local folder, a Hub id (org/name, org/name@revision) or an alias "
            "(see `xatl sources`)."
        ),
    ],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (written atomically).")] = None,
    to: Annotated[str, typer.Option(help=f"Target LCI mixer: {', '.join(TARGETS)}.")] = "mamba",
    revision: Annotated[
        str | None, typer.Option(help="Hub revision: branch, tag or commit (same as SRC@revision).")
    ] = None,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Hugging Face cache folder (default: HF_HUB_CACHE, or HF_HOME/hub).")
    ] = None,
    mapping: Annotated[
        str | None, typer.Option(help="Mapping file or built-in mapping name (default: chosen by model_type).")
    ] = None,
    attn_layers: Annotated[
        str | None,
        typer.Option(help=f"Layers kept as attention: indices like 1,11 or a preset ({_PRESET_HELP})."),
    ] = None,
    set_values: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a target config value, e.g. mamba.d_state=32 (repeatable)."),
    ] = None,
    init: Annotated[
        str,
        typer.Option(
            help="How new mixers start: default, or attention (Mamba2: V → x, K → B, Q → C, as in "
            "'The Mamba in the Llama')."
        ),
    ] = "default",
    dtype: Annotated[
        str | None, typer.Option(help="Output dtype: float32, bfloat16 or float16 (default: the source's).")
    ] = None,
    max_shard_size: Annotated[
        str, typer.Option(help="Largest output shard, in bytes with an optional K/M/G suffix.")
    ] = "2G",
    seed: Annotated[int, typer.Option(help="Seed of the new mixers' initialisation (per tensor name).")] = 0,
    force: Annotated[bool, typer.Option(help="Replace OUT if it exists (only once the new one is complete).")] = False,
    dry_run: Annotated[bool, typer.Option(help="Print the transfer plan and write nothing.")] = False,
) -> None:
    """Convert a Transformer checkpoint into an xatl model (Mamba, Mamba2, or a hybrid with attention)."""
    if dtype is not None and dtype not in DTYPES:
        raise typer.BadParameter(f"{dtype!r}: expected one of {', '.join(DTYPES)}", param_hint="--dtype")
    if out is None and not dry_run:
        raise typer.BadParameter("give --out FOLDER (or --dry-run)", param_hint="--out")
    shard_bytes = parse_size(max_shard_size) if max_shard_size else DEFAULT_MAX_SHARD_BYTES
    torch_dtype = DTYPES[dtype] if dtype else None
    try:
        overrides = {**parse_overrides(set_values or []), **init_overrides(init)}
        if dry_run:
            plan = plan_conversion(source, to, revision, cache_dir, mapping, attn_layers, overrides, torch_dtype, seed)
            plan.source.close()
            _console().print(plan_table(plan))
            _console().print(dropped_table(plan))
            _print_warnings(plan.warnings)
            return
        plan = convert(
            source,
            out,  # type: ignore[arg-type]
            to=to,
            revision=revision,
            cache_dir=cache_dir,
            mapping=mapping,
            attn_layers=attn_layers,
            overrides=overrides,
            dtype=torch_dtype,
            seed=seed,
            force=force,
            max_shard_bytes=shard_bytes,
            command_line=_command_line(context),
            show_progress=sys.stdout.isatty(),
        )
    except XatlError as error:
        raise _fail(error) from None
    _print_warnings(plan.warnings)
    transferred, initialised = plan.by_status("transferred"), plan.by_status("initialised")
    _console().print(
        f"[green]wrote[/] {out}: {len(transferred)} tensors transferred ({plan.total_bytes('transferred'):,} bytes), "
        f"{len(initialised)} initialised ({plan.total_bytes('initialised'):,} bytes), "
        f"{len(plan.dropped)} source tensors dropped; layers: {', '.join(plan.layer_types)}",
        soft_wrap=True,
    )


@app.command("verify")
def verify_command(
    output: Annotated[Path, typer.Argument(help="A folder written by xatl convert.")],
    source: Annotated[
        str | None, typer.Option(help="Source checkpoint (default: the path recorded in the manifest).")
    ] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the report as JSON here.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the from-scratch comparison model.")] = 0,
    device: Annotated[
        str, typer.Option(help="auto, cpu or cuda. On CUDA with mamba-ssm, kernels are checked against the reference.")
    ] = "auto",
) -> None:
    """Check a converted model: tensors, exact transfers, forward pass, losses, decoding. Exit 1 if a check fails."""
    if not (output / "xatl_manifest.json").is_file():
        raise _fail(XatlError(f"{output}: no xatl_manifest.json; is this a folder written by xatl convert?"))
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one table is the output; no per-model loading bars
    try:
        report = run_verify(output, source, seed, device)
    except XatlError as error:
        raise _fail(error) from None
    _console().print(verify_table(report))
    if json_path is not None:
        report.write_json(json_path)
    raise typer.Exit(0 if report.passed else 1)


@app.command("inspect")
def inspect_command(
    source: Annotated[str, typer.Argument(help="Local folder, Hub id (org/name[@revision]) or alias.")],
    revision: Annotated[str | None, typer.Option(help="Hub revision: branch, tag or commit.")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Hugging Face cache folder.")] = None,
) -> None:
    """Print the tensor inventory as a tree (per layer: shapes and dtypes) and which built-in mappings apply."""
    try:
        with resolve_source(source, revision, cache_dir) as checkpoint:
            inventory = build_inventory(checkpoint)
            applicable = applicable_mappings(checkpoint)
    except XatlError as error:
        raise _fail(error) from None
    _console().print(inventory_tree(source, inventory, applicable))


@app.command("sources")
def sources_command() -> None:
    """List the source aliases (e.g. pythia-410m → EleutherAI/pythia-410m)."""
    table = Table(title="source aliases (any Hub id org/name[@revision] or local folder works too)")
    table.add_column("alias")
    table.add_column("Hub id")
    for alias, repo_id in ALIASES.items():
        table.add_row(alias, repo_id)
    _console().print(table)


@mappings_app.command("list")
def mappings_list() -> None:
    """List the built-in mappings."""
    for name, path in builtin_mappings().items():
        mapping = load_mapping(path)
        kinds = ", ".join(mapping.source.model_types)
        _console().print(f"[bold]{name}[/]  {kinds} → {mapping.target.mixer}  [dim]{mapping.description}[/]")


@mappings_app.command("show")
def mappings_show(name: Annotated[str, typer.Argument(help="Built-in mapping name or a mapping file.")]) -> None:
    """Print a mapping's YAML."""
    try:
        mapping = load_mapping(name)
    except XatlError as error:
        raise _fail(error) from None
    _console().print(Syntax(mapping.text, "yaml", background_color="default"))


@mappings_app.command("new")
def mappings_new(
    source: Annotated[str, typer.Option(help="Checkpoint to scaffold from (folder, Hub id or alias).")],
    to: Annotated[str, typer.Option(help=f"Target LCI mixer: {', '.join(TARGETS)}.")] = "mamba",
    out: Annotated[Path | None, typer.Option(help="Write the YAML here instead of to stdout.")] = None,
) -> None:
    """Scaffold a mapping from a source's tensor inventory: {i} rules, recognised names filled in, TODOs marked."""
    try:
        with resolve_source(source) as checkpoint:
            text = scaffold_mapping(checkpoint, to)
    except XatlError as error:
        raise _fail(error) from None
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text)
        _console(stderr=True).print(
            f"wrote {out}; fill in the TODOs, then: xatl mappings validate {out} --source {source}"
        )


@mappings_app.command("schema")
def mappings_schema() -> None:
    """Print the JSON Schema of the mapping format (for editor completion and validation)."""
    sys.stdout.write(json.dumps(Mapping.model_json_schema(), indent=2) + "\n")


@mappings_app.command("validate")
def mappings_validate(
    file: Annotated[str, typer.Argument(help="Mapping file (or built-in name) to check.")],
    source: Annotated[
        str | None, typer.Option(help="Also check full coverage and every shape against this checkpoint.")
    ] = None,
    attn_layers: Annotated[str | None, typer.Option(help="Attention layers, as for convert.")] = None,
) -> None:
    """Check a mapping's schema, and with --source its coverage and shapes. Writes nothing."""
    try:
        mapping = load_mapping(file)
        if source is None:
            _console().print(f"[green]ok[/] {file}: schema valid ({len(mapping.rules)} rules)")
            return
        with resolve_source(source) as checkpoint:
            plan = build_plan(checkpoint, mapping, attn_layers)
    except XatlError as error:
        raise _fail(error) from None
    _console().print(
        f"[green]ok[/] {file} covers {source}: {len(plan.by_status('transferred'))} transferred, "
        f"{len(plan.by_status('initialised'))} initialised, {len(plan.dropped)} dropped"
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
