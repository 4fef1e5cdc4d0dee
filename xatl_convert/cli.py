"""The `xatl` command line: each command parses its options, calls one library function and prints.

Every failure of every command ends as one line `error: …` on stderr (exit 2 for input the user can fix, 1 for a
failed check, 130/143 for SIGINT/SIGTERM); the error handling lives in one place, `OneLineErrorGroup`. Torch and
transformers are imported inside the commands that need them, so `--help`, `sources` and `mappings` start fast.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shlex
import sys
import typing
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer.core import TyperCommand, TyperGroup

try:  # typer vendors click since 0.2x; older releases use click itself
    from typer import _click as click
except ImportError:  # pragma: no cover
    import click

from xatl_convert.errors import XatlError, first_line
from xatl_convert.export_formats import export_formats_help
from xatl_convert.interrupts import Interrupted, sigterm_as_interrupt
from xatl_convert.mapping.layers import AUTO_HELP, LCI_MIXERS, PRESETS, mixer_named, mixer_spelling
from xatl_convert.write_guard import CommandPaths, Reads, Writes, write_new_file, write_report_file

PIPED_WIDTH = 200  # tables written to a file or CI log are not squeezed to 80 columns
TRACEBACK_VARIABLE = "XATL_TRACEBACK"  # set to 1 to see the traceback of an unexpected error


def _console(stderr: bool = False) -> Console:
    """A console bound to the current stdout/stderr (created per command, so tests can capture it)."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream is not None and stream.isatty() else _piped_width()
    return Console(stderr=stderr, width=width)


def _piped_width() -> int:
    """COLUMNS when it is a usable width, else PIPED_WIDTH: an empty, zero or malformed COLUMNS must neither hide the
    output (rich prints nothing at width 0) nor turn an error line into a traceback."""
    text = os.environ.get("COLUMNS", "").strip()
    return int(text) if text.isdigit() and int(text) > 0 else PIPED_WIDTH


def print_error(message: str) -> None:
    """One `error: …` line on stderr; newlines in the message are folded so that it stays one line."""
    line = " ".join(str(message).split())
    _console(stderr=True).print(Text.assemble(("error:", "bold red"), " ", line), soft_wrap=True, highlight=False)


class OneLineErrorGroup(TyperGroup):
    """Turns every failure into one `error: …` line: usage errors, typed errors, OS errors, interrupts and bugs."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            with sigterm_as_interrupt():
                code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as error:
            error.show()  # `xatl` alone prints the help
            code = 0
        except click.ClickException as error:
            print_error(_usage_message(error))
            code = error.exit_code
        except typer.Abort:
            print_error("interrupted; nothing was written")
            code = 130
        code = code if isinstance(code, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code

    def invoke(self, ctx: click.Context) -> Any:
        try:
            _check_hub_kernels_setting()
            return super().invoke(ctx)
        except (click.ClickException, typer.Exit, typer.Abort):
            raise
        except XatlError as error:
            print_error(str(error))
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt as interrupt:
            name = interrupt.signal_name if isinstance(interrupt, Interrupted) else "SIGINT"
            print_error(f"interrupted ({name}); nothing was written")
            raise typer.Exit(getattr(interrupt, "exit_code", 130)) from None
        except OSError as error:  # one the library did not name more precisely
            where = f"{error.filename}: " if error.filename else ""
            print_error(f"{where}{error.strerror or error}")
            raise typer.Exit(2) from None
        except MemoryError:
            print_error("out of memory; try a smaller model, a smaller --set value, or a machine with more memory")
            raise typer.Exit(1) from None
        except Exception as error:
            if os.environ.get(TRACEBACK_VARIABLE):
                raise
            print_error(
                f"internal error: {type(error).__name__}: {first_line(error)} (a bug in xatl; please report it, "
                f"with the traceback that {TRACEBACK_VARIABLE}=1 shows)"
            )
            raise typer.Exit(1) from None


def _check_hub_kernels_setting() -> None:
    """A malformed XATL_HUB_KERNELS is the user's error, named before any model runs (the models read it per call)."""
    if os.environ.get("XATL_HUB_KERNELS", "").strip():
        from xatl_convert.models.kernels_xatl import hub_kernels_setting

        try:
            hub_kernels_setting()
        except ValueError as error:
            raise XatlError(str(error)) from None


def _usage_message(error: click.ClickException) -> str:
    """`xatl convert: No such option: --bogus (see xatl convert --help)`."""
    context = getattr(error, "ctx", None)
    if context is None:
        return error.format_message()
    return f"{context.command_path}: {error.format_message()} (see {context.command_path} --help)"


class XatlCommand(TyperCommand):
    """Every xatl command: its paths go through the write guard before any work, and its usage line is plain.

    The guard reads the roles that the command's parameters declare (`Reads`, `Writes` in their Annotated types),
    so a command added later is guarded by declaring them; tests/test_write_guard.py fails for a path option
    without a role, and for a command of another class.
    """

    def invoke(self, ctx: click.Context) -> Any:
        guard_paths(self, ctx.params)
        return super().invoke(ctx)

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        """`Usage: xatl convert [OPTIONS] SRC`, without the braces typer puts around required arguments."""
        pieces = super().collect_usage_pieces(ctx)
        return [re.sub(r"^\{([^}]*)\}", r"\1", piece) for piece in pieces]  # {FILE|NAME}... → FILE|NAME...


