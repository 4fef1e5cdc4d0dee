"""The mapping file format as frozen pydantic models: unknown keys are errors, never silently ignored.

Values may hold `${source.key}` expressions; `Mapping.bind(source_config)` returns a copy with every expression
evaluated, which is what the planner uses.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    create_model,
    field_validator,
    model_validator,
)

from xatl_convert.mapping.expressions import substitute
from xatl_convert.transforms import TransformChain, parse_transform


def _model_module(name: str) -> ModuleType:
    """`xatl_convert.models.<name>` (a stdlib-only file) without importing its package, whose `__init__` imports
    transformers and torch: loaded from its file under its own name, so a later package import finds this one."""
    qualified = f"xatl_convert.models.{name}"
    if qualified not in sys.modules:
        path = Path(__file__).parents[1] / "models" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(qualified, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[qualified] = module
        spec.loader.exec_module(module)
    return sys.modules[qualified]


_KEYS = _model_module("config_keys_xatl")
MIXERS = _model_module("mixers_xatl").MIXERS
LayerType = Literal[("attention", *MIXERS, "lci")]  # type: ignore[valid-type]  # lci: every layer with an LCI mixer
Mixer = Literal[tuple(MIXERS)]  # type: ignore[valid-type]
TensorGroup = Literal["embeddings", "norms", "mlp", "attention", "w_o", "lm_head", "mixer"]
# identity_conv: a short causal conv that passes its input through (last tap 1, the others 0), so that projections
# moved in front of it (Gated DeltaNet's q, k, v) reach the mixer unchanged but for the activation.
InitStrategy = Literal["default", "zeros", "ones", "copy", "identity_conv"]
ExpressionText = Annotated[str, Field(pattern=r"^\s*\$\{.*\}\s*$")]
IntOrExpression = int | ExpressionText

LAYER_PATTERN = "{i}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Located(_Strict):
    """A list item whose YAML line the loader records, so that plan errors can name file:line."""

    _location: str = PrivateAttr(default="<mapping>")

    @property
    def location(self) -> str:
        return self._location


def _check_layer_filter(where: str | None, *patterns: str) -> None:
    if where is not None and not any(LAYER_PATTERN in pattern for pattern in patterns):
        raise ValueError("'where' selects layers, so the names need a {i} pattern")


class TensorRule(_Located):
    """Produce one target tensor (per layer, with `{i}`) from source tensors through a transform."""

    target: str
    source: str | list[str]
    transform: Any = "copy"
    where: LayerType | None = None
    when: str | None = Field(default=None, description="name of a boolean option that enables this rule")
    on_mismatch: Literal["error", "drop"] = Field(
        default="error", description="on a shape mismatch: fail, or drop the source and initialise the target"
    )
    optional: bool = Field(default=False, description="skip quietly when the source or target tensor is absent")
    group: TensorGroup | None = None
    part: str | None = Field(
        default=None,
        description="fill only this named row block of a fused target tensor (e.g. x, B, C of Mamba2's in_proj); "
        "the rest keeps its init",
    )
    condition: bool | str = Field(
        default=True,
        description="an expression on the source config (`${source.parallel_attn}`); the rule applies where true",
    )

    @field_validator("transform")
    @classmethod
    def _known_transform(cls, value: Any) -> Any:
        parse_transform(_placeholder_expressions(value))
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TensorRule:
        _check_layer_filter(self.where, self.target, *self.sources)
        wildcards = [pattern for pattern in (self.target, *self.sources) if "*" in pattern]
        if wildcards and (len(self.sources) != 1 or "*" not in self.target or "*" not in self.sources[0]):
            raise ValueError("a '*' wildcard needs exactly one source, with '*' in both source and target")
        return self

    @property
    def sources(self) -> list[str]:
        return [self.source] if isinstance(self.source, str) else list(self.source)

    def transform_chain(self) -> TransformChain:
        return parse_transform(self.transform)


class InitRule(_Located):
    """Initialise target tensors that no rule produces: the target module's own init, a constant, or (`copy`) a
    source tensor where its shape fits, falling back to the default init where it does not."""

    target: str
    where: LayerType | None = None
    strategy: InitStrategy = "default"
    source: str | None = Field(default=None, description="with strategy copy: the source tensor ({i} and * allowed)")
    when: str | None = Field(default=None, description="name of a boolean option that enables this rule")

    @model_validator(mode="after")
    def _consistent(self) -> InitRule:
        _check_layer_filter(self.where, self.target)
        if (self.strategy == "copy") != (self.source is not None):
            raise ValueError("strategy 'copy' needs a 'source', and only 'copy' takes one")
        if self.source is not None and self.source.count("*") != self.target.count("*"):
            raise ValueError("a '*' in the target needs one in the source, and the other way round")
        return self


class DropRule(_Located):
    """Source tensors deliberately left out (listed in the manifest with the reason)."""

    source: str
    where: LayerType | None = None
    reason: str = "dropped by the mapping"

    @model_validator(mode="after")
    def _consistent(self) -> DropRule:
        _check_layer_filter(self.where, self.source)
        return self


class Unsupported(_Strict):
    """A source config that the mapping cannot convert exactly: refused, with the reason, before anything is read."""

    condition: bool | str = Field(description="an expression on the source config, e.g. `${source.alibi}`")
    reason: str


class SourceMatch(_Strict):
    """Which source checkpoints the mapping applies to, and which configs of them it refuses."""

    model_type: str | list[str]
    unsupported: list[Unsupported] = Field(default_factory=list)

    @property
    def model_types(self) -> list[str]:
        return [self.model_type] if isinstance(self.model_type, str) else list(self.model_type)


# JSON Schema of each kind of config value, for editors; the values themselves are checked by XatlConfig once
# every `${...}` is evaluated (before that, "${source.hidden_size}" is fine; a scaffold's TODO the loader refuses).
_EXPRESSION_SCHEMA = {"type": "string", "pattern": r"^\s*\$\{.*\}\s*$"}
_JSON_TYPES: dict[str, dict[str, Any]] = {
    "int": {"type": "integer", "minimum": 1},
    "int?": {"type": ["integer", "null"], "minimum": 1},
    "number": {"type": "number", "exclusiveMinimum": 0},
    "number?": {"type": ["number", "null"], "exclusiveMinimum": 0},
    "number>=0": {"type": "number", "minimum": 0},
    "fraction?": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
    "bool": {"type": "boolean"},
    "str": {"type": "string"},
    "activation": {"type": "string"},
    "layers": {"type": "integer", "minimum": 1},
    "norm": {"enum": list(_KEYS.NORM_TYPES)},
    "int>=0": {"type": "integer", "minimum": 0},
    "norm_layout": {"enum": list(_KEYS.NORM_LAYOUTS)},
    "qk_norm": {"enum": [*_KEYS.QK_NORMS, None]},
    "positions": {"enum": list(_KEYS.POSITION_EMBEDDINGS)},
    "attention_types": {
        "type": ["array", "null"],
        "items": {"enum": list(_KEYS.ATTENTION_TYPES)},
    },
    "flags?": {"type": ["array", "null"], "items": {"enum": [0, 1]}},
    "dict?": {"type": ["object", "null"]},
    "token": {"anyOf": [{"type": ["integer", "null"]}, {"type": "array", "items": {"type": "integer"}}]},
    "dt_rank": {"anyOf": [{"const": "auto"}, {"type": "integer", "minimum": 1}]},
    "range": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2},
}


def _key(kind: str, default: Any, meaning: str) -> Any:
    """A declared config key, with XatlConfig's default (a test holds them equal) and its meaning."""
    schema = {"anyOf": [_JSON_TYPES[kind], _EXPRESSION_SCHEMA]}
    return Field(default=default, description=meaning, json_schema_extra=schema)


