"""Gemma 3 tool calls: find the call list in the model's text, read it, check it against the tools.

Gemma 3 has no tool tokens. Our chat template (templates/gemma3_tools.jinja) asks it for a Python-style
list of calls, `[get_weather(city="Paris")]`, and the model writes that list alone, after some text, or
inside a ```tool_code / ```python fence (Google's own Gemma examples use the fence, with bare calls on
their own lines); an output may hold several such blocks, each read in order. vLLM's `pythonic` parser
only accepts output that starts with `[`, so this module first *locates* the call blocks and then reads
each by vLLM's pythonic rules (`ast.parse`, never `eval`; arguments are literals only, including JSON's
true/false/null: pipeline.tools.literals, held to vLLM's own helpers by a test). Every call is then
checked against its tool's JSON schema with `jsonschema`.

Nothing here raises on bad model output: an unparseable block, an unknown tool or arguments of the
wrong type come back as `CallError`s, so batch turns them into error rows and the online parser into
plain content. `locate_blocks(text, final=False)` also answers for a text that is still being streamed:
whether a block may be starting at its end, so the streaming parser knows what it must hold back.
"""
from __future__ import annotations

import ast
import enum
import json
import logging
import re
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping, Optional, Sequence

from pipeline.tools.literals import NotALiteral, escape_control_chars_in_strings, literal_value

logger = logging.getLogger(__name__)

# Fence languages that always hold tool calls, and those that hold them only when the block is nothing
# but calls (a ```python block may just as well be code the user asked for).
TOOL_FENCES = frozenset({"tool_code", "tool_call", "tool_calls"})
CODE_FENCES = frozenset({"python", "py", ""})
_FENCE = "```"
# The start of a bare call list: "[" then a (dotted) name and "(".
_LIST_START = re.compile(r"\[\s*[A-Za-z_][\w.]*\s*\(")
# What may still grow into a list start at the very end of a streamed text.
_PARTIAL_LIST_START = re.compile(r"\[\s*(?:[A-Za-z_][\w.]*\s*)?$")
_PARTIAL_FENCE = re.compile(r"`{1,2}$")


class CallProblem(str, enum.Enum):
    MALFORMED = "malformed"                  # the block is not a readable list of calls
    UNKNOWN_TOOL = "unknown_tool"            # the call names a tool the request did not offer
    INVALID_ARGUMENTS = "invalid_arguments"  # the arguments do not match the tool's JSON schema


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "arguments": self.arguments}


@dataclass(frozen=True)
class CallError:
    problem: CallProblem
    message: str
    index: Optional[int] = None   # position of the call in its block (0-based), when known
    name: Optional[str] = None

    def __str__(self) -> str:
        where = ""
        if self.index is not None:
            where = f"call {self.index + 1}" + (f" ({self.name})" if self.name else "") + ": "
        return f"{where}{self.message}"


@dataclass(frozen=True)
class Block:
    """Where the call block sits in the text: [start, end), and the source of the calls inside."""

    start: int
    end: int
    source: str
    fenced: bool


@dataclass(frozen=True)
class Pending:
    """A streamed text whose tail, from `start`, may still become a call block."""

    start: int


@dataclass(frozen=True)
class BlockCalls:
    """One call block as read: its calls, and what was wrong with them (call indexes count from the
    first call of the whole output, so an error names the same call whichever block holds it)."""

    block: Block
    calls: tuple[ToolCall, ...]
    errors: tuple[CallError, ...]


@dataclass(frozen=True)
class ParsedOutput:
    """One model turn: the text around the calls, the calls of every block, and what was wrong with them."""

    content: Optional[str]
    calls: tuple[ToolCall, ...] = ()
    errors: tuple[CallError, ...] = ()
    blocks: tuple[Block, ...] = field(default=(), compare=False)

    @property
    def ok(self) -> bool:
        return not self.errors

    def describe_errors(self) -> str:
        return "; ".join(str(e) for e in self.errors)


# ----------------------------------------------------------------------------------------- public API
def parse_tool_calls(text: str, tools: Optional[Sequence[Mapping[str, Any]]]) -> ParsedOutput:
    """Locate, read and check the tool calls of every block in a complete model output, in order.

    `tools` are OpenAI tool definitions (`{"type": "function", "function": {"name", "parameters"}}`);
    None skips the name and schema checks. `content` is the text outside the call blocks, stripped
    (None when nothing is left). The errors of every block are kept: one bad block among good ones
    still makes the output not `ok`.
    """
    read = read_blocks(text, tools)
    if not read:
        return ParsedOutput(content=_strip(text))
    return ParsedOutput(content=_strip(text_outside(text, [r.block for r in read])),
                        calls=tuple(c for r in read for c in r.calls),
                        errors=tuple(e for r in read for e in r.errors),
                        blocks=tuple(r.block for r in read))