def path_roles(command: click.Command) -> dict[str, Reads | Writes]:
    """Each parameter's declared role (by parameter name), from the command function's Annotated types."""
    function = inspect.unwrap(command.callback) if command.callback else None
    if function is None:
        return {}
    hints = typing.get_type_hints(function, include_extras=True)
    return {
        name: role
        for name, hint in hints.items()
        for role in getattr(hint, "__metadata__", ())
        if isinstance(role, (Reads, Writes))
    }


def option_name(command: click.Command, name: str) -> str:
    """How the user spells a parameter: `--out` for an option, its metavar (`OUT`) for an argument."""
    parameter = next(p for p in command.params if p.name == name)
    return parameter.opts[0] if parameter.param_type_name == "option" else (parameter.metavar or name.upper())


def guard_paths(command: click.Command, values: dict[str, Any]) -> None:
    """The write guard over a command's declared inputs and outputs, with its --force."""
    paths = CommandPaths()
    cache_dir = values.get("cache_dir")
    for name, role in path_roles(command).items():
        value = values.get(name)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(role, Reads):
                paths.read(item, role.what, role.hub, cache_dir)
            else:
                paths.write(item, option_name(command, name), role.kind)
    paths.check(force=bool(values.get("force", False)))


app = typer.Typer(
    cls=OneLineErrorGroup,
    help="Convert pretrained Transformer checkpoints into linear-cost-inference models (Mamba, hybrids) by "
    "cross-architecture transfer, and verify the result.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    add_completion=False,
)
mappings_app = typer.Typer(
    help="List, show, validate and scaffold mapping files; print their JSON schema.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(mappings_app, name="mappings")


def _print_version(value: bool) -> None:
    if value:
        from xatl_convert import __version__

        _console().print(f"xatl-convert {__version__}", highlight=False)
        raise typer.Exit(0)


@app.callback()
def main_options(
    version: Annotated[
        bool,
        typer.Option("--version", is_eager=True, callback=_print_version, help="Print the version and exit."),
    ] = False,
) -> None:
    """Convert pretrained Transformer checkpoints into linear-cost-inference models (Mamba, hybrids) by
    cross-architecture transfer, and verify the result."""


DTYPE_NAMES = ("float32", "bfloat16", "float16")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)I?B?\s*$", re.IGNORECASE)
_PRESET_HELP = "; ".join(f"{name}: {text}" for name, text in PRESETS.items())
_DATA_HELP = ".txt/.jsonl/.parquet files, a folder, a Hub id"
_SELECT_TOKENS_HELP = (
    "tokens of --data the measurement reads (default 16384): 1/8 scores the restored layers, the rest aligns the new "
    "mixers first"
)
_GGUF_TYPE_HELP = (
    "With --format gguf: the matrices' type, f32, f16, bf16 or q8_0 (default auto: bf16 for a bfloat16 model, else "
    "f16); norms, biases and the Mamba2 A, D, dt and conv stay f32."
)


# Options that several commands declare alike (convert, select-layers, mappings new).
MixerOption = Annotated[
    str,
    typer.Option(
        metavar="MIXER",
        help=f"Target LCI mixer: {', '.join(mixer_spelling(m) for m in LCI_MIXERS)}.",
        callback=lambda value: mixer_named(value) if isinstance(value, str) else value,
    ),
]
RevisionOption = Annotated[
    str | None, typer.Option(metavar="REV", help="Hub revision: branch, tag or commit (same as SRC@REV).")
]
CacheDirOption = Annotated[
    Path | None,
    typer.Option(metavar="DIR", help="Hugging Face cache folder (default: HF_HUB_CACHE, or HF_HOME/hub)."),
    Reads("the Hugging Face cache (--cache-dir)"),
]


def parse_size(text: str) -> int:
    """Bytes from '2G', '500M', '1048576' (K/M/G/T are powers of 1024)."""
    match = _SIZE.match(text)
    if not match:
        raise typer.BadParameter(f"{text!r}: expected bytes with an optional K/M/G/T suffix, e.g. 2G")
    number, unit = float(match.group(1)), match.group(2).upper()
    size = int(number * 1024 ** "_KMGT".index(unit or "_"))
    if size <= 0:
        raise typer.BadParameter(f"{text!r}: a shard must hold at least one byte")
    return size


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
        line = " ".join(warning.split())
        _console(stderr=True).print(Text.assemble(("warning:", "yellow"), " ", line), soft_wrap=True, highlight=False)