_SCHEMA_KINDS = {"state": "int"}  # registry kinds that the JSON schema spells as another


def _mixer_settings_model(spec: Any) -> type[_Strict]:
    """`target.config.<mixer>`: the registry entry's settings as a strict model; each one left out keeps its
    default."""
    fields = {
        key: (Any, _key(_SCHEMA_KINDS.get(setting.kind, setting.kind), setting.default, setting.meaning))
        for key, setting in spec.settings.items()
    }
    model_name = "".join(part.capitalize() for part in spec.name.split("_")) + "Settings"
    doc = f"`target.config.{spec.name}`: the {spec.title} mixer's settings; each one left out keeps its default."
    return create_model(model_name, __base__=_Strict, __doc__=doc, **fields)


# One settings model per registered mixer: MambaSettings, Mamba2Settings, GatedDeltanetSettings, ...
MIXER_SETTINGS: dict[str, type[_Strict]] = {name: _mixer_settings_model(spec) for name, spec in MIXERS.items()}
MambaSettings, Mamba2Settings = MIXER_SETTINGS["mamba"], MIXER_SETTINGS["mamba2"]


def _derived_layer_types(value: Any) -> Any:
    raise ValueError("layer_types is derived from target.mixer and target.attention_layers (or --attn-layers)")


# The keys of `target.config`, from the one declaration XatlConfig reads too (config_keys_xatl), then one settings
# group per registered mixer (mixers_xatl).
TargetConfig = create_model(  # type: ignore[misc]
    "TargetConfig",
    __base__=_Strict,
    __doc__="`target.config`: the keys of the xatl model config (XatlConfig); any other key is an error.",
    **{name: (Any, _key(key.kind, key.default, key.meaning)) for name, key in _KEYS.MODEL_KEYS.items()},
    **{
        name: (model | None, Field(default=None, description=f"{MIXERS[name].title} mixer settings"))
        for name, model in MIXER_SETTINGS.items()
    },
    layer_types=(
        Annotated[Any, BeforeValidator(_derived_layer_types)],
        Field(default=None, description="not set here: derived from target.mixer and target.attention_layers"),
    ),
)
# The top-level keys a mapping or `--set` may give (layer_types is derived, never given).
CONFIG_KEYS: tuple[str, ...] = tuple(name for name in TargetConfig.model_fields if name != "layer_types")


