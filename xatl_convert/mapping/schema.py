"""The mapping file format as frozen pydantic models: unknown keys are errors, never silently ignored.

Values may hold `${source.key}` expressions; `Mapping.bind(source_config)` returns a copy with every expression
evaluated, which is what the planner uses.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from xatl_convert.mapping.expressions import substitute
from xatl_convert.transforms import TransformChain, parse_transform

LayerType = Literal["attention", "mamba", "mamba2"]
LCI_MIXERS: tuple[str, ...] = ("mamba", "mamba2")
TensorGroup = Literal["embeddings", "norms", "mlp", "attention", "w_o", "lm_head", "mixer"]
InitStrategy = Literal["default", "zeros", "ones", "copy"]
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


class SourceMatch(_Strict):
    """Which source checkpoints the mapping applies to."""

    model_type: str | list[str]

    @property
    def model_types(self) -> list[str]:
        return [self.model_type] if isinstance(self.model_type, str) else list(self.model_type)


class TargetSpec(_Strict):
    """The target model: its LCI mixer, which layers stay attention, and its config (expressions allowed)."""

    model_type: Literal["xatl"] = "xatl"
    mixer: Literal["mamba", "mamba2"] = "mamba"
    attention_layers: str | list[IntOrExpression] = Field(
        default_factory=list, description="layer indices kept as attention, or a preset name such as 'paper'"
    )
    config: dict[str, Any] = Field(default_factory=dict)


class Mapping(_Strict):
    """One source family → one target: config derivation, tensor rules, inits and drops."""

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
        for rule in self.rules:
            if rule.when is not None and rule.when not in self.options:
                raise ValueError(f"rule for {rule.target!r} uses option {rule.when!r}, which 'options' does not define")
        return self

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