def _quiet_transformers() -> None:
    """One table or one line is the output: no loading bars or advice from transformers among it."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()


@app.command("convert", cls=XatlCommand)
def convert_command(
    context: typer.Context,
    source: Annotated[
        str,
        typer.Argument(
            metavar="SRC",
            help="Source checkpoint: a local folder, a Hub id (org/name, org/name@revision) or an alias "
            "(see `xatl sources`).",
            show_default=False,
        ),
        Reads("the source checkpoint", hub="model"),
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", metavar="OUT", help="Output folder (written atomically)."),
        Writes("folder"),
    ] = None,
    to: MixerOption = "mamba",
    revision: RevisionOption = None,
    cache_dir: CacheDirOption = None,
    mapping: Annotated[
        str | None,
        typer.Option(
            metavar="FILE|NAME", help="Mapping file or built-in mapping name (default: chosen by model_type)."
        ),
        Reads("the mapping file"),
    ] = None,
    attn_layers: Annotated[
        str | None,
        typer.Option(
            metavar="SPEC",
            help=f"Layers kept as attention: indices like 1,11, a preset ({_PRESET_HELP}), or {AUTO_HELP}.",
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(metavar="DATA", help=f"With --attn-layers auto:K: the text to measure on ({_DATA_HELP})."),
        Reads("the --data text", hub="dataset"),
    ] = None,
    select_tokens: Annotated[
        int | None,
        typer.Option(metavar="N", help=f"With --attn-layers auto:K, the {_SELECT_TOKENS_HELP}."),
    ] = None,
    set_values: Annotated[
        list[str] | None,
        typer.Option(
            "--set", metavar="KEY=VALUE", help="Override a target config value, e.g. mamba.d_state=32 (repeatable)."
        ),
    ] = None,
    init: Annotated[
        str,
        typer.Option(
            metavar="METHOD",
            help="How new mixers start: default, or attention (Mamba2: V → x, K → B, Q → C, as in "
            "'The Mamba in the Llama').",
        ),
    ] = "default",
    dtype: Annotated[
        str | None,
        typer.Option(metavar="DTYPE", help="Output dtype: float32, bfloat16 or float16 (default: the source's)."),
    ] = None,
    max_shard_size: Annotated[
        str, typer.Option(metavar="BYTES", help="Largest output shard, in bytes with an optional K/M/G suffix.")
    ] = "2G",
    seed: Annotated[
        int,
        typer.Option(
            metavar="N", help="Seed of the new mixers' init (per tensor name); with auto:K, of the measured blocks too."
        ),
    ] = 0,
    force: Annotated[
        bool, typer.Option("--force", help="Replace OUT if it exists (only once the new one is complete).")
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the transfer plan and write nothing.")] = False,
    format: Annotated[
        str,
        typer.Option(
            metavar="FORMAT",
            help=f"xatl (default), or a format that loads without xatl's code: {export_formats_help()}.",
        ),
    ] = "xatl",
    show_all: Annotated[
        bool, typer.Option("--all", help="With --dry-run: one row per tensor instead of one per {i} pattern.")
    ] = False,
    gguf_type: Annotated[str | None, typer.Option(metavar="DTYPE", help=_GGUF_TYPE_HELP)] = None,
) -> None:
    """Convert a Transformer checkpoint into an xatl model (Mamba, Mamba2, or a hybrid with attention)."""
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise typer.BadParameter(f"{dtype!r}: expected one of {', '.join(DTYPE_NAMES)}", param_hint="--dtype")
    if out is None and not dry_run:
        raise typer.BadParameter("give --out FOLDER (or --dry-run)", param_hint="--out")
    shard_bytes = parse_size(max_shard_size)
    import torch

    from xatl_convert.conversion import convert, init_overrides, parse_overrides, plan_conversion
    from xatl_convert.tables import layer_summary

    selection_settings = _auto_layer_settings(attn_layers, data, select_tokens, seed)
    _quiet_transformers()
    torch_dtype = getattr(torch, dtype) if dtype else None
    overrides = {**parse_overrides(set_values or []), **init_overrides(init)}
    chosen_layers: Any = attn_layers
    if selection_settings is not None:
        chosen_layers = _select_layers(source, data, selection_settings, to, revision, cache_dir, mapping, overrides,
                                       asked=f"--attn-layers {attn_layers}")  # fmt: skip
    if dry_run:
        from xatl_convert.tables import dropped_table, plan_table

        plan = plan_conversion(source, to, revision, cache_dir, mapping, chosen_layers, overrides, torch_dtype, seed)
        plan.source.close()
        _console().print(plan_table(plan, per_tensor=show_all))
        _console().print(dropped_table(plan, per_tensor=show_all))
        _print_warnings(plan.warnings)
        return
    if format != "xatl":
        from xatl_convert.conversion import convert_to_format

        plan, names = convert_to_format(
            source, out, format, to=to, revision=revision, cache_dir=cache_dir, mapping=mapping,
            attn_layers=chosen_layers, overrides=overrides, dtype=torch_dtype, seed=seed, force=force,
            command_line=_command_line(context), show_progress=sys.stdout.isatty(), gguf_type=gguf_type,
        )  # fmt: skip
        _print_warnings(plan.warnings)
        _print_wrote(out, f"{format}, {len(names)} tensors; layers: {layer_summary(plan.layer_types)}")
        return
    plan = convert(
        source,
        out,  # type: ignore[arg-type]
        to=to,
        revision=revision,
        cache_dir=cache_dir,
        mapping=mapping,
        attn_layers=chosen_layers,
        overrides=overrides,
        dtype=torch_dtype,
        seed=seed,
        force=force,
        max_shard_bytes=shard_bytes,
        command_line=_command_line(context),
        show_progress=sys.stdout.isatty(),
    )
    _print_warnings(plan.warnings)
    transferred, initialised = plan.by_status("transferred"), plan.by_status("initialised")
    _print_wrote(
        out,
        f"{len(transferred)} tensors transferred ({plan.total_bytes('transferred'):,} bytes), "
        f"{len(initialised)} initialised ({plan.total_bytes('initialised'):,} bytes), "
        f"{len(plan.dropped)} source tensors dropped; layers: {layer_summary(plan.layer_types)}",
    )


def _auto_layer_settings(attn_layers: str | None, data: str | None, select_tokens: int | None, seed: int) -> Any:
    """The measurement's settings when `--attn-layers auto:K` asks for one (None otherwise); `--data` and
    `--select-tokens` belong to it alone."""
    from xatl_convert.mapping.layers import AutoSpecError, auto_keep
    from xatl_convert.settings import LayerSelectionSettings

    try:
        keep = auto_keep(attn_layers)
    except AutoSpecError as error:
        raise XatlError(f"--attn-layers {error}") from None
    if keep is None:
        for option, value in (("--data", data), ("--select-tokens", select_tokens)):
            if value is not None:
                raise XatlError(
                    f"{option}: only --attn-layers auto:K measures layers on text; give --attn-layers auto:K, or "
                    f"leave out {option}"
                )
        return None
    if data is None:
        raise XatlError(
            f"--attn-layers auto:{keep} needs --data TEXT: the layers are chosen by measuring the model on your text"
        )
    given = {"select_tokens": select_tokens} if select_tokens is not None else {}
    return LayerSelectionSettings.from_options(keep=keep, seed=seed, **given)


def _select_layers(source: str, data: Any, settings: Any, to: str, revision: str | None, cache_dir: Path | None,
                   mapping: str | None, overrides: dict[str, Any], asked: str | None = None) -> Any:  # fmt: skip
    """Run the layer measurement with progress bars on a terminal, print its ranking, and return the selection."""
    from xatl_convert.layer_selection.select import select_layers
    from xatl_convert.tables import layer_selection_line, layer_selection_table

    with _labelled_bars(sys.stderr.isatty(), transient=True) as progress:
        selection = select_layers(source, data, settings, to, revision, cache_dir, mapping, overrides, progress, asked)
    console = _console()
    console.print(layer_selection_table(selection))
    console.print(layer_selection_line(selection), soft_wrap=True, highlight=False)
    return selection


def _print_wrote(out: Path, what: str) -> None:
    """The one line a command that writes a folder ends with: where, and what it holds."""
    _console().print(f"[green]wrote[/] {out}: {what}", soft_wrap=True, highlight=False)


@app.command("select-layers", cls=XatlCommand)
def select_layers_command(
    source: Annotated[
        str,
        typer.Argument(metavar="SRC", help="Source checkpoint: local folder, Hub id or alias.", show_default=False),
        Reads("the source checkpoint", hub="model"),
    ],
    keep: Annotated[int, typer.Option(metavar="K", help="How many layers to keep as attention.")],
    data: Annotated[
        str,
        typer.Option(metavar="DATA", help=f"Text to measure on ({_DATA_HELP}); its training split only is read."),
        Reads("the --data text", hub="dataset"),
    ],
    to: MixerOption = "mamba",
    select_tokens: Annotated[int | None, typer.Option(metavar="N", help=f"The {_SELECT_TOKENS_HELP}.")] = None,
    revision: RevisionOption = None,
    cache_dir: CacheDirOption = None,
    mapping: Annotated[
        str | None,
        typer.Option(metavar="FILE|NAME", help="Mapping file or built-in mapping name, as for convert."),
        Reads("the mapping file"),
    ] = None,
    set_values: Annotated[
        list[str] | None,
        typer.Option("--set", metavar="KEY=VALUE", help="Target config overrides, as for convert (repeatable)."),
    ] = None,
    init: Annotated[
        str, typer.Option(metavar="METHOD", help="How new mixers start, as for convert: default or attention.")
    ] = "default",
    seed: Annotated[
        int, typer.Option(metavar="N", help="Seed of the new mixers' init and of the order of the blocks.")
    ] = 0,
    json_path: Annotated[
        Path | None, typer.Option("--json", metavar="FILE", help="Write the ranking as JSON here."), Writes("report")
    ] = None,
) -> None:
    """Rank the layers by how much keeping each as attention brings the converted model back to its source, measured
    on your text (what `convert --attn-layers auto:K` keeps). Writes nothing but --json."""
    from xatl_convert.conversion import init_overrides, parse_overrides
    from xatl_convert.settings import LayerSelectionSettings

    given = {"select_tokens": select_tokens} if select_tokens is not None else {}
    settings = LayerSelectionSettings.from_options(keep=keep, seed=seed, **given)
    _quiet_transformers()
    overrides = {**parse_overrides(set_values or []), **init_overrides(init)}
    selection = _select_layers(source, data, settings, to, revision, cache_dir, mapping, overrides)
    if json_path is not None:
        from xatl_convert.write_guard import report_marks

        report = {**report_marks("select-layers"), "source": source, "to": to, **selection.record()}
        write_report_file(json_path, json.dumps(report, indent=2) + "\n", "--json")


@app.command("verify", cls=XatlCommand)
def verify_command(
    output: Annotated[
        Path, typer.Argument(metavar="OUT", help="A folder written by xatl convert."), Reads("the converted folder")
    ],
    source: Annotated[
        str | None,
        typer.Option(metavar="SRC", help="Source checkpoint (default: the path recorded in the manifest)."),
        Reads("the source checkpoint", hub="model"),
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", metavar="FILE", help="Write the report as JSON here."), Writes("report")
    ] = None,
    junit_path: Annotated[
        Path | None,
        typer.Option("--junit", metavar="FILE", help="Write the report as JUnit XML here, for CI test reporters."),
        Writes("report"),
    ] = None,
    seed: Annotated[int, typer.Option(metavar="N", help="Seed of the from-scratch comparison model.")] = 0,
    device: Annotated[
        str,
        typer.Option(
            metavar="DEVICE",
            help="auto, cpu or cuda. On CUDA with mamba-ssm, kernels are checked against the reference.",
        ),
    ] = "auto",
    layers: Annotated[
        int | None,
        typer.Option(metavar="N", help="Check the first N blocks only (quick CI); skips the whole-model checks."),
    ] = None,
    text: Annotated[
        Path | None,
        typer.Option(metavar="FILE", help="Score this UTF-8 text (the output's tokenizer) instead of the sample."),
        Reads("the --text file"),
    ] = None,
    max_tokens: Annotated[
        int | None,
        typer.Option(
            metavar="N", help="Tokens of the text to run (default: 256 for a converted folder, 1024 for an export)."
        ),
    ] = None,
    precision: Annotated[
        str, typer.Option(metavar="P", help="float32, or float64 to tell a logic error from rounding.")
    ] = "float32",
) -> None:
    """Check a converted model block by block, in bounded memory: tensors, exact transfers, forward pass, losses,
    the source twin, decoding. Exit 1 if a check fails."""
    if not (output / "xatl_manifest.json").is_file():
        raise XatlError(f"{output}: no xatl_manifest.json; is this a folder written by xatl convert?")
    import time

    from xatl_convert.tables import verify_table
    from xatl_convert.verify import verify as run_verify

    _quiet_transformers()
    started = time.monotonic()
    with _labelled_bars(sys.stderr.isatty(), transient=True) as progress:
        report = run_verify(output, source, seed, device, layers, text, max_tokens, precision, progress)
    seconds = time.monotonic() - started
    _console().print(verify_table(report))
    if json_path is not None:
        write_report_file(json_path, report.to_json(), "--json")
    if junit_path is not None:
        write_report_file(junit_path, report.to_junit(seconds), "--junit")
    if not report.passed:
        failed = ", ".join(check.name for check in report.checks if check.status == "fail")
        print_error(f"{output}: verify failed: {failed}")
        raise typer.Exit(1)


@contextmanager
def _labelled_bars(show: bool, transient: bool) -> Iterator[Callable[..., None] | None]:
    """On a terminal, one bar per label (a verify pass, a distillation stage) with its latest losses, if any:
    these runs take minutes on real models. None (no display) when stderr is not a terminal."""
    if not show:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description:>18}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[losses]}"), TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=_console(stderr=True), transient=transient) as bars:
        tasks: dict[str, Any] = {}

        def advance(label: str, done: int, total: int, losses: dict[str, float] | None = None) -> None:
            if label not in tasks:
                tasks[label] = bars.add_task(label, total=total, losses="")
            shown = ", ".join(f"{name} {value:.3f}" for name, value in (losses or {}).items())
            bars.update(tasks[label], completed=done, losses=shown)

        yield advance


@app.command("distill", cls=XatlCommand)
def distill_command(
    student: Annotated[
        Path, typer.Argument(metavar="STUDENT", help="A folder written by xatl convert."), Reads("the student folder")
    ],
    teacher: Annotated[
        str,
        typer.Option(metavar="SRC", help="The source model: local folder, Hub id or alias."),
        Reads("the teacher", hub="model"),
    ],
    data: Annotated[
        str,
        typer.Option(metavar="DATA", help="Text: .txt/.jsonl/.parquet files, a folder, a Hub id."),
        Reads("the --data text", hub="dataset"),
    ],
    out: Annotated[
        Path, typer.Option(metavar="OUT", help="Output folder (same layout as a conversion)."), Writes("folder")
    ],
    stage: Annotated[
        str, typer.Option(metavar="STAGE", help="all (align, then kd), align, kd, or ce (the paper: next-token + LIT).")
    ] = "all",
    align_steps: Annotated[int, typer.Option(metavar="N", help="Optimiser steps of stage align.")] = 100,
    kd_steps: Annotated[int, typer.Option(metavar="N", help="Optimiser steps of stage kd (or ce).")] = 100,
    align_tokens: Annotated[
        int | None, typer.Option(metavar="N", help="Tokens of stage align instead of --align-steps (rounded up).")
    ] = None,
    kd_tokens: Annotated[
        int | None, typer.Option(metavar="N", help="Tokens of stage kd (or ce) instead of --kd-steps (rounded up).")
    ] = None,
    batch_size: Annotated[int, typer.Option(metavar="N", help="Blocks per optimiser step, over all processes.")] = 4,
    grad_accum: Annotated[int, typer.Option(metavar="N", help="Micro-batches per optimiser step.")] = 1,
    block_size: Annotated[int, typer.Option(metavar="N", help="Tokens per block.")] = 256,
    align_lr: Annotated[
        float, typer.Option(metavar="LR", help="Peak AdamW learning rate of stage align (cosine decay to a tenth).")
    ] = 1e-2,
    align_w_o: Annotated[
        bool, typer.Option("--align-w-o/--no-align-w-o", help="Align also fits the transferred W_O (out_proj).")
    ] = True,
    kd_lr: Annotated[float, typer.Option(metavar="LR", help="AdamW learning rate of stage kd (or ce).")] = 1e-4,
    unfreeze_lr: Annotated[
        float, typer.Option(metavar="LR", help="Learning rate of the weights LIT unfreezes.")
    ] = 1e-4,
    freeze: Annotated[
        bool, typer.Option("--freeze/--no-freeze", help="Freeze transferred weights until LIT (kd, ce).")
    ] = True,
    temperature: Annotated[float, typer.Option(metavar="T", help="Temperature of the kd loss.")] = 1.0,
    ce_weight: Annotated[float, typer.Option(metavar="W", help="Weight of a next-token loss added in kd.")] = 0.0,
    teacher_cache: Annotated[
        Path | None,
        typer.Option(
            metavar="DIR",
            help="kd reads the teacher's top-k log-probabilities from DIR, built there first if missing, instead of "
            "running the teacher; a DIR built for another teacher, data or top-k is refused.",
        ),
        Writes("teacher-cache"),
    ] = None,
    teacher_top_k: Annotated[
        int, typer.Option(metavar="K", help="Tokens per position kept in --teacher-cache (plus one for the rest).")
    ] = 64,
    align_block_share: Annotated[
        float,
        typer.Option(metavar="S", help="Share of align's last steps that fit whole blocks' outputs (MOHAWK stage 2)."),
    ] = 0.0,
    lit_preset: Annotated[
        str,
        typer.Option(
            metavar="PRESET", help="When LIT unfreezes: paper-1pct, paper-0.5pct (loss plateaus) or after-N (step N)."
        ),
    ] = "paper-1pct",
    mix_data: Annotated[
        str | None,
        typer.Option(metavar="DATA", help="Other text spread through the training blocks (not the held-out split)."),
        Reads("the --mix-data text", hub="dataset"),
    ] = None,
    mix_share: Annotated[float, typer.Option(metavar="S", help="Share of training blocks from --mix-data.")] = 0.25,
    eval_every: Annotated[int, typer.Option(metavar="N", help="Held-out loss every N steps, for the curve.")] = 0,
    save_every: Annotated[int, typer.Option(metavar="N", help="Checkpoint every N steps (beside OUT).")] = 0,
    checkpoints: Annotated[
        Path | None,
        typer.Option(metavar="DIR", help="Checkpoint folder (default: OUT.checkpoints)."),
        Writes("checkpoints"),
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint.")] = False,
    seed: Annotated[int, typer.Option(metavar="N", help="Order of the training blocks.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
) -> None:
    """Train a conversion into a working model: each new mixer learns its attention layer (align), then the whole
    model the teacher's logits (kd, with LIT). Writes OUT, which xatl verify and xatl eval accept."""
    from xatl_convert.settings import DistillSettings

    settings = DistillSettings.from_options(
        align_steps=align_steps, kd_steps=kd_steps, align_tokens=align_tokens, kd_tokens=kd_tokens,
        batch_size=batch_size, grad_accum=grad_accum, block_size=block_size, align_lr=align_lr, align_w_o=align_w_o,
        kd_lr=kd_lr, unfreeze_lr=unfreeze_lr, freeze=freeze, temperature=temperature, ce_weight=ce_weight,
        eval_every=eval_every, save_every=save_every, seed=seed, align_block_share=align_block_share,
        lit_preset=lit_preset, mix_data=mix_data, mix_share=mix_share,
        teacher_cache=None if teacher_cache is None else str(teacher_cache), teacher_top_k=teacher_top_k,
    )  # fmt: skip
    if stage not in ("all", "align", "kd", "ce"):
        raise XatlError(f"--stage {stage!r}: expected all, align, kd or ce")
    _quiet_transformers()
    from xatl_convert.training.distill import distill

    with _labelled_bars(sys.stderr.isatty(), transient=False) as progress:
        record = distill(
            student,
            teacher,
            data,
            out,
            settings,
            stage,
            force,
            progress,
            checkpoints,
            resume,  # type: ignore[arg-type]
        )
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under accelerate launch, the main process says it
    _print_wrote(
        out,
        f"held-out loss {record['start_loss']:.3f} → {record['end_loss']:.3f} (teacher {record['teacher_loss']:.3f}); "
        f"stages: {', '.join(s['stage'] for s in record['stages'])}",
    )


