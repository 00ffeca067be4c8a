"""The tool chain of one record: generate, read the calls, run the pipeline's tools, generate again.

Engine-agnostic: the caller passes `generate(round, messages, request)`, `request` being the round's tool
request (a forced choice holds for the first round only), which the engine turns into its own constraint;
so the same loop runs inside a Ray engine replica (pipeline.stages.tools) and in unit tests. A round ends
the chain when the model answers without calls, when a call is invalid (the record becomes an
`invalid_tool_call` error, transcript kept), when a call names a tool the pipeline cannot run (the
record's own tools: the calls are returned for the user to run), or after `max_rounds` turns.
"""
from __future__ import annotations

import asyncio
import copy
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional

from pipeline.tools.parser import ParsedOutput, ToolCall
from pipeline.tools.registry import ToolContext, ToolRegistry
from pipeline.tools.request import ToolRequest, interpret_turn

logger = logging.getLogger(__name__)


@dataclass
class Generation:
    """One engine call, as the chain needs it; `raw` is the engine stage's own output row."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Optional[str] = None
    raw: dict[str, Any] = field(default_factory=dict)


Generate = Callable[[int, list[dict[str, Any]], ToolRequest], Awaitable[Generation]]


@dataclass
class ChainOutcome:
    messages: list[dict[str, Any]]               # the whole conversation, arguments as mappings
    last: Generation
    final: Optional[ParsedOutput] = None         # the last turn, read
    pending_calls: tuple[ToolCall, ...] = ()     # calls of the last turn the pipeline did not run
    error: Optional[str] = None                  # why the calls were invalid
    rounds: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def content(self) -> Optional[str]:
        return self.final.content if self.final is not None else None

    def to_json(self) -> str:
        """What the output row needs, as one string (Ray Data carries it between stages unchanged).

        `messages` is the conversation in OpenAI message format (arguments as JSON strings): it can be
        sent back to the endpoint as it is to continue the conversation.
        """
        return json.dumps({"content": self.content, "tool_calls": [c.as_dict() for c in self.pending_calls],
                           "error": self.error, "rounds": self.rounds,
                           "messages": [openai_message(m) for m in self.messages]},
                          ensure_ascii=False, default=str)


async def run_tool_chain(conversation: list[dict[str, Any]], request: ToolRequest, registry: ToolRegistry,
                         context: ToolContext, generate: Generate, *, max_rounds: int,
                         tool_timeout_s: float) -> ChainOutcome:
    messages = copy.deepcopy(conversation)
    current = request
    outcome: Optional[ChainOutcome] = None
    prompt_tokens = completion_tokens = 0
    for round_index in range(max_rounds):
        generation = await generate(round_index, messages, current)
        prompt_tokens += generation.prompt_tokens
        completion_tokens += generation.completion_tokens
        outcome = ChainOutcome(messages, generation, rounds=round_index + 1, prompt_tokens=prompt_tokens,
                               completion_tokens=completion_tokens)
        if generation.error:
            return outcome
        parsed = interpret_turn(generation.text, current)
        outcome.final = parsed
        if not parsed.ok:
            # The transcript shows what the model wrote, so the error row can be read against it.
            messages.append({"role": "assistant", "content": generation.text})
            outcome.error = parsed.describe_errors()
            return outcome
        messages.append(assistant_message(parsed, round_index))
        if not parsed.calls:
            return outcome
        if round_index == max_rounds - 1 or not registry.can_run(parsed.calls):
            outcome.pending_calls = parsed.calls
            return outcome
        for index, call in enumerate(parsed.calls):
            content = await _run_call(registry, call, context, tool_timeout_s)
            messages.append({"role": "tool", "tool_call_id": call_id(round_index, index), "name": call.name,
                             "content": content})
        current = current.after_first_round()
    assert outcome is not None, "max_rounds >= 1"
    return outcome


async def _run_call(registry: ToolRegistry, call: ToolCall, context: ToolContext, timeout_s: float) -> str:
    """Run one tool off the event loop (the engine's requests keep flowing), bounded in time."""
    try:
        result = await asyncio.wait_for(asyncio.to_thread(registry.execute, call, context), timeout_s)
    except asyncio.TimeoutError:
        logger.warning("tool %s timed out after %.1fs on record %s", call.name, timeout_s, context.record_id)
        return json.dumps({"error": f"the tool did not answer within {timeout_s:g}s"})
    return result.content


def call_id(round_index: int, index: int) -> str:
    """Deterministic ids, so a rerun writes the same transcript (Gemma 3 itself has no call ids)."""
    return f"call_{round_index}_{index}"


def assistant_message(parsed: ParsedOutput, round_index: int) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": parsed.content}
    if parsed.calls:
        message["tool_calls"] = [
            {"id": call_id(round_index, i), "type": "function",
             "function": {"name": call.name, "arguments": call.arguments}}
            for i, call in enumerate(parsed.calls)]
    return message


def openai_message(message: dict[str, Any]) -> dict[str, Any]:
    """A message with tool-call arguments as JSON strings, as the OpenAI API writes them."""
    if not message.get("tool_calls"):
        return message
    calls = [{**call, "function": {**call["function"],
                                   "arguments": json.dumps(call["function"]["arguments"], ensure_ascii=False)}}
             for call in message["tool_calls"]]
    return {**message, "tool_calls": calls}