def read_blocks(text: str, tools: Optional[Sequence[Mapping[str, Any]]]) -> list[BlockCalls]:
    """Every call block of a complete output, read and checked on its own, in order."""
    blocks, _ = locate_blocks(text, final=True)
    read, first_index = [], 0
    for block in blocks:
        calls, errors = read_calls(block.source, fenced=block.fenced)
        written = len(calls) + sum(1 for e in errors if e.index is not None)  # calls the block holds
        if not errors and tools is not None:
            errors = check_calls(calls, tools)
        errors = [replace(e, index=e.index + first_index) if e.index is not None else e for e in errors]
        read.append(BlockCalls(block, tuple(calls), tuple(errors)))
        first_index += written
    return read


def text_outside(text: str, blocks: Sequence[Block]) -> str:
    """`text` without the given blocks (which are in order and do not overlap)."""
    pieces, position = [], 0
    for block in blocks:
        pieces.append(text[position:block.start])
        position = block.end
    pieces.append(text[position:])
    return "".join(pieces)


def locate_blocks(text: str, *, final: bool) -> tuple[list[Block], Optional[Pending]]:
    """Every complete tool-call block in `text`, in order; with final=False, also a tail after the
    last one that may still become a block (None when there is none)."""
    blocks: list[Block] = []
    position = 0
    while True:
        found = locate_block(text, final=final, start=position)
        if not isinstance(found, Block):
            return blocks, found
        blocks.append(found)
        position = found.end


def locate_block(text: str, *, final: bool, start: int = 0) -> Block | Pending | None:
    """The first tool-call block in `text` from `start`; with final=False, also a tail that may still
    become one."""
    position = start
    while True:
        fence = text.find(_FENCE, position)
        listed = _LIST_START.search(text, position)
        if listed is not None and (fence < 0 or listed.start() < fence):
            end = _closing_bracket(text, listed.start())
            if end is None:
                # Never closed: a broken block once the text is complete, a growing one until then.
                return Block(listed.start(), len(text), text[listed.start():], False) if final \
                    else Pending(listed.start())
            return Block(listed.start(), end, text[listed.start():end], False)
        if fence >= 0:
            found = _fenced_block(text, fence, final)
            if isinstance(found, (Block, Pending)):
                return found
            position = found
            continue
        if not final:
            tail = _PARTIAL_LIST_START.search(text, position) or _PARTIAL_FENCE.search(text, position)
            if tail is not None:
                return Pending(tail.start())
        return None


def read_calls(source: str, *, fenced: bool) -> tuple[list[ToolCall], list[CallError]]:
    """Read a block's source into calls by vLLM's pythonic rules; problems become CallErrors."""
    try:
        nodes = _call_nodes(ast.parse(escape_control_chars_in_strings(source.strip())), fenced)
    except SyntaxError as exc:
        return [], [CallError(CallProblem.MALFORMED,
                              f"cannot read the tool call block {_preview(source)}: {exc.msg}")]
    except ValueError as exc:  # e.g. a NUL byte ast refuses outright
        return [], [CallError(CallProblem.MALFORMED, f"cannot read the tool call block: {exc}")]
    if isinstance(nodes, CallError):
        return [], [nodes]
    calls, errors = [], []
    for index, node in enumerate(nodes):
        call = _read_call(node, index)
        (errors if isinstance(call, CallError) else calls).append(call)
    return calls, errors


def check_calls(calls: Iterable[ToolCall], tools: Sequence[Mapping[str, Any]]) -> list[CallError]:
    """Check each call's tool name and arguments against the offered tools' JSON schemas."""
    schemas = tool_schemas(tools)
    errors: list[CallError] = []
    for index, call in enumerate(calls):
        if call.name not in schemas:
            available = ", ".join(sorted(schemas)) or "none"
            errors.append(CallError(CallProblem.UNKNOWN_TOOL,
                                    f"unknown tool {call.name!r} (available: {available})", index, call.name))
            continue
        problems = schema_problems(call.arguments, schemas[call.name])
        if problems:
            errors.append(CallError(CallProblem.INVALID_ARGUMENTS, "; ".join(problems), index, call.name))
    return errors


