"""The public entry point: `convert(...)` resolves the source, picks the mapping, plans and writes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from xatl_convert.errors import PlanError, UnsupportedModelError, XatlError
from xatl_convert.layer_selection import LayerSelection
from xatl_convert.mapping import Mapping, builtin_mappings, load_mapping
from xatl_convert.mapping.layers import LCI_MIXERS, layer_selected, mixer_named, mixer_spelling
from xatl_convert.output_folder import ensure_writable
from xatl_convert.plan import ConversionPlan, build_plan
from xatl_convert.sources import SourceCheckpoint, resolve_source
from xatl_convert.write_guard import CommandPaths
from xatl_convert.writer import DEFAULT_MAX_SHARD_BYTES, write_output

TARGETS = LCI_MIXERS


def select_mapping(source: SourceCheckpoint, target: str = "mamba", mapping: str | Path | None = None) -> Mapping:
    """The user's mapping if given, else the built-in mapping for this source model_type and target mixer. A mapping
    that serves several mixers is taken for `target`; one that serves a single mixer always produces that one."""
    target = mixer_named(target)
    if mapping is not None:
        chosen = load_mapping(mapping)
        if len(chosen.target.mixers) == 1:
            return chosen
        if target not in chosen.target.mixers:
            raise PlanError(f"--to {target}: mapping {chosen.name!r} produces {', '.join(chosen.target.mixers)}")
        return chosen.for_mixer(target)
    candidates = [load_mapping(name) for name in builtin_mappings()]  # one per (family, mixer)
    for candidate in candidates:
        if source.model_type in candidate.source.model_types and candidate.target.mixer == target:
            return candidate
    supported = sorted({kind for candidate in candidates for kind in candidate.source.model_types})
    raise UnsupportedModelError(
        f"{source.reference}: model_type {source.model_type!r} has no built-in mapping to {target!r} "
        f"(supported: {', '.join(supported)}); write one and pass --mapping FILE"
    )


def applicable_mappings(source: SourceCheckpoint) -> dict[str, str]:
    """Built-in mappings for this source's model_type, each with whether a full plan succeeds (or why not)."""
    verdicts: dict[str, str] = {}
    for name in builtin_mappings():
        mapping = load_mapping(name)
        if source.model_type not in mapping.source.model_types:
            continue
        try:
            plan = build_plan(source, mapping)
        except XatlError as error:
            verdicts[name] = f"does not fit: {error}"
            continue
        verdicts[name] = (
            f"applies (→ {mapping.target.mixer}: {len(plan.by_status('transferred'))} tensors transferred, "
            f"{len(plan.by_status('initialised'))} initialised)"
        )
    return verdicts


INIT_METHODS = {
    "default": "new mixers start from their own initialisation",
    "attention": "Mamba2 in_proj rows from the attention: V → x, K → B, Q → C (The Mamba in the Llama)",
}


def init_overrides(init: str) -> dict[str, Any]:
    """The mapping option that an `--init` method switches on."""
    if init not in INIT_METHODS:
        raise PlanError(f"--init {init!r}: unknown method (known: {', '.join(INIT_METHODS)})")
    return {"options.attention_init": True} if init == "attention" else {}


def parse_overrides(assignments: Sequence[str]) -> dict[str, Any]:
    """`--set key.sub=value` pairs; values are read as YAML scalars (32, 1e-3, true, auto).

    Only the form is checked here; whether a key exists and its value fits is the plan's to say (build_plan).
    """
    # read_yaml, not yaml.safe_load: it refuses alias bombs and reads 1e-3 as a number (YAML 1.2)
    from xatl_convert.mapping.loader import YamlInputError, read_yaml

    overrides: dict[str, Any] = {}
    for assignment in assignments:
        key, separator, value = assignment.partition("=")
        key = key.strip()
        if not separator or not all(part.isidentifier() for part in key.split(".")):
            raise PlanError(f"--set {assignment!r}: expected KEY=VALUE with a dotted KEY, e.g. mamba.d_state=32")
        try:
            overrides[key] = read_yaml(value)[0]
        except YamlInputError as error:
            raise PlanError(f"--set {key}: the value is not one YAML value ({error}); quote a string") from None
    return overrides


