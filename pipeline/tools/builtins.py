"""The built-in tools: exact arithmetic, lookup in a configured table, the record's image metadata.

`builtin_definitions(tools)` gives the definitions the model is shown (pure, cheap: the driver calls it
per record); `build_registry(config)` also loads the lookup tables, once per engine replica, and fails
loudly on a missing file or key column, since that dooms every record.
"""
from __future__ import annotations

import ast
import logging
import operator
from decimal import Decimal, localcontext
from fractions import Fraction
from typing import Any, Callable, Optional

from pipeline.config import PipelineConfig, StorageSection, TableSection, ToolsSection
from pipeline.tools.registry import Tool, ToolContext, ToolFailure, ToolRegistry

logger = logging.getLogger(__name__)

MAX_EXPRESSION_CHARS = 500
MAX_RESULT_BITS = 4096          # numerator/denominator size at which arithmetic stops (~1200 digits)
MAX_ROWS_PER_KEY = 10
DECIMAL_DIGITS = 30


# ------------------------------------------------------------------------------------------ calculate
_OPERATORS: dict[type, Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
}

CALCULATE_PARAMETERS = {
    "type": "object",
    "properties": {"expression": {
        "type": "string",
        "description": "Arithmetic with + - * / // % ** and parentheses on integers and decimals, "
                       "e.g. \"(1.1 + 2.2) * 3 / 7\"",
    }},
    "required": ["expression"],
    "additionalProperties": False,
}


def calculate(arguments: dict[str, Any], context: ToolContext) -> dict[str, Any]:
    """Evaluate arithmetic exactly, on fractions: 0.1 + 0.2 is 3/10, not 0.30000000000000004.

    The expression is read with `ast.parse` and only number literals, + - * / // % **, unary signs and
    parentheses are evaluated; sizes are bounded, so `9**9**9` is refused rather than run.
    """
    expression = arguments["expression"]
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolFailure(f"expression is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as exc:
        raise ToolFailure(f"cannot read {expression!r}: {exc.msg}") from None
    value = _evaluate(tree.body)
    return {"expression": expression, **describe_number(value)}


def describe_number(value: Fraction) -> dict[str, Any]:
    """The exact value ("7/2") and its decimal form, which is exact unless the fraction repeats."""
    denominator = value.denominator
    for factor in (2, 5):
        while denominator % factor == 0:
            denominator //= factor
    terminates = denominator == 1
    with localcontext() as ctx:
        # A terminating fraction needs at most digits(numerator) + ~3.3 x digits(denominator) digits.
        ctx.prec = len(str(abs(value.numerator))) + 4 * len(str(value.denominator)) + 2 if terminates \
            else DECIMAL_DIGITS
        decimal = format(Decimal(value.numerator) / Decimal(value.denominator), "f")
    if "." in decimal:
        decimal = decimal.rstrip("0").rstrip(".")
    return {"result": str(value), "decimal": decimal, "decimal_is_exact": terminates}


def _evaluate(node: ast.expr) -> Fraction:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        # Decimal literals become exact fractions of what was written (repr of the float: "0.1" -> 1/10).
        return Fraction(repr(node.value)) if isinstance(node.value, float) else Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            return _checked(_power(left, right))
        apply = _OPERATORS.get(type(node.op))
        if isinstance(node.op, ast.BitXor):
            raise ToolFailure("^ is not a power here: write ** (2**10)")
        if apply is None:
            raise ToolFailure(f"operator {type(node.op).__name__} is not supported")
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
            raise ToolFailure("division by zero")
        return _checked(apply(left, right))
    raise ToolFailure(f"only numbers and + - * / // % ** are allowed, not {ast.unparse(node)!r}")


def _power(base: Fraction, exponent: Fraction) -> Fraction:
    if exponent.denominator != 1:
        raise ToolFailure("only integer powers are exact; use an integer exponent")
    bits = max(abs(base.numerator), base.denominator).bit_length()
    if bits * abs(exponent.numerator) > MAX_RESULT_BITS:
        raise ToolFailure(f"the result would exceed {MAX_RESULT_BITS} bits")
    if base == 0 and exponent < 0:
        raise ToolFailure("division by zero")
    return base ** exponent.numerator


def _checked(value: Fraction) -> Fraction:
    if max(abs(value.numerator), value.denominator).bit_length() > MAX_RESULT_BITS:
        raise ToolFailure(f"the result would exceed {MAX_RESULT_BITS} bits")
    return value


# --------------------------------------------------------------------------------------------- lookup
def lookup_parameters(tables: dict[str, TableSection]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "table": {"type": "string", "enum": sorted(tables),
                      "description": "; ".join(f"{name}: {t.description or 'keyed by ' + t.key_column}"
                                               for name, t in sorted(tables.items()))},
            "key": {"type": "string", "description": "The value of the table's key column to find."},
        },
        "required": ["table", "key"],
        "additionalProperties": False,
    }


