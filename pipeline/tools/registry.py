"""The tools the pipeline itself runs between rounds: a typed registry, passed in, never global.

A `Tool` is a name, a description, a JSON schema of its arguments and a function of (arguments, context).
The registry runs a call only after checking its arguments against that schema again (a call reaching
it was already checked against the definitions the model saw; this guards direct use). A tool that
refuses its input raises `ToolFailure`; the model then reads `{"error": ...}` as the result and may try
again, while the record carries on. Results are JSON, cut to `max_result_chars`.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

from pipeline.tools.parser import ToolCall, schema_problems

logger = logging.getLogger(__name__)


class ToolFailure(Exception):
    """A tool refused its input (a bad expression, a missing key); the model sees the message."""


@dataclass(frozen=True)
class ToolContext:
    """What a tool may know about the record it runs for."""

    record_id: Optional[str] = None
    image_info: Optional[dict[str, Any]] = None   # the original image's size, format, EXIF


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]
    run: Callable[[dict[str, Any], ToolContext], Any] = field(compare=False)

    def definition(self) -> dict[str, Any]:
        """The OpenAI tool definition the model is shown."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass(frozen=True)
class ToolResult:
    content: str   # JSON text, as the model reads it
    ok: bool


class ToolRegistry:
    """Tools by name; `execute` turns every outcome into a ToolResult (it never raises for a call)."""

    def __init__(self, tools: Iterable[Tool], max_result_chars: int = 4000):
        self._tools = {}
        for tool in tools:
            if tool.name in self._tools:
                raise ValueError(f"tool {tool.name!r} registered twice")
            self._tools[tool.name] = tool
        self.max_result_chars = max_result_chars

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self._tools)

    def definitions(self) -> list[dict[str, Any]]:
        return [tool.definition() for tool in self._tools.values()]

    def can_run(self, calls: Iterable[ToolCall]) -> bool:
        return all(call.name in self._tools for call in calls)

    def execute(self, call: ToolCall, context: ToolContext) -> ToolResult:
        tool = self._tools.get(call.name)
        if tool is None:
            return self._result({"error": f"unknown tool {call.name!r}"}, ok=False)
        problems = schema_problems(call.arguments, tool.parameters)
        if problems:
            return self._result({"error": "; ".join(problems)}, ok=False)
        try:
            value = tool.run(dict(call.arguments), context)
        except ToolFailure as exc:
            return self._result({"error": str(exc)}, ok=False)
        except Exception as exc:  # a bug in a tool must not cost the record; it is logged with its trace
            logger.exception("tool %s failed on record %s", call.name, context.record_id)
            return self._result({"error": f"{type(exc).__name__}: {exc}"}, ok=False)
        return self._result(value, ok=True)

    def _result(self, value: Any, ok: bool) -> ToolResult:
        text = json.dumps(value, ensure_ascii=False, default=str)
        if len(text) > self.max_result_chars:
            text = text[: self.max_result_chars] + f"... [cut at {self.max_result_chars} characters]"
        return ToolResult(text, ok)
