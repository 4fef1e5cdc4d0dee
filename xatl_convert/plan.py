"""Mapping + source + target skeleton → ConversionPlan: one entry per target tensor, checked before any write.

Every source tensor ends up consumed by a rule or listed as dropped with a reason; every target tensor is produced
by a rule or initialised. Anything else is a PlanError naming the tensors, before a byte is written.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import ValidationError

from xatl_convert.errors import MappingError, PlanError, UnsupportedModelError, XatlError
from xatl_convert.mapping.expressions import ExpressionError
from xatl_convert.mapping.layers import attention_layer_indices, layer_selected, layer_types
from xatl_convert.mapping.loader import describe_bound_error, locate
from xatl_convert.mapping.schema import (
    CONFIG_KEYS,
    LAYER_PATTERN,
    MIXER_SETTINGS,
    InitRule,
    Mapping,
    TargetConfig,
    TensorRule,
)
from xatl_convert.models import XatlConfig, XatlForCausalLM
from xatl_convert.models.configuration_xatl import XatlConfigError, check_config_values
from xatl_convert.models.mixers_xatl import MIXERS
from xatl_convert.sources.checkpoint import SourceCheckpoint
from xatl_convert.transforms import TransformChain, TransformShapeError, parse_transform

Status = Literal["transferred", "initialised"]


@dataclass(frozen=True)
class PlannedPart:
    """A named row block of an initialised tensor that a rule fills from source tensors (e.g. Mamba2's x ← V)."""

    part: str
    rows: tuple[int, int]
    sources: tuple[str, ...]
    transform: TransformChain
    rule: str


@dataclass(frozen=True)
class PlannedTensor:
    """How one target tensor comes to be: from which source tensors and transform, or from which init."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    status: Status
    rule: str
    sources: tuple[str, ...] = ()
    transform: TransformChain | None = None
    strategy: str | None = None
    group: str | None = None
    parts: tuple[PlannedPart, ...] = ()

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def init_unit(self) -> str:
        return init_unit(self.name)


def init_unit(name: str) -> str:
    """The module that initialises a target tensor as a whole (a layer's mixer, MLP or norm; else the owner)."""
    parts = name.split(".")
    if len(parts) > 4 and parts[0] == "model" and parts[1] == "layers":
        return ".".join(parts[:4])
    return ".".join(parts[:-1])


@dataclass
class ConversionPlan:
    """The whole conversion, decided: target config, one entry per target tensor, and the dropped sources."""

    source: SourceCheckpoint
    mapping: Mapping
    target_config: XatlConfig
    tensors: list[PlannedTensor]
    dropped: dict[str, str]
    attention_layers: list[int]
    dtype: torch.dtype
    seed: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    layer_selection: dict[str, Any] | None = None  # how `auto:K` chose the attention layers (LayerSelection.record)

    @property
    def layer_types(self) -> list[str]:
        return list(self.target_config.layer_types)

    def by_status(self, status: Status) -> list[PlannedTensor]:
        return [tensor for tensor in self.tensors if tensor.status == status]

    def total_bytes(self, status: Status | None = None) -> int:
        return sum(tensor.nbytes for tensor in self.tensors if status is None or tensor.status == status)


def build_plan(
    source: SourceCheckpoint,
    mapping: Mapping,
    attention_layers: str | Sequence[int] | None = None,
    overrides: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> ConversionPlan:
    """Decide every target tensor; raise PlanError (or MappingError) before anything is written. A family mapping
    (several mixers) produces its first mixer unless `Mapping.for_mixer` chose another."""
    mapping = mapping.for_mixer(mapping.target.mixers[0])
    if source.model_type not in mapping.source.model_types:
        raise UnsupportedModelError(
            f"{source.reference}: model_type {source.model_type!r} does not match mapping {mapping.name!r} "
            f"(which converts {', '.join(mapping.source.model_types)})"
        )
    for key, value in (overrides or {}).items():
        _check_override(key, value, mapping)
    source_config = normalised_source_config(source)
    bound = _bind(mapping, source_config)
    _refuse_unsupported(source, bound)
    config_values = _merge_overrides(bound.target.config, overrides or {})
    options = {**bound.options, **config_values.pop("options", {})}
    bound = bound.model_copy(update={"options": options})
    target_config, kept = _target_config(bound, config_values, attention_layers, overrides or {})
    target_shapes = target_tensor_shapes(target_config)
    output_dtype = dtype or dominant_dtype(source)
    planner = _Planner(source, bound, target_config, target_shapes, output_dtype)
    tensors, dropped = planner.run()
    return ConversionPlan(
        source=source,
        mapping=bound,
        target_config=target_config,
        tensors=tensors,
        dropped=dropped,
        attention_layers=kept,
        dtype=output_dtype,
        seed=seed,
        overrides=dict(overrides or {}),
        warnings=_semantic_warnings(source_config, target_config, kept),
    )


def _bind(mapping: Mapping, source_config: dict[str, Any]) -> Mapping:
    """The mapping with every `${...}` evaluated; an error names the FILE:LINE:COL of the expression."""
    try:
        return mapping.bind(source_config)
    except ExpressionError as error:
        raise MappingError(f"{locate(mapping, error.path)}: {error}") from None
    except ValidationError as error:  # an expression gave a value of the wrong kind (e.g. a float layer index)
        raise MappingError(describe_bound_error(mapping, error)) from None


def _check_override(key: str, value: Any, mapping: Mapping) -> None:
    """A `--set` key must be declared: an unknown one would be written to config.json and do nothing."""
    group, _, name = key.partition(".")
    if group == "options":
        _check_option(key, name, value, mapping)
    elif group == "layer_types":
        raise PlanError(f"--set {key}: layer kinds come from --to and --attn-layers, not from --set")
    elif group not in CONFIG_KEYS:
        hint = _nearest(group, CONFIG_KEYS) or " (docs/mappings.md and `xatl mappings schema` list the keys)"
        raise PlanError(f"--set {key}: unknown target config key {group!r}{hint}")
    elif name and group in MIXER_SETTINGS:
        _check_mixer_setting(key, group, name)
    elif name and (group not in ("rope_parameters", "rope_scaling") or "." in name):
        raise PlanError(f"--set {key}: {group} is one value, not a group; use --set {group}=VALUE")


def _check_mixer_setting(key: str, group: str, name: str) -> None:
    known = list(MIXER_SETTINGS[group].model_fields)
    setting, _, deeper = name.partition(".")
    if setting not in known:
        near = difflib.get_close_matches(setting, known, n=1)
        hint = f"; did you mean '{group}.{near[0]}'?" if near else f" (known: {', '.join(known)})"
        raise PlanError(f"--set {key}: unknown {group} setting {setting!r}{hint}")
    if deeper:
        raise PlanError(f"--set {key}: {group}.{setting} is one value, not a group; use --set {group}.{setting}=VALUE")


def _check_option(key: str, name: str, value: Any, mapping: Mapping) -> None:
    """Options switch rules on and off: they exist in the mapping and are true or false, never 'maybe'."""
    known = list(mapping.options)
    if not name or "." in name:
        raise PlanError(f"--set {key}: expected options.NAME=true|false (options of {mapping.name!r}: "
                        f"{', '.join(known) or 'none'})")  # fmt: skip
    if name not in known:
        hint = _nearest(name, known) or f" (its options: {', '.join(known) or 'none'})"
        raise PlanError(f"--set {key}: mapping {mapping.name!r} has no option {name!r}{hint}")
    if not isinstance(value, bool):
        raise PlanError(f"--set {key}={_typed(value)}: expected true or false")


def _nearest(name: str, known: Sequence[str]) -> str:
    near = difflib.get_close_matches(name, known, n=1)
    return f"; did you mean {near[0]!r}?" if near else ""


def _typed(value: Any) -> str:
    """A `--set` value as the user typed it (a string as is, the rest as YAML/JSON would write it)."""
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _target_config(
    mapping: Mapping, values: dict[str, Any], attention_layers: str | Sequence[int] | None, overrides: dict[str, Any]
) -> tuple[XatlConfig, list[int]]:
    """The target config and the attention layers; a bad value names the `--set` or the mapping line that gave it."""
    try:
        check_config_values(values)  # in the mapping's key order, before any value is used
        num_layers = values.get("num_hidden_layers", TargetConfig.model_fields["num_hidden_layers"].default)
        kept = _kept_layers(mapping, attention_layers, num_layers)
        kinds = layer_types(kept, num_layers, mapping.target.mixer)
        return XatlConfig(**_with_followed_settings(values), layer_types=kinds), kept
    except XatlConfigError as error:
        raise _config_error(error, mapping, overrides) from None
    except (TypeError, ValueError) as error:  # transformers' own validation
        raise PlanError(f"{mapping.file}: target config is invalid: {error}") from None


def _with_followed_settings(values: dict[str, Any]) -> dict[str, Any]:
    """The values, with each mixer setting that follows a model-level key (the registry's `follows`: the gated
    norms' eps follow norm_eps) given that key's value unless the mapping or `--set` gives it: a new mixer's norm is
    ours to choose, and the source's eps is the one that formats sharing one eps (Bamba, GraniteMoeHybrid,
    Qwen3-Next) hold. The registry's own default (1e-5) stays for folders written before the key."""
    values = dict(values)
    for name, spec in MIXERS.items():
        group = dict(values.get(name) or {})
        for key, setting in spec.settings.items():
            if setting.follows is not None and key not in group:
                followed = values.get(setting.follows, TargetConfig.model_fields[setting.follows].default)
                group[key] = followed
        values[name] = group
    return values


def _kept_layers(mapping: Mapping, attention_layers: str | Sequence[int] | None, num_layers: int) -> list[int]:
    spec = attention_layers if attention_layers is not None else mapping.target.attention_layers
    try:
        return attention_layer_indices(spec, num_layers)
    except ValueError as error:
        if attention_layers is not None:
            raise PlanError(f"--attn-layers: {error}") from None
        where = locate(mapping, ("target", "attention_layers"))
        raise MappingError(f"{where}: target.attention_layers: {error}") from None


def _config_error(error: XatlConfigError, mapping: Mapping, overrides: dict[str, Any]) -> XatlError:
    """Blame the `--set` that gave one of the keys at fault, else the mapping line that wrote it."""
    for key in error.keys:
        given = next((prefix for prefix in _prefixes(key) if prefix in overrides), None)
        if given is not None:
            return PlanError(f"--set {given}={_typed(overrides[given])}: {error}")
    written = [key for key in error.keys if _has_key(mapping.target.config, key)]
    path = ("target", "config", *written[0].split(".")) if written else ("target", "config")
    return MappingError(f"{locate(mapping, path)}: {error}")


def _prefixes(key: str) -> list[str]:
    """mamba.d_conv → [mamba.d_conv, mamba]: `--set mamba={...}` gives mamba.d_conv too."""
    parts = key.split(".")
    return [".".join(parts[:end]) for end in range(len(parts), 0, -1)]


def _has_key(config: dict[str, Any], key: str) -> bool:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _refuse_unsupported(source: SourceCheckpoint, mapping: Mapping) -> None:
    """The first `source.unsupported` entry whose condition holds for this source, as one error line."""
    for index, entry in enumerate(mapping.source.unsupported):
        where = locate(mapping, ("source", "unsupported", index))
        if _holds(entry.condition, where):
            raise UnsupportedModelError(f"{source.reference}: {entry.reason} (mapping {mapping.name}, {where})")


def _holds(condition: bool | str, where: str) -> bool:
    """A bound `condition` (rule or source.unsupported): its expression must have given true or false."""
    if not isinstance(condition, bool):
        raise MappingError(f"{where}: condition must be true or false, got {condition!r}")
    return condition


@dataclass(frozen=True)
class _Feature:
    """A source config feature that changes what the model computes, and the xatl key that carries it."""

    source_key: str
    target_key: str
    what: str
    attention_only: bool = False  # only kept attention layers compute it

    def active(self, config: dict[str, Any]) -> bool:
        value = config.get(self.source_key)
        if self.source_key in _MULTIPLIERS:
            return isinstance(value, int | float) and not isinstance(value, bool) and value != 1
        if self.source_key == "no_rope_layers":
            return isinstance(value, list) and 0 in value
        return bool(value)


_MULTIPLIERS = ("embedding_multiplier", "residual_multiplier", "logits_scaling")
# Checked on every conversion: a mapping (built-in or the user's) that leaves one of these out converts a model that
# computes something else, even where every weight is copied exactly.
_FEATURES = (
    _Feature("sliding_window", "sliding_window", "sliding-window attention ({value} tokens)", attention_only=True),
    _Feature("attn_logit_softcapping", "attn_logit_softcapping", "attention-logit soft-capping ({value})", True),
    _Feature("query_pre_attn_scalar", "attention_multiplier", "a softmax scale of query_pre_attn_scalar ** -0.5", True),
    _Feature("attention_multiplier", "attention_multiplier", "a softmax scale of {value}", attention_only=True),
    _Feature("qk_layernorm", "qk_norm", "q/k norms", attention_only=True),
    _Feature("no_rope_layers", "no_rope_layers", "layers without RoPE", attention_only=True),
    _Feature("final_logit_softcapping", "final_logit_softcapping", "final-logit soft-capping ({value})"),
    _Feature("embedding_multiplier", "embedding_multiplier", "an embedding multiplier ({value})"),
    _Feature("residual_multiplier", "residual_multiplier", "a residual multiplier ({value})"),
    _Feature("logits_scaling", "logits_scaling", "logits divided by {value}"),
)


def _semantic_warnings(source_config: dict[str, Any], target: XatlConfig, kept: list[int]) -> list[str]:
    """What the target computes differently from the source even where weights are copied exactly: each source
    feature that changes the function and that the mapping left out of the target config, in one line."""
    warnings = []
    if source_config.get("use_sliding_window") is False:  # Qwen2/3 keep a window size they do not use
        source_config = {**source_config, "sliding_window": None}
    if source_config.get("model_type") == "gemma3_text":  # stored, never applied by transformers
        source_config = {**source_config, "attn_logit_softcapping": None}
    for feature in _FEATURES:
        if not feature.active(source_config) or (feature.attention_only and not kept):
            continue
        if _carries(target, feature.target_key):
            continue
        what = feature.what.format(value=source_config.get(feature.source_key))
        where = "the kept attention layers compute" if feature.attention_only else "the converted model computes"
        window = source_config.get("sliding_window") if feature.source_key == "sliding_window" else None
        tail = f" (they match only on sequences of up to {window} tokens)" if window else ""
        warnings.append(f"the source uses {what} and the mapping leaves it out: {where} something else{tail}")
    return warnings


def _carries(target: XatlConfig, key: str) -> bool:
    """Whether the target config sets `key` away from its default (the feature is on)."""
    value = getattr(target, key, None)
    if key in _MULTIPLIERS:
        return value != 1.0
    return value is not None and value is not False


def normalised_source_config(source: SourceCheckpoint) -> dict[str, Any]:
    """The source config.json, with transformers' current names filled in (e.g. rope_parameters)."""
    from xatl_convert.sources.transformers_config import transformers_config

    config = transformers_config(source.config, source.path / "config.json")
    if config is None:
        return dict(source.config)  # a model_type transformers does not know: the raw names are all there is
    return {**source.config, **config.to_dict()}


def target_tensor_shapes(config: XatlConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the target model saves, in model order, from a skeleton built on the meta device."""
    with torch.device("meta"):
        model = XatlForCausalLM(config)
    return {name: tuple(parameter.shape) for name, parameter in model.named_parameters()}


def dominant_dtype(source: SourceCheckpoint) -> torch.dtype:
    """The floating dtype that holds most of the source's bytes: the default output dtype."""
    counts: Counter[torch.dtype] = Counter()
    for info in source.tensors.values():
        if info.dtype.is_floating_point:
            counts[info.dtype] += info.nbytes
    return counts.most_common(1)[0][0] if counts else torch.float32


def _merge_overrides(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Apply dotted `--set` keys (mamba.d_state=32, options.transfer_attention_output=false) to the config."""
    merged: dict[str, Any] = {key: dict(value) if isinstance(value, dict) else value for key, value in config.items()}
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = merged
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise PlanError(f"--set {dotted}: {part!r} is not a group of settings")
            node = child
        node[leaf] = value
    return merged


def _layer_regex(pattern: str) -> re.Pattern[str]:
    """`{i}` matches a layer index (captured as `layer`), `*` matches the rest of a dotted name (captured as `rest`)."""
    escaped = re.escape(pattern).replace(re.escape(LAYER_PATTERN), r"(?P<layer>\d+)")
    return re.compile(escaped.replace(r"\*", "(?P<rest>.+)", 1).replace(r"\*", ".+"))


def _fill_pattern(pattern: str, match: re.Match[str] | None) -> str:
    """Put the layer index and the `*` part that a target matched into a source pattern."""
    groups = match.groupdict() if match else {}
    if groups.get("layer") is not None:
        pattern = pattern.replace(LAYER_PATTERN, groups["layer"])
    if groups.get("rest") is not None:
        pattern = pattern.replace("*", groups["rest"], 1)
    return pattern


class _Planner:
    """Walks the rules once; holds the bookkeeping so that build_plan reads top to bottom."""

    def __init__(
        self,
        source: SourceCheckpoint,
        mapping: Mapping,
        config: XatlConfig,
        target_shapes: dict[str, tuple[int, ...]],
        dtype: torch.dtype,
    ) -> None:
        self.source = source
        self.mapping = mapping
        self.config = config
        self.layer_types = list(config.layer_types)
        self.target_shapes = target_shapes
        self.dtype = dtype
        self.produced: dict[str, PlannedTensor] = {}
        self.parts: dict[str, list[PlannedPart]] = {}
        self.consumed: set[str] = set()
        self.dropped: dict[str, str] = {}

    def run(self) -> tuple[list[PlannedTensor], dict[str, str]]:
        for rule in self.mapping.rules:
            if not _holds(rule.condition, rule.location):
                continue
            for pairs in self._expand(rule):
                self._apply_layer(rule, pairs)
        for name in self.parts:
            if name in self.produced:
                raise PlanError(f"{self.produced[name].rule}: {name!r} is produced whole, and also has parts filled "
                                f"at {self.parts[name][0].rule}")  # fmt: skip
        tensors = [self.produced.get(name) or self._initialise(name) for name in self.target_shapes]
        self._drop_unconsumed()
        return tensors, {name: reason for name, reason in self.dropped.items() if name not in self.consumed}

    def _expand(self, rule: TensorRule) -> Iterator[list[tuple[str, list[str]]]]:
        """Per layer (or once, without `{i}`), the (target, sources) pairs that the rule names."""
        layers: list[int | None] = [None]
        if any(LAYER_PATTERN in name for name in (rule.target, *rule.sources)):
            layers = [index for index, kind in enumerate(self.layer_types) if layer_selected(rule.where, kind)]
        for layer in layers:
            target = rule.target.replace(LAYER_PATTERN, str(layer))
            sources = [name.replace(LAYER_PATTERN, str(layer)) for name in rule.sources]
            if "*" not in target:
                yield [(target, sources)]
                continue
            regex = re.compile(re.escape(sources[0]).replace(r"\*", "(.+)"))
            matches = [(name, regex.fullmatch(name)) for name in self.source.tensors]
            found = [(name, match.group(1)) for name, match in matches if match]
            if not found and not rule.optional:
                raise PlanError(f"{rule.location}: {sources[0]!r} matches no tensor of {self.source.reference}")
            yield [(target.replace("*", rest), [name]) for name, rest in found]

    def _apply_layer(self, rule: TensorRule, pairs: list[tuple[str, list[str]]]) -> None:
        """A rule moves a layer's tensors as a unit: with on_mismatch=drop, one misfit drops them all (W_O with
        its bias), so that no half-transferred module is left."""
        if rule.on_mismatch == "drop":
            for target, sources in pairs:
                misfit = self._misfit(rule, target, sources)
                if misfit:
                    for _, group_sources in pairs:
                        self._drop(group_sources, f"{misfit} ({rule.location})")
                    return
        for target, sources in pairs:
            self._apply(rule, target, sources)

    def _misfit(self, rule: TensorRule, target: str, sources: list[str]) -> str | None:
        """Why the rule's output does not fit the target tensor's shape (or its part's rows), or None."""
        expected = self._expected_shape(rule, target)
        if expected is None or any(name not in self.source.tensors for name in sources):
            return None
        chain = rule.transform_chain()
        try:
            produced = chain.output_shape([self.source.tensors[name].shape for name in sources])
        except TransformShapeError as error:
            return str(error)
        if produced == expected:
            return None
        where = f"part {rule.part!r} of {target}" if rule.part else target
        return f"{chain.describe()} of {', '.join(sources)} gives shape {list(produced)}, but {where} has shape " + str(
            list(expected)
        )

    def _part_rows(self, rule: TensorRule, target: str) -> tuple[int, int]:
        """Rows of the named part of a fused mixer tensor (the registry's `parts`), or a PlanError naming them."""
        match = re.fullmatch(r"model\.layers\.(\d+)\.mixer\.(.+)", target)
        spec = MIXERS.get(self.layer_types[int(match.group(1))]) if match else None
        parts = spec.parts(getattr(self.config, spec.name), self.config.mixer_sizes) if spec else {}
        blocks = parts.get(match.group(2), {}) if match else {}
        if rule.part not in blocks:
            known = ", ".join(blocks) or "none"
            raise PlanError(f"{rule.location}: {target} has no part {rule.part!r} (its parts: {known})")
        return blocks[rule.part]

    def _expected_shape(self, rule: TensorRule, target: str) -> tuple[int, ...] | None:
        shape = self.target_shapes.get(target)
        if shape is None or rule.part is None:
            return shape
        start, stop = self._part_rows(rule, target)
        return (stop - start, *shape[1:])

    def _apply(self, rule: TensorRule, target: str, sources: list[str]) -> None:
        missing = [name for name in sources if name not in self.source.tensors]
        if missing:
            if rule.optional:
                return
            near = difflib.get_close_matches(missing[0], self.source.tensors, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise PlanError(f"{rule.location}: source tensor {missing[0]!r} is not in {self.source.reference}{hint}")
        if rule.when is not None and not self.mapping.options.get(rule.when, False):
            self._drop(sources, f"option {rule.when} is off ({rule.location})")
            return
        expected = self.target_shapes.get(target)
        if expected is None:
            if rule.optional:
                self._drop(sources, f"the target model has no {target} ({rule.location})")
                return
            near = difflib.get_close_matches(target, self.target_shapes, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise PlanError(f"{rule.location}: target tensor {target!r} does not exist in the xatl model{hint}")
        if target in self.produced:
            raise PlanError(
                f"{rule.location}: {target!r} is already produced by the rule at {self.produced[target].rule}"
            )
        misfit = self._misfit(rule, target, sources)
        if rule.part is not None and not misfit:
            self._add_part(rule, target, sources)
            return
        if misfit:
            shapes = [list(self.source.tensors[name].shape) for name in sources]
            raise PlanError(f"{rule.location}: {target} ← {', '.join(sources)} {shapes}: {misfit}")
        chain = rule.transform_chain()
        self.produced[target] = PlannedTensor(
            name=target,
            shape=expected,
            dtype=self.dtype,
            status="transferred",
            rule=rule.location,
            sources=tuple(sources),
            transform=chain,
            group=rule.group,
        )
        self.consumed.update(sources)

    def _add_part(self, rule: TensorRule, target: str, sources: list[str]) -> None:
        existing = {part.part: part for part in self.parts.get(target, [])}
        if rule.part in existing:
            raise PlanError(f"{rule.location}: part {rule.part!r} of {target!r} is already filled at "
                            f"{existing[rule.part].rule}")  # fmt: skip
        part = PlannedPart(rule.part or "", self._part_rows(rule, target), tuple(sources), rule.transform_chain(),
                           rule.location)  # fmt: skip
        self.parts.setdefault(target, []).append(part)
        self.consumed.update(sources)

    def _drop(self, sources: list[str], reason: str) -> None:
        for name in sources:
            self.dropped.setdefault(name, reason)

    def _matches_layer(self, match: re.Match[str], where: str | None) -> bool:
        if where is None or "layer" not in match.groupdict():
            return True
        index = int(match.group("layer"))
        return index < len(self.layer_types) and layer_selected(where, self.layer_types[index])

    def _init_rule_for(self, name: str) -> InitRule | None:
        for rule in self.mapping.init:
            if rule.when is not None and not self.mapping.options.get(rule.when, False):
                continue  # its option is off: the next rule that matches decides
            match = _layer_regex(rule.target).fullmatch(name)
            if match and self._matches_layer(match, rule.where):
                return rule
        return None

    def _initialise(self, name: str) -> PlannedTensor:
        rule = self._init_rule_for(name)
        if rule is None:
            unplanned = [target for target in self.target_shapes if target not in self.produced]
            unmatched = [target for target in unplanned if self._init_rule_for(target) is None]
            raise PlanError(
                f"{self.mapping.file}: {len(unmatched)} target tensor(s) are neither produced by a rule nor "
                "initialised: " + _list_names(unmatched)
            )
        strategy = rule.strategy
        if rule.source is not None:
            source = _fill_pattern(rule.source, _layer_regex(rule.target).fullmatch(name))
            copied = self._copy_if_fits(rule, name, source)
            if copied is not None:
                return copied
            strategy = "default"
        if strategy == "identity_conv" and len(self.target_shapes[name]) != 3:
            raise PlanError(f"{rule.location}: strategy identity_conv is for a depthwise conv weight (channels, 1, "
                            f"width); {name} has shape {list(self.target_shapes[name])}")  # fmt: skip
        return PlannedTensor(
            name=name,
            shape=self.target_shapes[name],
            dtype=self.dtype,
            status="initialised",
            rule=rule.location,
            strategy=strategy,
            group="mixer",
            parts=tuple(sorted(self.parts.get(name, []), key=lambda part: part.rows)),
        )

    def _copy_if_fits(self, rule: InitRule, target: str, source: str) -> PlannedTensor | None:
        """The init strategy `copy`: take the source tensor when it exists with the target's shape."""
        info = self.source.tensors.get(source)
        if info is None:
            return None
        if info.shape != self.target_shapes[target]:
            self._drop([source], f"init copy: shape {list(info.shape)} does not fit {target} "
                       f"{list(self.target_shapes[target])}, default init used ({rule.location})")  # fmt: skip
            return None
        self.consumed.add(source)
        return PlannedTensor(
            name=target,
            shape=info.shape,
            dtype=self.dtype,
            status="transferred",
            rule=rule.location,
            sources=(source,),
            transform=parse_transform("copy"),
            strategy="copy",
        )

    def _drop_unconsumed(self) -> None:
        leftover: list[str] = []
        for name in self.source.tensors:
            if name in self.consumed or name in self.dropped:
                continue
            for rule in self.mapping.drop:
                match = _layer_regex(rule.source).fullmatch(name)
                if match and self._matches_layer(match, rule.where):
                    self.dropped[name] = f"{rule.reason} ({rule.location})"
                    break
            else:
                leftover.append(name)
        if leftover:
            raise PlanError(
                f"{self.mapping.file}: {len(leftover)} source tensor(s) are neither used by a rule nor dropped: "
                + _list_names(leftover)
            )


def _list_names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … and {len(names) - limit} more" if len(names) > limit else "")