def tool_schemas(tools: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """name -> parameters schema of OpenAI tool definitions (a tool without parameters takes none)."""
    schemas = {}
    for tool in tools:
        function = tool.get("function") or {}
        schemas[function["name"]] = function.get("parameters") or {"type": "object", "properties": {}}
    return schemas


def schema_problems(arguments: Any, schema: Mapping[str, Any]) -> list[str]:
    """The ways `arguments` break `schema`, each naming the argument, e.g. "argument 'n': 'x' is not
    of type 'integer'"; empty when they fit."""
    from jsonschema.validators import validator_for

    validator = validator_for(schema)(schema)
    problems = []
    for error in sorted(validator.iter_errors(arguments), key=lambda e: [str(p) for p in e.absolute_path]):
        path = "".join(f"[{p!r}]" if isinstance(p, int) else (f".{p}" if i else str(p))
                       for i, p in enumerate(error.absolute_path))
        problems.append(f"argument {path!r}: {error.message}" if path else error.message)
    return problems


def calls_as_json(calls: Iterable[ToolCall]) -> str:
    return json.dumps([c.as_dict() for c in calls], ensure_ascii=False)


# ------------------------------------------------------------------------------------------ internals
def _fenced_block(text: str, fence: int, final: bool) -> Block | Pending | int:
    """The fence opening at `fence` as a call block, a pending one, or the offset to scan on from."""
    header_end = text.find("\n", fence + 3)
    if header_end < 0:
        language = text[fence + 3:].strip().lower()
        if not final and any(name.startswith(language) for name in TOOL_FENCES | CODE_FENCES):
            return Pending(fence)
        return fence + 3
    language = text[fence + 3:header_end].strip().lower()
    close = text.find(_FENCE, header_end)
    body = text[header_end + 1:close if close >= 0 else len(text)]
    end = close + 3 if close >= 0 else len(text)
    if language not in TOOL_FENCES | CODE_FENCES:
        return end  # a fence of some other language: its inside is never a call list
    if close < 0 and not final:
        return Pending(fence)
    if language in TOOL_FENCES or _only_calls(body):
        return Block(fence, end, body, True)
    return end


def _only_calls(source: str) -> bool:
    """Whether a ```python block reads cleanly as tool calls (`print(1 + 1)` is code, not a call)."""
    calls, errors = read_calls(source, fenced=True)
    return bool(calls) and not errors


def _call_nodes(module: ast.Module, fenced: bool) -> list[ast.Call] | CallError:
    """The call nodes of a block: a list of calls, or (in a fence) calls on their own lines."""
    body = module.body
    if len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.List):
        elements = body[0].value.elts
        if not elements:
            return CallError(CallProblem.MALFORMED, "the tool call list is empty")
        if all(isinstance(e, ast.Call) for e in elements):
            return list(elements)  # type: ignore[arg-type]
        return CallError(CallProblem.MALFORMED, "the tool call list must contain only calls like name(arg=value)")
    if fenced and body and all(isinstance(s, ast.Expr) and isinstance(s.value, ast.Call) for s in body):
        return [s.value for s in body]  # type: ignore[union-attr]
    return CallError(CallProblem.MALFORMED,
                     "expected a list of calls like [name(arg=value)], got other Python statements")


def _read_call(node: ast.Call, index: int) -> ToolCall | CallError:
    name = _dotted_name(node.func)
    if name is None:
        return CallError(CallProblem.MALFORMED, f"not a tool name: {ast.unparse(node.func)!r}", index)
    if node.args:
        return CallError(CallProblem.MALFORMED,
                         f"positional arguments are not allowed, write name=value "
                         f"(got {ast.unparse(node.args[0])!r})", index, name)
    arguments: dict[str, Any] = {}
    for keyword in node.keywords:
        if keyword.arg is None:
            return CallError(CallProblem.MALFORMED, "**arguments are not allowed", index, name)
        try:
            arguments[keyword.arg] = literal_value(keyword.value)
        except NotALiteral:
            return CallError(CallProblem.MALFORMED,
                             f"argument {keyword.arg!r} must be a literal (string, number, true/false, "
                             f"null, list or dict), got {_preview(ast.unparse(keyword.value))}", index, name)
    try:
        json.dumps(arguments, allow_nan=False)
    except ValueError:
        return CallError(CallProblem.MALFORMED, "arguments hold a non-finite number", index, name)
    return ToolCall(name, arguments)


def _dotted_name(node: ast.expr) -> Optional[str]:
    """`name` or `a.b.name`, as vLLM's handle_single_tool accepts; None for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return ".".join(reversed(parts))


def _closing_bracket(text: str, start: int) -> Optional[int]:
    """Offset just past the bracket that closes text[start], skipping string literals; None if open.

    A scanner rather than Python's tokenizer: models put raw newlines inside string arguments, which
    the tokenizer refuses but escape_control_chars_in_strings (pipeline.tools.literals) later repairs.
    """
    index, quote = start, None
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    while index < len(text):
        char = text[index]
        if quote is not None:
            if char == "\\":
                index += 2
                continue
            if text.startswith(quote, index):
                index += len(quote)
                quote = None
                continue
            index += 1
            continue
        if char in "'\"":
            quote = char * 3 if text.startswith(char * 3, index) else char
            index += len(quote)
            continue
        if char in "([{":
            stack.append(char)
        elif char in ")]}":
            if not stack or stack[-1] != pairs[char]:
                return index + 1  # mismatched: let ast report it
            stack.pop()
            if not stack:
                return index + 1
        index += 1
    return None


def _strip(text: str) -> Optional[str]:
    stripped = text.strip()
    return stripped or None


def _preview(source: str, limit: int = 80) -> str:
    source = " ".join(source.split())
    return repr(source if len(source) <= limit else source[:limit] + "...")
