"""The two rules of vLLM's pythonic tool-call reading that our parser applies, without importing vLLM.

`pipeline.tools` is pure logic (the job's driver and the unit tests use it without the engine stack), so
these follow vLLM 0.29's `vllm.tool_parsers.utils.escape_ctrl_chars_in_strings` and `get_parameter_value`
rule for rule, and tests/unit/tools/test_tool_parser.py compares them with vLLM's own on the same inputs: a vLLM
upgrade that changes what a call argument may be fails that test instead of drifting silently.

- `escape_control_chars_in_strings`: models put raw newlines, tabs or NUL bytes inside string arguments;
  escaping them inside string literals only makes the text parseable with the value unchanged.
- `literal_value`: an argument is a JSON value written as a Python literal (JSON's null/true/false
  accepted too); anything else (a name, a call, an f-string with placeholders) raises NotALiteral.
"""
from __future__ import annotations

import ast
from typing import Any

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\x00": "\\x00"}
_JSON_NAMES = {"null": None, "true": True, "false": False}


class NotALiteral(ValueError):
    """An argument that is not a JSON-representable literal."""


def escape_control_chars_in_strings(text: str) -> str:
    """Escape \\n, \\r, \\t and NUL inside '...' or "..." literals; text outside them is unchanged."""
    out: list[str] = []
    quote = None
    index, length = 0, len(text)
    while index < length:
        char = text[index]
        if quote is None:
            if char in ("'", '"'):
                quote = char
            out.append(char)
        elif char == "\\" and index + 1 < length:
            out.append(text[index:index + 2])  # an escape sequence, kept whole (it may escape the quote)
            index += 2
            continue
        elif char == quote:
            quote = None
            out.append(char)
        else:
            out.append(_ESCAPES.get(char, char))
        index += 1
    return "".join(out)


def literal_value(node: ast.expr) -> Any:
    """The JSON value an argument's AST node writes; NotALiteral for anything else."""
    if isinstance(node, ast.Constant):
        if node.value is None or isinstance(node.value, (str, int, float)):  # bool is an int
            return node.value
        raise NotALiteral("bytes, Ellipsis and complex numbers have no JSON form")
    if isinstance(node, ast.Dict):
        if not all(isinstance(key, ast.Constant) for key in node.keys):
            raise NotALiteral("dict keys must be literals")
        return {key.value: literal_value(value) for key, value in zip(node.keys, node.values)}  # type: ignore
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):  # JSON has only arrays; order as written
        return [literal_value(item) for item in node.elts]
    if isinstance(node, ast.JoinedStr) and all(isinstance(part, ast.Constant) for part in node.values):
        return "".join(str(part.value) for part in node.values)  # type: ignore[union-attr]  # f'text'
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = literal_value(node.operand)
        if isinstance(operand, (int, float)) and not isinstance(operand, bool):
            return -operand if isinstance(node.op, ast.USub) else operand
    raise NotALiteral(f"not a literal: {type(node).__name__}")