@app.command("eval", cls=XatlCommand)
def eval_command(
    model: Annotated[
        Path,
        typer.Argument(metavar="MODEL", help="A folder written by xatl convert (or trained)."),
        Reads("the model folder"),
    ],
    data: Annotated[
        str,
        typer.Option(metavar="DATA", help="Text: .txt/.jsonl/.parquet files, a folder, a Hub id."),
        Reads("the --data text", hub="dataset"),
    ],
    teacher: Annotated[
        str | None,
        typer.Option(metavar="SRC", help="Also score this model (the source), for the gap."),
        Reads("the teacher", hub="model"),
    ] = None,
    block_size: Annotated[int, typer.Option(metavar="N", help="Tokens per block.")] = 256,
    max_blocks: Annotated[int, typer.Option(metavar="N", help="Held-out blocks to score.")] = 32,
    batch_size: Annotated[int, typer.Option(metavar="N", help="Blocks per forward pass.")] = 4,
    split: Annotated[
        str,
        typer.Option(
            metavar="SPLIT",
            help="held-out (the share of DATA that distill never trains on) or all (every document: for text that "
            "never trained, such as another domain).",
        ),
    ] = "held-out",
    json_path: Annotated[
        Path | None, typer.Option("--json", metavar="FILE", help="Write the results as JSON here."), Writes("report")
    ] = None,
) -> None:
    """Held-out loss and perplexity of MODEL (and the teacher) on DATA's held-out split, which never trains, or on
    all of DATA."""
    from xatl_convert.settings import EvalSettings

    settings = EvalSettings.from_options(block_size=block_size, max_blocks=max_blocks, batch_size=batch_size,
                                         split=split)  # fmt: skip
    _quiet_transformers()
    from xatl_convert.tables import eval_gap_line, eval_table
    from xatl_convert.training.evaluate import evaluate_folder

    result = evaluate_folder(model, data, teacher, settings)
    console = _console()
    console.print(eval_table(result))
    gap = eval_gap_line(result)
    if gap is not None:
        console.print(gap, soft_wrap=True, highlight=False)
    if json_path is not None:
        write_report_file(json_path, result.to_json())


