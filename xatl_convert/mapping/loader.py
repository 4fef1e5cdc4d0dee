"""Load a mapping file: YAML through `yaml.safe_load`, then the pydantic schema.

YAML and schema errors name file:line:column and suggest the nearest valid key. The YAML node tree is kept only
to find those positions and the line of each rule.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from xatl_convert.errors import MappingError
from xatl_convert.mapping.schema import Mapping

BUILTIN_DIR_CANDIDATES = (
    Path(__file__).resolve().parent.parent / "builtin_mappings",  # installed wheel
    Path(__file__).resolve().parents[2] / "mappings",  # source checkout / editable install
)


def builtin_mapping_dir() -> Path:
    """The folder that holds the built-in mappings, in an installed wheel or in a source checkout."""
    for candidate in BUILTIN_DIR_CANDIDATES:
        if candidate.is_dir():
            return candidate
    raise MappingError("built-in mappings folder is missing from this installation")


def builtin_mappings() -> dict[str, Path]:
    """Built-in mapping names (file stems) and their files."""
    return {path.stem: path for path in sorted(builtin_mapping_dir().glob("*.yaml"))}


def load_mapping(reference: str | Path) -> Mapping:
    """Load a mapping by built-in name or by file path."""
    path = Path(reference)
    if not path.is_file():
        known = builtin_mappings()
        if str(reference) in known:
            path = known[str(reference)]
        else:
            near = difflib.get_close_matches(str(reference), known, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f" (built-in: {', '.join(known)})"
            raise MappingError(f"{reference}: no such mapping file or built-in mapping{hint}")
    return parse_mapping(path.read_text(), str(path))


def parse_mapping(text: str, file: str = "<mapping>") -> Mapping:
    """Parse mapping YAML text; `file` names it in error messages."""
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark else file
        raise MappingError(f"{where}: invalid YAML: {error.problem or error.context}") from None
    if not isinstance(data, dict):
        raise MappingError(f"{file}:1:1: a mapping file is a YAML mapping with keys name, source, target, rules")
    try:
        mapping = Mapping.model_validate(data)
    except ValidationError as error:
        raise MappingError(_describe_validation_error(error, root, file)) from None
    mapping._file, mapping._text = file, text
    for key, items in (("rules", mapping.rules), ("init", mapping.init), ("drop", mapping.drop)):
        for index, item in enumerate(items):
            node = _node_at(root, (key, index))
            item._location = f"{file}:{node.start_mark.line + 1}" if node is not None else file
    return mapping


def _describe_validation_error(error: ValidationError, root: yaml.Node | None, file: str) -> str:
    problem = sorted(error.errors(), key=lambda item: item["type"] != "extra_forbidden")[0]
    location = tuple(part for part in problem["loc"] if not _is_union_tag(part))
    node = _node_at(root, location)
    position = f"{file}:{node.start_mark.line + 1}:{node.start_mark.column + 1}" if node is not None else file
    path = ".".join(str(part) for part in location) or "(top level)"
    if problem["type"] == "extra_forbidden":
        allowed = _allowed_keys(location[:-1])
        near = difflib.get_close_matches(str(location[-1]), allowed, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else (f" (allowed: {', '.join(allowed)})" if allowed else "")
        return f"{position}: unknown key {path!r}{hint}"
    if problem["type"] == "missing":
        return f"{position}: missing required key {path!r}"
    message = problem["msg"].removeprefix("Value error, ")
    return f"{position}: {path}: {message}"


def _is_union_tag(part: Any) -> bool:
    # pydantic adds the member type of a union (e.g. 'str', 'list[...]', 'function-after[...]') to error locations
    return isinstance(part, str) and ("[" in part or part in {"str", "int", "bool", "list", "dict"})


def _node_at(root: yaml.Node | None, location: tuple[Any, ...]) -> yaml.Node | None:
    """Follow keys and list indexes through the YAML node tree; stop at the deepest node found."""
    node = root
    for part in location:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if key_node.value == part:
                    node = key_node if part == location[-1] else value_node
                    break
            else:
                return node
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            return node
    return node


def _allowed_keys(parent: tuple[Any, ...]) -> list[str]:
    """Field names of the schema model found at a location, for 'did you mean' hints."""
    model: type[BaseModel] = Mapping
    for part in parent:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        inner = _model_in(field.annotation)
        if inner is None:
            return []
        model = inner
    return list(model.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in getattr(annotation, "__args__", ()):
        found = _model_in(argument)
        if found is not None:
            return found
    return None
