"""`${source.key}` expressions in mapping files, evaluated without `eval`.

An expression reads keys of the source config (nested with dots) and combines integers with + - * // % and
parentheses. `a or b` gives the first operand that exists and is not null, for keys that only some source configs
carry (`${source.head_dim or source.hidden_size // source.num_attention_heads}`), and `a if x == y else b` chooses
by a comparison (`==`, `!=`) for what differs between model types. A value that is exactly one
`${...}` keeps the result's type; an expression inside a longer string is interpolated as text.
"""

from __future__ import annotations

import ast
import difflib
import operator
import re
from collections.abc import Callable, Mapping
from typing import Any

EXPRESSION = re.compile(r"\$\{([^}]*)\}")

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Div: operator.truediv,
}
_COMPARE: dict[type[ast.cmpop], Callable[[Any, Any], bool]] = {ast.Eq: operator.eq, ast.NotEq: operator.ne}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}


class ExpressionError(ValueError):
    """An expression that does not parse, uses a forbidden construct, or names an unknown key."""


class _MissingKey(ExpressionError):
    """A key that the config does not have (an `or` moves on to its next alternative)."""


def is_expression(value: object) -> bool:
    return isinstance(value, str) and EXPRESSION.search(value) is not None


def evaluate(text: str, namespace: Mapping[str, Any]) -> Any:
    """Evaluate one expression body (without `${}`) against a namespace such as {"source": config}."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        raise ExpressionError(f"cannot parse expression ${{{text}}}") from None
    return _evaluate_node(tree.body, namespace, text)


def substitute(value: Any, namespace: Mapping[str, Any]) -> Any:
    """Replace every `${...}` in a YAML value (recursively through lists and dicts)."""
    if isinstance(value, dict):
        return {key: substitute(item, namespace) for key, item in value.items()}
    if isinstance(value, list):
        return [substitute(item, namespace) for item in value]
    if not isinstance(value, str):
        return value
    whole = EXPRESSION.fullmatch(value.strip())
    if whole:
        return evaluate(whole.group(1), namespace)
    return EXPRESSION.sub(lambda match: str(evaluate(match.group(1), namespace)), value)


def _evaluate_node(node: ast.AST, namespace: Mapping[str, Any], text: str) -> Any:
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float | str | bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left = _evaluate_node(node.left, namespace, text)
        right = _evaluate_node(node.right, namespace, text)
        _require_number(left, text)
        _require_number(right, text)
        try:
            return _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ExpressionError(f"division by zero in ${{{text}}}") from None
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        operand = _evaluate_node(node.operand, namespace, text)
        _require_number(operand, text)
        return _UNARY[type(node.op)](operand)
    if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or):
        for operand in node.values:
            try:
                value = _evaluate_node(operand, namespace, text)
            except _MissingKey:
                continue
            if value is not None:
                return value
        raise ExpressionError(f"${{{text}}}: none of the alternatives exists in the source config")
    if isinstance(node, ast.IfExp):
        condition = _evaluate_node(node.test, namespace, text)
        return _evaluate_node(node.body if condition else node.orelse, namespace, text)
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _COMPARE:
        left = _evaluate_node(node.left, namespace, text)
        right = _evaluate_node(node.comparators[0], namespace, text)
        return _COMPARE[type(node.ops[0])](left, right)
    if isinstance(node, ast.Name | ast.Attribute):
        return _lookup(_dotted_name(node, text), namespace, text)
    raise ExpressionError(
        f"${{{text}}}: only config keys, constants, + - * / // %, `or`, `==`, `!=` and `a if c else b` are allowed, "
        f"not {type(node).__name__}"
    )


def _dotted_name(node: ast.AST, text: str) -> list[str]:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        raise ExpressionError(f"${{{text}}}: expected a dotted name such as source.hidden_size")
    parts.append(node.id)
    return parts[::-1]


def _lookup(parts: list[str], namespace: Mapping[str, Any], text: str) -> Any:
    value: Any = namespace
    walked: list[str] = []
    for part in parts:
        if not isinstance(value, Mapping) or part not in value:
            known = sorted(value) if isinstance(value, Mapping) else []
            near = difflib.get_close_matches(part, known, n=1)
            hint = f"; did you mean {'.'.join([*walked, near[0]])!r}?" if near else ""
            raise _MissingKey(f"${{{text}}}: unknown key {'.'.join([*walked, part])!r}{hint}")
        value = value[part]
        walked.append(part)
    return value


def _require_number(value: Any, text: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ExpressionError(f"${{{text}}}: arithmetic on a non-number ({value!r})")