@app.command("export", cls=XatlCommand)
def export_command(
    folder: Annotated[
        Path,
        typer.Argument(metavar="FOLDER", help="A folder written by xatl convert (or trained)."),
        Reads("the folder to export"),
    ],
    format: Annotated[str, typer.Option(metavar="FORMAT", help=f"{export_formats_help()}.")],
    out: Annotated[Path, typer.Option(metavar="OUT", help="Output folder."), Writes("folder")],
    force: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    gguf_type: Annotated[str | None, typer.Option(metavar="DTYPE", help=_GGUF_TYPE_HELP)] = None,
) -> None:
    """Write FOLDER in a format that engines load natively, or say every reason it would compute something else."""
    _quiet_transformers()
    from xatl_convert.export import FORMATS, export_folder

    names = export_folder(folder, out, format, force, gguf_type=gguf_type)
    _print_wrote(out, f"{format}, {len(names)} tensors; loads with {FORMATS[format].LOADS_WITH}")


@app.command("inspect", cls=XatlCommand)
def inspect_command(
    source: Annotated[
        str,
        typer.Argument(metavar="SRC", help="Local folder, Hub id (org/name[@revision]) or alias."),
        Reads("the source checkpoint", hub="model"),
    ],
    revision: Annotated[str | None, typer.Option(metavar="REV", help="Hub revision: branch, tag or commit.")] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(metavar="DIR", help="Hugging Face cache folder."),
        Reads("the Hugging Face cache (--cache-dir)"),
    ] = None,
) -> None:
    """Print the tensor inventory as a tree (per layer: shapes and dtypes) and which built-in mappings apply."""
    from xatl_convert.conversion import applicable_mappings
    from xatl_convert.sources import resolve_source
    from xatl_convert.sources.inventory import build_inventory
    from xatl_convert.tables import inventory_tree

    _quiet_transformers()
    with resolve_source(source, revision, cache_dir) as checkpoint:
        inventory = build_inventory(checkpoint)
        applicable = applicable_mappings(checkpoint)
    _console().print(inventory_tree(source, inventory, applicable))


