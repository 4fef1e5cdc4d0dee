"""A checkpoint's config.json as transformers' own config class, with every value of the wrong type as one line.

transformers 5 builds its configs as strict dataclasses: a string, float or null where an int or bool belongs raises
`StrictDataclassFieldValidationError`, whose text is two lines and names no file. Every source config is built
here (`open_checkpoint` builds it once to check it, the planner and verify's source twin build it to use it), so
every command says the same thing: the file, the field, what it must be and what it is.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import sys
import types
import typing
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any

from xatl_convert.errors import SourceError, XatlError, first_line
from xatl_convert.json_files import json_type

# How a field's annotation reads in a message. A float field refuses a JSON integer (1 is not 1.0 to the validator).
_TYPE_WORDS = {
    "int": "an int",
    "bool": "true or false",
    "float": "a float",
    "str": "a string",
    "None": "null",
    "NoneType": "null",
    "list": "a list",
    "tuple": "a list",
    "dict": "an object",
}
_FIELD = re.compile(r"field '([^']*)'")


def transformers_config(config: dict[str, Any], path: Path) -> Any | None:
    """transformers' config for the checkpoint's model_type, built from config.json (`path`) as `from_pretrained`
    builds it, without remote code. None when transformers does not know the model_type, or cannot build its config
    for a reason other than a value it refuses (then the raw names are all there is). A refused value is one
    SourceError that names the file and the field."""
    config_class = _config_class(config.get("model_type"))
    if config_class is None:
        return None
    check_field_types(config_class, config, path, SourceError)
    from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError

    try:
        return config_class.from_dict(copy.deepcopy(config))  # it may normalise nested values in place
    except StrictDataclassFieldValidationError as error:  # a value set in __post_init__, not read from the file
        match = _FIELD.search(str(error))
        field = match.group(1) if match else "?"
        raise SourceError(f"{path}: field {field!r}: {first_line(error.__cause__ or error)}") from None
    except StrictDataclassClassValidationError as error:
        reason = first_line(error.__cause__ or error)
        raise SourceError(f"{path}: transformers' {config_class.__name__} refuses it: {reason}") from None
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def check_field_types(
    config_class: type, config: dict[str, Any], path: Path, error_type: type[XatlError], remedy: str = ""
) -> None:
    """Check each field that config.json sets against the config class's annotation, with huggingface_hub's own
    validator, as the strict dataclass checks it on construction, and also the fields that transformers leaves
    unchecked (the base class's annotations are text, which the validator skips). The first refused value raises
    `error_type` naming the file, the key, what it must be and what it is."""
    from huggingface_hub.dataclasses import type_validator

    fields = {field.name: field for field in dataclasses.fields(config_class)} if is_dataclass(config_class) else {}
    renamed: dict[str, str] = getattr(config_class, "attribute_map", None) or {}
    validators: dict[str, list[Any]] = getattr(config_class, "__validators__", None) or {}
    tail = f"; {remedy}" if remedy else ""
    for key, value in config.items():
        name = renamed.get(key, key)  # GPT-2's n_layer and num_hidden_layers are one field
        if name not in fields:
            continue
        annotation = _annotation(config_class, fields[name])
        try:
            if annotation is not None:
                type_validator(name, value, annotation)
        except TypeError:
            expected, shown = _expected(annotation), _shown(value)
            if "a float" in expected and isinstance(value, int) and not isinstance(value, bool):
                shown += f" (write {value}.0)"
            raise error_type(f"{path}: field {key!r} must be {expected}, got {shown}{tail}") from None
        for validator in validators.get(name, ()):  # a field's own checks (a range, a choice), if it has any
            try:
                validator(value)
            except (TypeError, ValueError) as error:
                raise error_type(f"{path}: field {key!r}: {first_line(error)}{tail}") from None


def _annotation(config_class: type, field: dataclasses.Field[Any]) -> Any | None:
    """The field's type; an annotation kept as text is evaluated where it was written (None if it cannot be)."""
    if not isinstance(field.type, str):
        return field.type
    owner = next((cls for cls in config_class.__mro__ if field.name in vars(cls).get("__annotations__", {})), None)
    module = sys.modules.get(owner.__module__) if owner is not None else None
    try:  # transformers' own annotation text, e.g. "str | torch.dtype | None", where torch is imported for typing only
        return eval(field.type, vars(module) if module else {}, {"torch": sys.modules.get("torch")})
    except (NameError, SyntaxError, AttributeError, TypeError):  # left unchecked, as transformers leaves it
        return None


def _config_class(model_type: object) -> type | None:
    if not isinstance(model_type, str) or not model_type:
        return None
    try:
        from transformers import CONFIG_MAPPING

        # not CONFIG_MAPPING.get(): it misses the classes that the mapping loads lazily
        return CONFIG_MAPPING[model_type] if model_type in CONFIG_MAPPING else None  # noqa: SIM401
    except (ImportError, KeyError, AttributeError):  # a model whose config module does not import here
        return None


def _expected(annotation: object) -> str:
    """'an int', 'an int or null', 'true or false', ... for a field's type."""
    words = list(dict.fromkeys(_kinds(annotation)))
    if "a float" in words and "an int" in words:
        words[words.index("a float")] = "a number"
        words.remove("an int")
    return " or ".join(words)


def _kinds(annotation: object) -> list[str]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return [kind for argument in typing.get_args(annotation) for kind in _kinds(argument)]
    if origin is typing.Literal:
        return ["one of " + ", ".join(repr(choice) for choice in typing.get_args(annotation))]
    base = origin or annotation
    name = getattr(base, "__name__", str(base))
    return [_TYPE_WORDS.get(name, name)]


def _shown(value: object) -> str:
    """A config value as config.json spells it, with its JSON type where the spelling alone hides it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, int | float):
        return repr(value)
    text = repr(value)
    return f"{text if len(text) <= 80 else text[:79] + '…'} ({json_type(value)})"