def _declared_keys_only(value: Any) -> Any:
    """Check the keys against TargetConfig but keep the dict itself: its values may still be `${...}` text."""
    if isinstance(value, dict):
        TargetConfig.model_validate(value)
    return value


class TargetSpec(_Strict):
    """The target model: its LCI mixer (or the mixers a family mapping serves, the first by default; `--to` picks),
    which layers stay attention, and its config (expressions allowed)."""

    model_type: Literal["xatl"] = "xatl"
    mixer: Mixer | list[Mixer] = "mamba"
    attention_layers: str | list[IntOrExpression] = Field(
        default_factory=list, description="layer indices kept as attention, or a preset name such as 'paper'"
    )
    config: Annotated[dict[str, Any], BeforeValidator(_declared_keys_only, json_schema_input_type=TargetConfig)] = (
        Field(default_factory=dict)
    )

    @field_validator("mixer")
    @classmethod
    def _distinct_mixers(cls, value: Any) -> Any:
        if isinstance(value, list) and (not value or len(set(value)) != len(value)):
            raise ValueError("a list of mixers names each LCI mixer once, at least one")
        return value

    @property
    def mixers(self) -> list[str]:
        """The mixers this mapping can produce."""
        return [self.mixer] if isinstance(self.mixer, str) else list(self.mixer)


class Mapping(_Strict):
    """One source family → one target: config derivation, tensor rules, inits and drops. A family mapping serves
    several mixers (`target.mixer: [mamba, mamba2]`); `for_mixer` gives the mapping for one."""

    name: str
    description: str = ""
    source: SourceMatch
    target: TargetSpec
    options: dict[str, bool] = Field(default_factory=dict)
    rules: list[TensorRule]
    init: list[InitRule] = Field(default_factory=list)
    drop: list[DropRule] = Field(default_factory=list)
    _file: str = PrivateAttr(default="<mapping>")
    _text: str = PrivateAttr(default="")

    @field_validator("drop", mode="before")
    @classmethod
    def _drop_shorthand(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"source": item} if isinstance(item, str) else item for item in value]
        return value

    @model_validator(mode="after")
    def _options_exist(self) -> Mapping:
        for rule in [*self.rules, *self.init]:
            if rule.when is not None and rule.when not in self.options:
                raise ValueError(f"rule for {rule.target!r} uses option {rule.when!r}, which 'options' does not define")
        return self

    def for_mixer(self, mixer: str) -> Mapping:
        """This mapping producing `mixer` (one of `target.mixers`), named NAME-to-MIXER; locations and text are kept."""
        if mixer not in self.target.mixers:
            raise ValueError(f"mapping {self.name!r} produces {', '.join(self.target.mixers)}, not {mixer!r}")
        if len(self.target.mixers) == 1:
            return self
        chosen = self.model_copy(
            update={
                "name": f"{self.name}-to-{mixer.replace('_', '-')}",
                "target": self.target.model_copy(update={"mixer": mixer}),
            }
        )
        chosen._file, chosen._text = self._file, self._text
        return chosen

    @property
    def file(self) -> str:
        return self._file

    @property
    def text(self) -> str:
        """The mapping's YAML as the user wrote it, embedded in the model card and manifest."""
        return self._text

    def bind(self, source_config: dict[str, Any]) -> Mapping:
        """Evaluate every `${...}` against the source config; keeps the YAML locations of the rules."""
        data = substitute(self.model_dump(mode="python"), {"source": source_config})
        bound = Mapping.model_validate(data)
        bound._file, bound._text = self._file, self._text
        for new_items, old_items in ((bound.rules, self.rules), (bound.init, self.init), (bound.drop, self.drop)):
            for new, old in zip(new_items, old_items, strict=True):
                new._location = old._location
        return bound


def _placeholder_expressions(value: Any) -> Any:
    """Stand in a 1 for each expression so that an unbound mapping can still be checked for its keys."""
    if isinstance(value, dict):
        return {key: _placeholder_expressions(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_placeholder_expressions(item) for item in value]
    if isinstance(value, str) and value.strip().startswith("${"):
        return 1
    return value
