"""The tools of one record or request: definitions checked once, the tool choice, and what it forces.

A record's tools are the pipeline's built-ins (config `tools.builtins`) plus the OpenAI tool definitions
in its `tools` column; its choice is its `tool_choice` column or `tools.tool_choice`. `build_tool_request`
refuses what cannot work (a definition that is not a JSON schema, a name the pythonic call syntax cannot
carry, a choice naming no offered tool) with a message naming the problem, before any engine time is
spent. A forced choice ('required' or a name) is decoded and read exactly as vLLM's OpenAI server does
it, so batch and online give the same calls: guided JSON (the arguments object, or a list of
{"name", "parameters"}) rather than the pythonic list. The guided-JSON schema itself is vLLM's, derived
on the engine side (pipeline.stages.tools.structured_outputs): this package imports no vLLM.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

from pipeline.tools.parser import CallError, CallProblem, ParsedOutput, ToolCall, check_calls, parse_tool_calls

ToolChoice = Union[str, dict[str, Any]]
CHOICES = ("auto", "none", "required")
# Names the pythonic call syntax can carry (vLLM's pythonic parser reads `a.b(...)` as "a.b").
_TOOL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class ToolRequestError(ValueError):
    """The record's tools or tool choice cannot be used; the message names the problem."""


@dataclass(frozen=True)
class ToolRequest:
    tools: tuple[dict[str, Any], ...]
    tool_choice: ToolChoice = "auto"

    @property
    def forced_name(self) -> Optional[str]:
        if isinstance(self.tool_choice, dict):
            return self.tool_choice["function"]["name"]
        return None

    def to_json(self) -> str:
        return json.dumps({"tools": list(self.tools), "tool_choice": self.tool_choice}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: Optional[str]) -> Optional["ToolRequest"]:
        if not text:
            return None
        data = json.loads(text)
        return cls(tuple(data["tools"]), data["tool_choice"])

    def after_first_round(self) -> "ToolRequest":
        """Forcing applies to the first turn only; after the tool results the model decides."""
        return self if self.tool_choice in ("auto", "none") else ToolRequest(self.tools, "auto")


def build_tool_request(row_tools: Optional[str], row_choice: Optional[str],
                       builtin_definitions: Sequence[Mapping[str, Any]], default_choice: str) -> Optional[ToolRequest]:
    """The record's ToolRequest, None when it has no tools; ToolRequestError when unusable."""
    tools = [dict(t) for t in builtin_definitions]
    if row_tools is not None and str(row_tools).strip():
        try:
            extra = json.loads(row_tools)
        except json.JSONDecodeError as exc:
            raise ToolRequestError(f"'tools' is not valid JSON: {exc}") from None
        if not isinstance(extra, list):
            raise ToolRequestError(f"'tools' must be a JSON list of tool definitions, got {type(extra).__name__}")
        tools.extend(check_tool_definitions(extra))
    if not tools:
        return None
    names = [t["function"]["name"] for t in tools]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ToolRequestError(f"tool {duplicates[0]!r} is defined twice (by the record and by the pipeline's "
                               "built-in tools, or twice in the record)")
    choice = (row_choice or "").strip() or default_choice
    return ToolRequest(tuple(tools), parse_tool_choice(choice, names))


def check_tool_definitions(tools: Sequence[Any]) -> list[dict[str, Any]]:
    """OpenAI tool definitions, checked: function tools with a usable name and a valid JSON schema."""
    from jsonschema.exceptions import SchemaError
    from jsonschema.validators import validator_for

    checked = []
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" \
                or not isinstance(tool.get("function"), dict):
            raise ToolRequestError(f"{where}: expected {{\"type\": \"function\", \"function\": {{...}}}}")
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise ToolRequestError(f"{where}: function name {name!r} must be a Python identifier "
                                   "(letters, digits, _, dots between parts)")
        parameters = function.get("parameters")
        if parameters is not None:
            if not isinstance(parameters, dict):
                raise ToolRequestError(f"{where} ({name}): parameters must be a JSON schema object")
            try:
                validator_for(parameters).check_schema(parameters)
            except SchemaError as exc:
                raise ToolRequestError(f"{where} ({name}): parameters is not a valid JSON schema: "
                                       f"{exc.message}") from None
        checked.append({"type": "function", "function": function})
    return checked


def parse_tool_choice(choice: str, names: Sequence[str]) -> ToolChoice:
    if choice in CHOICES:
        return choice
    if choice in names:
        return {"type": "function", "function": {"name": choice}}
    raise ToolRequestError(f"tool_choice {choice!r} is none of {', '.join(CHOICES)} and names no offered tool "
                           f"(tools: {', '.join(names)})")


def interpret_turn(text: str, request: ToolRequest) -> ParsedOutput:
    """Read one model turn under the request's tool choice, as vLLM's server reads it.

    'auto': the Gemma 3 parser. 'none': the text as it is. A forced name: the text is the arguments
    object. 'required': the text is a list of {"name", "parameters"}. Calls are checked against the
    tools' schemas either way (guided decoding guarantees the shape only when the output was not cut).
    """
    if request.tool_choice == "none":
        return ParsedOutput(content=text)
    if request.tool_choice == "auto":
        return parse_tool_calls(text, request.tools)
    try:
        decoded = json.loads(text)
    except json.JSONDecodeError as exc:
        return ParsedOutput(content=None, errors=(CallError(
            CallProblem.MALFORMED, f"forced tool call is not valid JSON ({exc.msg} at character {exc.pos} of "
            f"{len(text)}; cut by max_tokens?)"),))
    forced = request.forced_name
    if forced is not None:
        if not isinstance(decoded, dict):
            return _malformed(f"forced call to {forced!r}: arguments must be a JSON object")
        calls = [ToolCall(forced, decoded)]
    else:
        if not isinstance(decoded, list) or not all(isinstance(c, dict) and isinstance(c.get("name"), str)
                                                    and isinstance(c.get("parameters", {}), dict) for c in decoded):
            return _malformed("required tool calls must be a JSON list of {\"name\", \"parameters\"}")
        calls = [ToolCall(c["name"], c.get("parameters", {})) for c in decoded]
    return ParsedOutput(content=None, calls=tuple(calls), errors=tuple(check_calls(calls, request.tools)))


def _malformed(message: str) -> ParsedOutput:
    return ParsedOutput(content=None, errors=(CallError(CallProblem.MALFORMED, message),))