@app.command("sources", cls=XatlCommand)
def sources_command() -> None:
    """List the source aliases, such as pythia-410m for EleutherAI/pythia-410m."""
    from xatl_convert.sources.aliases import ALIASES

    table = Table(title="source aliases (any Hub id org/name[@revision] or local folder works too)")
    table.add_column("alias")
    table.add_column("Hub id")
    for alias, repo_id in ALIASES.items():
        table.add_row(alias, repo_id)
    _console().print(table)


@mappings_app.command("list", cls=XatlCommand)
def mappings_list() -> None:
    """List the built-in mappings."""
    from xatl_convert.mapping import builtin_mappings, load_mapping

    table = Table(title="built-in mappings (xatl mappings show NAME prints one)")
    for column in ("name", "source model_type", "target", "description"):
        table.add_column(column, overflow="fold")
    for name in builtin_mappings():
        mapping = load_mapping(name)
        table.add_row(name, ", ".join(mapping.source.model_types), mapping.target.mixer, mapping.description)
    _console().print(table)


@mappings_app.command("show", cls=XatlCommand)
def mappings_show(
    name: Annotated[
        str,
        typer.Argument(metavar="NAME|FILE", help="Built-in mapping name or a mapping file."),
        Reads("the mapping file"),
    ],
) -> None:
    """Print a mapping's YAML."""
    from rich.syntax import Syntax

    from xatl_convert.mapping import load_mapping

    mapping = load_mapping(name)
    _console().print(Syntax(mapping.text, "yaml", background_color="default"))