class TableLookup:
    """Rows of the configured tables by key (compared as text), loaded once."""

    def __init__(self, tables: dict[str, TableSection], storage: StorageSection):
        self.index = {name: load_table_index(spec, storage) for name, spec in tables.items()}

    def __call__(self, arguments: dict[str, Any], context: ToolContext) -> dict[str, Any]:
        table, key = arguments["table"], str(arguments["key"])
        rows = self.index[table].get(key.strip(), [])
        return {"table": table, "key": key, "found": bool(rows), "rows": rows[:MAX_ROWS_PER_KEY]}


def load_table_index(spec: TableSection, storage: StorageSection) -> dict[str, list[dict[str, Any]]]:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from pipeline.io.storage import make_filesystem

    fs, path = make_filesystem(storage, spec.path)
    if spec.path.lower().endswith(".csv"):
        with fs.open_input_stream(path) as stream:
            table = pacsv.read_csv(stream)
    else:
        table = pq.read_table(path, filesystem=fs)
    if spec.key_column not in table.column_names:
        raise ValueError(f"table {spec.path} has no key column {spec.key_column!r} "
                         f"(columns: {', '.join(table.column_names)})")
    index: dict[str, list[dict[str, Any]]] = {}
    for row in table.to_pylist():
        key = row.get(spec.key_column)
        if key is not None:
            index.setdefault(str(key).strip(), []).append(row)
    logger.info("lookup table %s: %d rows, %d keys", spec.path, table.num_rows, len(index))
    return index


# ------------------------------------------------------------------------------------- image_metadata
def image_metadata(arguments: dict[str, Any], context: ToolContext) -> dict[str, Any]:
    if context.image_info is None:
        raise ToolFailure("this record's image has no metadata")
    return context.image_info


# ------------------------------------------------------------------------------------------- registry
_DESCRIPTIONS = {
    "calculate": "Exact arithmetic. Returns the exact result as a fraction and a decimal.",
    "lookup": "Find the rows of a reference table whose key column equals a value.",
    "image_metadata": "Metadata of the image in this conversation as it was stored: width and height in "
                      "pixels, file format, colour mode, size in bytes and EXIF fields (camera, date...).",
}
_NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


def _parameters(name: str, tools: ToolsSection) -> dict[str, Any]:
    return {"calculate": CALCULATE_PARAMETERS, "image_metadata": _NO_ARGUMENTS}.get(name) \
        or lookup_parameters(tools.tables)


def builtin_definitions(tools: ToolsSection) -> list[dict[str, Any]]:
    """OpenAI definitions of the configured built-ins, in config order (no table is read)."""
    return [Tool(name, _DESCRIPTIONS[name], _parameters(name, tools), run=_unused).definition()
            for name in tools.builtins]


def build_registry(config: PipelineConfig) -> ToolRegistry:
    """The registry of the configured built-ins; reads the lookup tables (raises if one is unusable)."""
    tools = config.tools
    runners: dict[str, Callable[[dict[str, Any], ToolContext], Any]] = {
        "calculate": calculate, "image_metadata": image_metadata}
    if "lookup" in tools.builtins:
        runners["lookup"] = TableLookup(tools.tables, config.storage)
    return ToolRegistry([Tool(name, _DESCRIPTIONS[name], _parameters(name, tools), runners[name])
                         for name in tools.builtins], max_result_chars=tools.max_result_chars)


def _unused(arguments: dict[str, Any], context: ToolContext) -> Optional[Any]:
    raise RuntimeError("definitions only")
