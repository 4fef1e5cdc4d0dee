"""The provenance manifest (xatl_manifest.json): what each target tensor came from.

Training reads it to freeze what was transferred; verify reads it to recompute every transferred tensor.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from xatl_convert.errors import ManifestError
from xatl_convert.json_files import json_type, read_json
from xatl_convert.plan import ConversionPlan
from xatl_convert.transforms import parse_transform

MANIFEST_NAME = "xatl_manifest.json"
MANIFEST_VERSION = 1
_REWRITE = "the manifest is damaged: convert again to rewrite it"


def build_manifest(plan: ConversionPlan, command_line: str | None = None) -> dict[str, Any]:
    """A JSON-ready description of the plan: source, mapping, target layout, every tensor and every drop."""
    from xatl_convert import __version__

    tensors: dict[str, Any] = {}
    for tensor in plan.tensors:
        entry: dict[str, Any] = {
            "status": tensor.status,
            "shape": list(tensor.shape),
            "dtype": str(tensor.dtype).removeprefix("torch."),
            "rule": tensor.rule,
        }
        if tensor.status == "transferred":
            entry["sources"] = list(tensor.sources)
            entry["transform"] = tensor.transform.spec() if tensor.transform else None
            entry["group"] = tensor.group
        else:
            entry["strategy"] = tensor.strategy
            if tensor.parts:
                entry["parts"] = [
                    {
                        "part": part.part,
                        "rows": list(part.rows),
                        "sources": list(part.sources),
                        "transform": part.transform.spec(),
                        "rule": part.rule,
                    }
                    for part in tensor.parts
                ]
        tensors[tensor.name] = entry
    manifest: dict[str, Any] = {
        "manifest_version": MANIFEST_VERSION,
        "xatl_convert_version": __version__,
        "command_line": command_line,
        "source": {
            "reference": plan.source.reference,
            "path": str(plan.source.path),
            "revision": plan.source.revision,
            "model_type": plan.source.model_type,
        },
        "mapping": {
            "name": plan.mapping.name,
            "file": plan.mapping.file,
            "sha256": hashlib.sha256(plan.mapping.text.encode()).hexdigest(),
            "options": plan.mapping.options,
            "overrides": plan.overrides,
        },
        "target": {
            "model_type": "xatl",
            "layer_types": plan.layer_types,
            "attention_layers": plan.attention_layers,
            "dtype": str(plan.dtype).removeprefix("torch."),
            "seed": plan.seed,
        },
        "totals": {
            "transferred_tensors": len(plan.by_status("transferred")),
            "transferred_bytes": plan.total_bytes("transferred"),
            "initialised_tensors": len(plan.by_status("initialised")),
            "initialised_bytes": plan.total_bytes("initialised"),
            "dropped_source_tensors": len(plan.dropped),
        },
        "warnings": list(plan.warnings),
        "tensors": tensors,
        "dropped": dict(plan.dropped),
    }
    if plan.layer_selection is not None:
        manifest["layer_selection"] = plan.layer_selection
    return manifest


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """Load and validate a converted folder's manifest, so that verify and training never meet a malformed entry.

    Returns the JSON object as written; a ManifestError names the file and the key or tensor at fault.
    """
    path = Path(folder) / MANIFEST_NAME
    data = read_json(path, ManifestError, _REWRITE, expect_object=True)
    version = data.get("manifest_version")
    if isinstance(version, int) and version > MANIFEST_VERSION:
        raise ManifestError(
            f"{path}: manifest_version {version} is newer than this xatl-convert reads ({MANIFEST_VERSION}); "
            "upgrade xatl-convert"
        )
    try:
        _Manifest.model_validate(data)
    except ValidationError as error:
        raise ManifestError(f"{path}: {_first_problem(error)}; {_REWRITE}") from None
    return data


def _valid_transform(spec: Any) -> Any:
    """Verify re-applies the recorded transform, so an unknown or malformed one must stop verify before it starts."""
    if spec is not None:
        parse_transform(spec)  # its ValueError names the transform and the nearest known one
    return spec


class _Entry(BaseModel):
    # strict: JSON written by build_manifest has exact types; a "3" for a 3 means the file was edited or damaged
    model_config = ConfigDict(strict=True, extra="allow", protected_namespaces=())


class _Part(_Entry):
    part: str
    rows: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=2, max_length=2)]
    sources: Annotated[list[str], Field(min_length=1)]
    transform: Any
    rule: str | None = None

    check_transform = field_validator("transform")(_valid_transform)

    @model_validator(mode="after")
    def _rows_in_order(self) -> _Part:
        if self.rows[0] > self.rows[1]:
            raise ValueError(f"rows {self.rows}: start is after end")
        return self


class _Tensor(_Entry):
    status: Literal["transferred", "initialised"]
    shape: list[Annotated[int, Field(ge=0)]]
    dtype: str
    rule: str | None = None
    sources: list[str] | None = None
    transform: Any = None
    group: str | None = None
    strategy: str | None = None
    parts: list[_Part] = []

    check_transform = field_validator("transform")(_valid_transform)

    @model_validator(mode="after")
    def _transferred_has_origin(self) -> _Tensor:
        if self.status == "transferred" and (not self.sources or self.transform is None):
            raise ValueError("a transferred tensor needs non-empty 'sources' and a 'transform'")
        return self


class _Source(_Entry):
    reference: str
    path: str
    revision: str | None = None
    model_type: str | None = None


class _Target(_Entry):
    layer_types: list[str]
    model_type: str | None = None
    attention_layers: list[int] | None = None
    dtype: str | None = None
    seed: int | None = None


class _LayerScore(_Entry):
    layer: Annotated[int, Field(ge=0)]
    kl: float
    score: float


class _LayerSelection(_Entry):
    method: str
    keep: Annotated[int, Field(ge=1)]
    chosen: list[Annotated[int, Field(ge=0)]]
    budget: dict[str, int]
    layers: list[_LayerScore]


class _Manifest(_Entry):
    manifest_version: int
    source: _Source
    target: _Target
    tensors: dict[str, _Tensor]
    warnings: list[str] = []
    dropped: dict[str, str] = {}
    layer_selection: _LayerSelection | None = None

    @model_validator(mode="after")
    def _selection_is_what_was_kept(self) -> _Manifest:
        """The recorded choice must be the layers the target keeps: anything else misstates how it was made."""
        chosen = self.layer_selection.chosen if self.layer_selection is not None else None
        kept = self.target.attention_layers
        if chosen is not None and kept is not None and sorted(chosen) != sorted(kept):
            raise ValueError(f"layer_selection.chosen {chosen} differs from target.attention_layers {kept}")
        return self

    @field_validator("manifest_version")
    @classmethod
    def _known_version(cls, version: int) -> int:
        if version != MANIFEST_VERSION:  # a newer one is refused before validation, with its own advice
            raise ValueError(f"{version} is not a known version (expected {MANIFEST_VERSION})")
        return version


def _first_problem(error: ValidationError) -> str:
    """One line for the first problem; missing keys of the same object are listed together."""
    problems = error.errors()
    first = problems[0]
    # a missing key, and a transform's own message, read better under the object that holds them
    trim = first["type"] == "missing" or (first["type"] == "value_error" and first["loc"][-1:] == ("transform",))
    where = _where(first["loc"][:-1] if trim else first["loc"])
    prefix = f"{where}: " if where else ""
    if first["type"] == "missing":
        keys = [p["loc"][-1] for p in problems if p["type"] == "missing" and p["loc"][:-1] == first["loc"][:-1]]
        noun = "key" if len(keys) == 1 else "keys"
        return prefix + f"missing required {noun} " + ", ".join(repr(key) for key in keys)
    if first["type"] == "value_error":
        return prefix + str(first["ctx"]["error"])
    if first["type"] in ("model_type", "model_attributes_type", "dict_type"):
        return prefix + f"expected a JSON object, got {json_type(first['input'])}"
    return prefix + f"{first['msg'].replace('Input should', 'should')}, got {_short(first['input'])}"


def _where(loc: tuple[int | str, ...]) -> str:
    """('tensors', 'model.x', 'parts', 0, 'rows') → "tensor 'model.x': parts[0].rows"."""
    if len(loc) >= 2 and loc[0] == "tensors":
        rest = _dotted(loc[2:])
        return f"tensor {loc[1]!r}" + (f": {rest}" if rest else "")
    return _dotted(loc)


def _dotted(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def transferred_tensor_names(manifest: dict[str, Any]) -> list[str]:
    """Names of the target tensors that came from the source (the ones to freeze at first)."""
    return [name for name, entry in manifest["tensors"].items() if entry["status"] == "transferred"]