@mappings_app.command("new", cls=XatlCommand)
def mappings_new(
    source: Annotated[
        str,
        typer.Option(metavar="SRC", help="Checkpoint to scaffold from (folder, Hub id or alias)."),
        Reads("the source checkpoint", hub="model"),
    ],
    to: MixerOption = "mamba",
    out: Annotated[
        Path | None, typer.Option(metavar="FILE", help="Write the YAML here instead of to stdout."), Writes("new-file")
    ] = None,
) -> None:
    """Scaffold a mapping for one mixer from a source's tensors and config: what it recognises filled, TODOs marked."""
    from xatl_convert.mapping.scaffold import scaffold_mapping
    from xatl_convert.sources import resolve_source

    _quiet_transformers()
    with resolve_source(source) as checkpoint:
        text = scaffold_mapping(checkpoint, to)
    if out is None:
        sys.stdout.write(text)
        return
    write_new_file(out, text, "--out")
    _console(stderr=True).print(
        f"wrote {out}; fill in any TODO and check every guess, then: xatl mappings validate {out} --source {source}",
        highlight=False,
    )


@mappings_app.command("schema", cls=XatlCommand)
def mappings_schema() -> None:
    """Print the JSON Schema of the mapping format (for editor completion and validation)."""
    from xatl_convert.mapping import Mapping

    sys.stdout.write(json.dumps(Mapping.model_json_schema(), indent=2) + "\n")


