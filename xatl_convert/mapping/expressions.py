"""`${source.key}` expressions in mapping files, evaluated without `eval`.

An expression reads keys of the source config (nested with dots) and combines numbers with + - * / // % ** and
parentheses. `a or b` gives the first operand that exists and is not null (null when the ones that exist are all
null: `source.sliding_window or None`), for keys that only some source configs carry
(`${source.head_dim or source.hidden_size // source.num_attention_heads}`), and `a if x == y else b` chooses by a
comparison (== != < <= > >=, joined with `and`, negated with `not`) for what differs between model types. A value
that is exactly one `${...}` keeps the result's type; an expression inside a longer string is interpolated as text.
An expression is at most 1,000 characters and its numbers stay within ±2**63, so that a typo cannot hang the parser
or size a tensor.
"""

from __future__ import annotations

import ast
import difflib
import math
import operator
import re
from collections.abc import Callable, Mapping
from typing import Any

EXPRESSION = re.compile(r"\$\{([^}]*)\}")
MAX_EXPRESSION_CHARS = 1000  # the longest built-in expression is under 100
MAX_INTEGER = 2**63  # no config value or tensor dimension comes near; beyond it, arithmetic is a runaway

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Div: operator.truediv,
}
_COMPARE: dict[type[ast.cmpop], Callable[[Any, Any], bool]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}
_ORDERED = (ast.Lt, ast.LtE, ast.Gt, ast.GtE)
MAX_EXPONENT = 64  # ** is for roots and small powers (Gemma's sqrt(hidden_size) is `** 0.5`)
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}


class ExpressionError(ValueError):
    """An expression that does not parse, uses a forbidden construct, or names an unknown key.

    `path` is where the expression sits in the mapping (keys and list indexes), once `substitute` knows it.
    """

    path: tuple[Any, ...] = ()


class _MissingKey(ExpressionError):
    """A key that the config does not have (an `or` moves on to its next alternative)."""


def is_expression(value: object) -> bool:
    return isinstance(value, str) and EXPRESSION.search(value) is not None


def evaluate(text: str, namespace: Mapping[str, Any]) -> Any:
    """Evaluate one expression body (without `${}`) against a namespace such as {"source": config}."""
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(f"{_shown(text)}: {len(text):,} characters is longer than an expression may be "
                              f"({MAX_EXPRESSION_CHARS:,}); split it or simplify it")  # fmt: skip
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError):  # ValueError: a NUL character
        raise ExpressionError(f"cannot parse expression {_shown(text)}") from None
    except (RecursionError, MemoryError):
        raise ExpressionError(f"{_shown(text)}: nested too deeply to parse") from None
    try:
        return _evaluate_node(tree.body, namespace, text)
    except RecursionError:
        raise ExpressionError(f"{_shown(text)}: nested too deeply to evaluate") from None


def substitute(value: Any, namespace: Mapping[str, Any], path: tuple[Any, ...] = ()) -> Any:
    """Replace every `${...}` in a YAML value (recursively through lists and dicts); errors learn their `path`."""
    if isinstance(value, dict):
        return {key: substitute(item, namespace, (*path, key)) for key, item in value.items()}
    if isinstance(value, list):
        return [substitute(item, namespace, (*path, index)) for index, item in enumerate(value)]
    if not isinstance(value, str):
        return value
    try:
        whole = EXPRESSION.fullmatch(value.strip())
        if whole:
            return evaluate(whole.group(1), namespace)
        return EXPRESSION.sub(lambda match: str(evaluate(match.group(1), namespace)), value)
    except ExpressionError as error:
        error.path = path
        raise


def _shown(text: str) -> str:
    """The expression as written, cut short: a message stays one readable line."""
    body = text if len(text) <= 80 else text[:77] + "..."
    return f"${{{body}}}"


def _evaluate_node(node: ast.AST, namespace: Mapping[str, Any], text: str) -> Any:
    if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, int | float | str | bool)):
        return _bounded(node.value, text)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        base, exponent = (_evaluate_node(side, namespace, text) for side in (node.left, node.right))
        _require_number(base, text)
        _require_number(exponent, text)
        if abs(exponent) > MAX_EXPONENT:
            raise ExpressionError(f"{_shown(text)}: an exponent beyond ±{MAX_EXPONENT}")
        if base < 0 and not float(exponent).is_integer():
            raise ExpressionError(f"{_shown(text)}: a fractional power of a negative number")
        try:
            return _bounded(base**exponent, text)
        except (OverflowError, ZeroDivisionError):
            raise ExpressionError(f"{_shown(text)}: the power is not a finite number") from None
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left = _evaluate_node(node.left, namespace, text)
        right = _evaluate_node(node.right, namespace, text)
        _require_number(left, text)
        _require_number(right, text)
        try:
            return _bounded(_BINARY[type(node.op)](left, right), text)
        except ZeroDivisionError:
            raise ExpressionError(f"division by zero in {_shown(text)}") from None
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return not _evaluate_node(node.operand, namespace, text)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        operand = _evaluate_node(node.operand, namespace, text)
        _require_number(operand, text)
        return _UNARY[type(node.op)](operand)
    if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or):
        existed = False
        for operand in node.values:
            try:
                value = _evaluate_node(operand, namespace, text)
            except _MissingKey:
                continue
            if value is not None:
                return value
            existed = True
        if existed:  # `source.sliding_window or None`: every alternative that exists is null
            return None
        raise ExpressionError(f"{_shown(text)}: none of the alternatives exists in the source config")
    if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.And):
        value = True
        for operand in node.values:
            value = _evaluate_node(operand, namespace, text)
            if not value:
                return value
        return value
    if isinstance(node, ast.IfExp):
        condition = _evaluate_node(node.test, namespace, text)
        return _evaluate_node(node.body if condition else node.orelse, namespace, text)
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _COMPARE:
        left = _evaluate_node(node.left, namespace, text)
        right = _evaluate_node(node.comparators[0], namespace, text)
        if isinstance(node.ops[0], _ORDERED):
            _require_number(left, text)
            _require_number(right, text)
        return _COMPARE[type(node.ops[0])](left, right)
    if isinstance(node, ast.Name | ast.Attribute):
        return _lookup(_dotted_name(node, text), namespace, text)
    raise ExpressionError(
        f"{_shown(text)}: only config keys, constants (numbers, text, true/false, None), + - * / // % **, `or`, "
        "`and`, `not`, comparisons (== != < <= > >=) and `a if c else b` are allowed, "
        f"not {type(node).__name__}"
    )


def _dotted_name(node: ast.AST, text: str) -> list[str]:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        raise ExpressionError(f"{_shown(text)}: expected a dotted name such as source.hidden_size")
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
            raise _MissingKey(f"{_shown(text)}: unknown key {'.'.join([*walked, part])!r}{hint}")
        value = value[part]
        walked.append(part)
    return value


def _require_number(value: Any, text: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ExpressionError(f"{_shown(text)}: arithmetic on a non-number ({repr(value)[:60]})")
    _bounded(value, text)  # a source config value too: 10**400 * 1.5 would raise OverflowError


def _bounded(value: Any, text: str) -> Any:
    """Refuse runaway numbers before they become a config value, a shape or a 38 TB allocation."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INTEGER:
        raise ExpressionError(f"{_shown(text)}: an integer beyond 2**63 (no model dimension is near that)")
    if isinstance(value, float) and not math.isfinite(value):
        raise ExpressionError(f"{_shown(text)}: the result is not a finite number ({value})")
    return value
