"""Load a mapping file: YAML through PyYAML's safe loader, then the pydantic schema.

YAML and schema errors name file:line:column and suggest the nearest valid key. The YAML node tree is kept only
to find those positions and the line of each rule. Before anything is built from it, the tree is bounded: no
duplicate keys, no alias cycles, no alias "bombs" that expand to billions of values, no absurd nesting. A `TODO`
left in any value (the placeholder `xatl mappings new` writes for what it could not fill in) is refused, each one
named by file and line, so that an unfinished scaffold never passes validation or converts.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from xatl_convert.errors import MappingError
from xatl_convert.mapping.schema import Mapping
from xatl_convert.regular_files import require_regular_file

BUILTIN_DIR_CANDIDATES = (
    Path(__file__).resolve().parent.parent / "builtin_mappings",  # installed wheel
    Path(__file__).resolve().parents[2] / "mappings",  # source checkout / editable install
)


MAX_MAPPING_BYTES = 4 * 1024 * 1024  # the built-in mappings are a few KB
MAX_YAML_NODES = 100_000  # values in a document with every alias expanded; a mapping has a few thousand
MAX_YAML_DEPTH = 64  # nesting; a mapping needs about 8
PLACEHOLDER = re.compile(r"\bTODO\b")  # what `xatl mappings new` writes where the user must decide
MAX_PLACEHOLDERS_NAMED = 12  # one error line names this many TODOs, then counts the rest


class YamlInputError(ValueError):
    """YAML that does not parse, or parses into what no mapping needs; `line`/`column` (1-based) say where."""

    def __init__(self, problem: str, mark: yaml.Mark | None = None, line: int | None = None) -> None:
        super().__init__(problem)
        self.line = mark.line + 1 if mark is not None else line
        self.column = mark.column + 1 if mark is not None else None

    def where(self, file: str) -> str:
        if self.line is None:
            return file
        return f"{file}:{self.line}:{self.column}" if self.column is not None else f"{file}:{self.line}"


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml's parser where installed: 5x faster
    """The safe loader, reading `1e-3` as a number as YAML 1.2 does (YAML 1.1 wants `1.0e-3`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def read_yaml(text: str) -> tuple[Any, yaml.Node | None]:
    """Parse one YAML document into (data, node tree), refusing what would hang, recurse or silently lose a key."""
    try:
        root = yaml.compose(text, Loader=_Loader)
        if root is None:
            return None, None
        _check_tree(root)
        return _construct(root), root
    except yaml.YAMLError as error:
        raise _invalid_yaml(error, text) from None
    except RecursionError:  # PyYAML's composer recurses once per level; _check_tree then bounds the depth
        raise YamlInputError(
            f"invalid YAML: nested far deeper than a mapping needs ({MAX_YAML_DEPTH} levels)"
        ) from None


def _construct(root: yaml.Node) -> Any:
    loader = _Loader("")
    try:
        return loader.construct_document(root)
    finally:
        loader.dispose()


def _invalid_yaml(error: yaml.YAMLError, text: str) -> YamlInputError:
    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        return YamlInputError(f"invalid YAML: {error.problem or error.context}", mark)
    if isinstance(error, yaml.reader.ReaderError):  # a control character; it carries an offset, not a mark
        line = text[: error.position].count("\n") + 1
        return YamlInputError(f"invalid YAML: {error.reason} (character #x{error.character:x})", line=line)
    return YamlInputError(f"invalid YAML: {error}")


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [child for pair in node.value for child in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_tree(root: yaml.Node) -> None:
    """Walk the node graph once (aliases share nodes; sizes are memoised per node) without recursion.

    Counts the values the document expands to, so that a "billion laughs" document is refused in milliseconds,
    and finds alias cycles (`a: &x [*x]`), which would otherwise recurse without end later.
    """
    sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (values when expanded, nesting depth)
    open_nodes: set[int] = set()  # the chain being walked: meeting one of them again is a cycle
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if children_done:
            open_nodes.discard(id(node))
            sizes[id(node)] = _measure(node, sizes)
            continue
        if id(node) in sizes:
            continue
        if id(node) in open_nodes:
            raise YamlInputError(
                "this value contains an alias (*name) of itself, so it would be infinite", node.start_mark
            )
        if isinstance(node, yaml.MappingNode):
            _check_duplicate_keys(node)
        open_nodes.add(id(node))
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in sizes)


def _measure(node: yaml.Node, sizes: dict[int, tuple[int, int]]) -> tuple[int, int]:
    measured = [sizes[id(child)] for child in _children(node)]
    size = 1 + sum(count for count, _ in measured)
    depth = 1 + max((depth for _, depth in measured), default=0)
    if size > MAX_YAML_NODES:
        raise YamlInputError(
            f"this value expands to more than {MAX_YAML_NODES:,} YAML values through aliases (*name); "
            "a mapping needs a few thousand at most",
            node.start_mark,
        )
    if depth > MAX_YAML_DEPTH:
        raise YamlInputError(f"nested more than {MAX_YAML_DEPTH} levels deep; a mapping needs about 8", node.start_mark)
    return size, depth


def _check_duplicate_keys(node: yaml.MappingNode) -> None:
    """PyYAML keeps the last of two equal keys; in a mapping that silently drops a setting or a rule."""
    first: dict[tuple[str, str], yaml.Mark] = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            continue
        identity = (key_node.tag, key_node.value)
        if identity in first:
            raise YamlInputError(
                f"duplicate key {key_node.value!r} (first at line {first[identity].line + 1}); keep one",
                key_node.start_mark,
            )
        first[identity] = key_node.start_mark


def builtin_mapping_dir() -> Path:
    """The folder that holds the built-in mappings, in an installed wheel or in a source checkout."""
    for candidate in BUILTIN_DIR_CANDIDATES:
        if candidate.is_dir():
            return candidate
    raise MappingError("built-in mappings folder is missing from this installation")


FAMILY_MIXERS = re.compile(r"^\s*mixer:\s*\[([^\]]*)\]", re.MULTILINE)


def builtin_mappings() -> dict[str, Path]:
    """Built-in mapping names and their files: a family file (`target.mixer: [mamba, mamba2]`) gives one name per
    mixer, FAMILY-to-MIXER; a single-mixer file is named by its stem. Read without parsing, so listing is cheap."""
    names: dict[str, Path] = {}
    for path in sorted(builtin_mapping_dir().glob("*.yaml")):
        found = FAMILY_MIXERS.search(path.read_text(encoding="utf-8"))
        mixers = [item.strip() for item in found.group(1).split(",")] if found else []
        named = {f"{path.stem}-to-{mixer.replace('_', '-')}": path for mixer in mixers}  # gated_deltanet: -deltanet
        names.update(named if mixers else {path.stem: path})
    return dict(sorted(names.items()))


def load_mapping(reference: str | Path) -> Mapping:
    """Load a mapping by built-in name (FAMILY-to-MIXER for a family file) or by file path."""
    path = Path(reference)
    if not path.exists() or path.is_dir():  # a folder is no mapping file: a built-in name may match it
        known = builtin_mappings()
        if str(reference) in known:
            mapping = parse_mapping(_read_text(known[str(reference)]), str(known[str(reference)]))
            prefix = f"{known[str(reference)].stem}-to-"
            if str(reference).startswith(prefix):
                return mapping.for_mixer(str(reference).removeprefix(prefix).replace("-", "_"))
            return mapping
        else:
            near = difflib.get_close_matches(str(reference), known, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f" (built-in: {', '.join(known)})"
            raise MappingError(f"{reference}: no such mapping file or built-in mapping{hint}")
    return parse_mapping(_read_text(path), str(path))


def _read_text(path: Path) -> str:
    """The file as UTF-8 text, or a MappingError that says why not."""
    require_regular_file(path, MappingError, "give a mapping YAML file")
    try:
        size = path.stat().st_size
        if size > MAX_MAPPING_BYTES:
            raise MappingError(f"{path}: {size:,} bytes is too large for a mapping file (at most "
                               f"{MAX_MAPPING_BYTES:,}); is it the right file?")  # fmt: skip
        data = path.read_bytes()
    except OSError as error:
        raise MappingError(f"{path}: cannot read the mapping file: {error.strerror or error}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise MappingError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[error.start]:02x}); save the mapping as UTF-8"
        ) from None


def parse_mapping(text: str, file: str = "<mapping>") -> Mapping:
    """Parse mapping YAML text; `file` names it in error messages."""
    try:
        data, root = read_yaml(text)
    except YamlInputError as error:
        raise MappingError(f"{error.where(file)}: {error}") from None
    if not isinstance(data, dict):
        raise MappingError(f"{file}:1:1: a mapping file is a YAML mapping with keys name, source, target, rules")
    _refuse_placeholders(root, file)
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


def _placeholders(root: yaml.Node | None) -> list[tuple[int, str]]:
    """(line, dotted key path) of every YAML key or value that still holds a TODO, in line order.

    A comment that mentions TODO is no placeholder (comments are not in the tree). A node that aliases share is
    named once, at its anchor.
    """
    found: list[tuple[int, str]] = []
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, str]] = [(root, "")] if root is not None else []
    while stack:  # children are pushed last first, so that nodes are met in document order
        node, path = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.ScalarNode) and PLACEHOLDER.search(str(node.value)):
            found.append((node.start_mark.line + 1, path or "(top level)"))
        elif isinstance(node, yaml.MappingNode):
            for key_node, value_node in reversed(node.value):
                key = f"{path}.{key_node.value}" if path else str(key_node.value)
                stack += [(value_node, key), (key_node, key)]
        elif isinstance(node, yaml.SequenceNode):
            stack += [(item, f"{path}[{index}]") for index, item in reversed(list(enumerate(node.value)))]
    return sorted(set(found))