@mappings_app.command("validate", cls=XatlCommand)
def mappings_validate(
    files: Annotated[
        list[str],
        typer.Argument(metavar="FILE|NAME", help="Mapping files (or built-in names) to check, one or more."),
        Reads("the mapping file"),
    ],
    source: Annotated[
        str | None,
        typer.Option(metavar="SRC", help="Also check full coverage and every shape against this checkpoint."),
        Reads("the source checkpoint", hub="model"),
    ] = None,
    attn_layers: Annotated[str | None, typer.Option(metavar="SPEC", help="Attention layers, as for convert.")] = None,
) -> None:
    """Check mappings' schema, and with --source their coverage and shapes; every file, then exit 2 if any failed.

    One `ok FILE: …` line per good file on stdout, one `error: FILE:LINE: …` line per bad file on stderr, so that
    pre-commit and CI list everything there is to fix in one run. Writes nothing.
    """
    from xatl_convert.mapping import Mapping, load_mapping

    failures = 0

    def refused(error: XatlError, mapping_file: str | None = None) -> None:
        nonlocal failures
        if len(files) == 1:
            raise error  # one file: its error is the command's one line, as for any command
        message = str(error)
        if mapping_file is not None and not message.startswith(mapping_file):  # a plan error names no mapping
            message = f"{mapping_file}: {message}"
        print_error(message)
        failures += 1

    loaded: list[tuple[str, Mapping]] = []
    for file in files:
        try:
            mapping = load_mapping(file)
        except XatlError as error:
            refused(error)
            continue
        loaded.append((file, mapping))
        if source is None:
            _console().print(f"[green]ok[/] {file}: schema valid ({len(mapping.rules)} rules)", highlight=False)
    if source is not None and loaded:
        from xatl_convert.plan import build_plan
        from xatl_convert.sources import resolve_source

        _quiet_transformers()
        with resolve_source(source) as checkpoint:  # read once, for every file
            for file, mapping in loaded:
                try:
                    plan = build_plan(checkpoint, mapping, attn_layers)
                except XatlError as error:
                    refused(error, mapping.file)
                    continue
                _console().print(
                    f"[green]ok[/] {file} covers {source}: {len(plan.by_status('transferred'))} transferred, "
                    f"{len(plan.by_status('initialised'))} initialised, {len(plan.dropped)} dropped",
                    highlight=False,
                )
    if failures:
        raise typer.Exit(2)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