def plan_conversion(
    source: str | Path | SourceCheckpoint,
    to: str = "mamba",
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    mapping: str | Path | None = None,
    attn_layers: str | Sequence[int] | LayerSelection | None = None,
    overrides: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> ConversionPlan:
    """Resolve the source and build the plan; nothing is written. `attn_layers` may be a `LayerSelection`
    (`layer_selection.select.select_layers`): its layers are kept, and the plan carries its record."""
    to = mixer_named(to)
    if to not in TARGETS:
        raise PlanError(f"--to {to!r}: unknown target (known: {', '.join(mixer_spelling(t) for t in TARGETS)})")
    checkpoint = source if isinstance(source, SourceCheckpoint) else resolve_source(source, revision, cache_dir)
    chosen = select_mapping(checkpoint, to, mapping)
    fills = [rule for rule in chosen.rules if rule.when == "attention_init"]
    if (overrides or {}).get("options.attention_init") and not any(
        layer_selected(rule.where, chosen.target.mixer) for rule in fills
    ):
        raise PlanError(
            f"--init attention: mapping {chosen.name!r} has no attention-informed init (it fills Mamba2's in_proj; "
            "use --to mamba2)"
        )
    selection = attn_layers if isinstance(attn_layers, LayerSelection) else None
    layers = selection.chosen if selection is not None else attn_layers
    plan = build_plan(checkpoint, chosen, layers, overrides, dtype, seed)
    if selection is not None:
        if selection.num_layers != plan.target_config.num_hidden_layers:
            raise PlanError(
                f"--attn-layers: the layer selection measured {selection.num_layers} layers, the target has "
                f"{plan.target_config.num_hidden_layers}; select again for this source"
            )
        plan.layer_selection = selection.record()
    return plan


def conversion_inputs(
    source: str | Path | SourceCheckpoint, mapping: str | Path | None = None, cache_dir: str | Path | None = None
) -> CommandPaths:
    """What a conversion reads, for the write guard: the source (a Hub id's cache), the mapping file, --cache-dir."""
    paths = CommandPaths()
    if isinstance(source, SourceCheckpoint):
        paths.read(source.storage_root, "the source checkpoint")
    else:
        paths.read(source, "the source checkpoint", hub="model", cache_dir=Path(cache_dir) if cache_dir else None)
    paths.read(mapping, "the mapping file")
    paths.read(cache_dir, "the Hugging Face cache (--cache-dir)")
    return paths


def convert(
    source: str | Path | SourceCheckpoint,
    out: str | Path,
    to: str = "mamba",
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    mapping: str | Path | None = None,
    attn_layers: str | Sequence[int] | LayerSelection | None = None,
    overrides: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    force: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    command_line: str | None = None,
    show_progress: bool = False,
) -> ConversionPlan:
    """Convert a source checkpoint into an xatl folder at `out`; returns the plan that was executed."""
    # Before "already exists; pass --force", which must never be said of the source.
    ensure_writable(Path(out), force, conversion_inputs(source, mapping, cache_dir).inputs)
    plan = plan_conversion(source, to, revision, cache_dir, mapping, attn_layers, overrides, dtype, seed)
    try:
        write_output(plan, Path(out), force, max_shard_bytes, command_line, show_progress)
    finally:
        plan.source.close()
    return plan


def convert_to_format(
    source: str | Path,
    out: str | Path,
    format: str,
    force: bool = False,
    command_line: str | None = None,
    show_progress: bool = False,
    gguf_type: str | None = None,
    **options: Any,
) -> tuple[ConversionPlan, list[str]]:
    """`convert --format F`: check that the planned model fits F before writing a byte, convert into a scratch xatl
    folder beside OUT, export that to OUT (the one export writer); the scratch folder goes either way. `options` are
    `convert`'s (to, revision, cache_dir, mapping, attn_layers, overrides, dtype, seed); `gguf_type` is export's."""
    from xatl_convert.export import check_format, export_folder
    from xatl_convert.export.writer import check_folder
    from xatl_convert.output_folder import scratch_folder_beside

    planned = {key: options.get(key) for key in ("to", "revision", "cache_dir", "mapping")}
    ensure_writable(Path(out), force, conversion_inputs(source, planned["mapping"], planned["cache_dir"]).inputs)
    plan = plan_conversion(source, **options)
    plan.source.close()
    module = check_format(format, plan.target_config.to_dict(), source)
    check_folder(module, plan.source.path, plan.target_config.to_dict(), gguf_type)  # the source's tokenizer
    with scratch_folder_beside(out) as work:
        plan = convert(source, work / "xatl", command_line=command_line, show_progress=show_progress, **options)
        names = export_folder(work / "xatl", out, format, force, gguf_type=gguf_type)
    return plan, names