def _refuse_placeholders(root: yaml.Node | None, file: str) -> None:
    """One MappingError naming every TODO left (`FILE:LINE: TODO left: KEY`), so that one run lists all the work."""
    found = _placeholders(root)
    if not found:
        return
    named = [f"{file}:{line}: TODO left: {path}" for line, path in found[:MAX_PLACEHOLDERS_NAMED]]
    if len(found) > len(named):
        named.append(f"{len(found) - len(named)} more")
    advice = "fill it in" if len(found) == 1 else f"fill them in ({len(found)} TODOs)"
    raise MappingError(f"{'; '.join(named)}; {advice}")


def locate(mapping: Mapping, path: tuple[Any, ...]) -> str:
    """FILE:LINE:COL of a key in a loaded mapping (or of its nearest enclosing value), for errors found once bound."""
    node = _node_at(_tree_of(mapping), path)
    return _position(node, mapping.file)


def describe_bound_error(mapping: Mapping, error: ValidationError) -> str:
    """A schema error found after `${...}` was evaluated, named by FILE:LINE:COL like one found on loading."""
    return _describe_validation_error(error, _tree_of(mapping), mapping.file)


def _tree_of(mapping: Mapping) -> yaml.Node | None:
    try:
        return read_yaml(mapping.text)[1]
    except YamlInputError:  # text set by hand that does not parse: no positions to give
        return None


def _position(node: yaml.Node | None, file: str) -> str:
    return f"{file}:{node.start_mark.line + 1}:{node.start_mark.column + 1}" if node is not None else file


def _describe_validation_error(error: ValidationError, root: yaml.Node | None, file: str) -> str:
    # an unknown key first; else the deepest error, which for a union is the member the value was meant to be
    problem = min(error.errors(), key=lambda item: (item["type"] != "extra_forbidden", -len(item["loc"])))
    location = tuple(part for part in problem["loc"] if not _is_union_tag(part))
    position = _position(_node_at(root, location), file)
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
        # a dict checked against a model's keys (target.config) names that model as its JSON Schema input type
        declared = [getattr(item, "json_schema_input_type", None) for item in field.metadata]
        inner = _model_in(field.annotation) or next((_model_in(kind) for kind in declared if kind), None)
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
