"""vLLM tool parser `gemma3`: the batch job's Gemma 3 call reader behind vLLM's OpenAI server.

vLLM ships no Gemma 3 tool parser, and its `pythonic` parser only reads output that starts with "[".
This parser reads what pipeline.tools.parser reads (calls alone, after text, in ```tool_code/```python
fences, several, nested and quoted arguments) and checks them against the request's tool schemas, so
the endpoint and the batch job give the same calls for the same output. Every call block of an output
is read, in order; a block whose calls are invalid comes back as plain content, where it stood (the
OpenAI response has no place for a parse error), and is logged; the valid blocks around it are calls.
'required' and named tool_choice stay with vLLM's guided-JSON path (`supports_required_and_named`), which
the batch job mirrors.

Registration, the two ways vLLM supports:
- `vllm serve ... --enable-auto-tool-choice --tool-call-parser gemma3 --tool-parser-plugin <this file>`:
  importing this file registers the parser;
- the `vllm.general_plugins` entry point of this package (`pipeline.engine.plugin:register_tool_parser`),
  which vLLM runs in every process it starts. Ray Serve's LLM replicas need it: they never import a
  `tool_parser_plugin` file (only vLLM's own launcher does).
"""
from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from typing import Any, Optional

from vllm.entrypoints.chat_utils import make_tool_call_id
from vllm.entrypoints.generate.base.protocol import (
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    ExtractedToolCallInformation,
    FunctionCall,
    ToolCall,
)
from vllm.tool_parsers.abstract_tool_parser import ToolParser, ToolParserManager

from pipeline.tools.parser import locate_blocks, read_blocks, text_outside

logger = logging.getLogger(__name__)

PARSER_NAME = "gemma3"  # = pipeline.engine.plugin.TOOL_PARSER_NAME


class Gemma3ToolParser(ToolParser):
    """Gemma 3 pythonic tool calls, complete and streamed.

    Built on vLLM's pythonic machinery through pipeline.tools.parser rather than on PythonicToolParser's
    methods: those drop every call, silently, unless the output starts with "[", and swallow the reason
    when a call cannot be read.

    Streaming holds back only what may still become a call block (from a "[name(" or a "```" fence on)
    and trailing whitespace; all else streams as it arrives. A completed block is sent as whole calls.
    On the last chunk (a stop token, or max_tokens reached) the complete output is parsed once more, so
    what was streamed adds up to what `extract_tool_calls` returns for the same text.
    """

    def __init__(self, tokenizer: Any, tools: Optional[list[Any]] = None):
        super().__init__(tokenizer, tools)
        self._sent_content = ""
        self._stop_ids = _stop_token_ids(tokenizer)

    def extract_tool_calls(self, model_output: str, request: Any) -> ExtractedToolCallInformation:
        content, calls = self._read(model_output, request)
        if not calls:
            return ExtractedToolCallInformation(tools_called=False, tool_calls=[], content=content)
        return ExtractedToolCallInformation(
            tools_called=True, content=content,
            tool_calls=[ToolCall(type="function", function=FunctionCall(
                name=call["name"], arguments=json.dumps(call["arguments"], ensure_ascii=False)))
                for call in calls])

    def extract_tool_calls_streaming(self, previous_text: str, current_text: str, delta_text: str,
                                     previous_token_ids: Sequence[int], current_token_ids: Sequence[int],
                                     delta_token_ids: Sequence[int], request: Any) -> Optional[DeltaMessage]:
        text, last = current_text, self._is_last_chunk(current_token_ids, delta_token_ids, request)
        if not last:
            _, pending = locate_blocks(current_text, final=False)
            if pending is not None:  # hold back what may still become a block; the rest is final
                text = current_text[:pending.start]
        content, calls = self._read(text, request, log=last)
        return self._delta(content or "", calls)

    # ------------------------------------------------------------------------------------ internals
    def _read(self, text: str, request: Any, log: bool = True) -> tuple[Optional[str], list[dict[str, Any]]]:
        """(content, calls): valid blocks become calls; an invalid block stays in the content (logged
        once, when the output is complete, not on every streamed chunk)."""
        valid, calls = [], []
        for read in read_blocks(text, request_tools(request)):
            if read.errors:
                if log:
                    logger.warning("gemma3 tool parser: invalid tool call returned as content: %s",
                                   "; ".join(str(e) for e in read.errors))
                continue
            valid.append(read.block)
            calls += [call.as_dict() for call in read.calls]
        return text_outside(text, valid).strip() or None, calls

    def _delta(self, content: str, calls: list[dict[str, Any]]) -> Optional[DeltaMessage]:
        new_content = ""
        if content.startswith(self._sent_content):
            new_content = content[len(self._sent_content):]
            self._sent_content = content
        else:  # cannot happen by construction: held-back text is always a suffix of what was sent
            logger.warning("gemma3 tool parser: streamed content diverged; holding the rest back")
        new_calls = []
        for index in range(len(self.prev_tool_call_arr), len(calls)):
            arguments = json.dumps(calls[index]["arguments"], ensure_ascii=False)
            new_calls.append(DeltaToolCall(index=index, id=make_tool_call_id(), type="function",
                                           function=DeltaFunctionCall(name=calls[index]["name"], arguments=arguments)))
            # vLLM's server reads these two fields to finish a streamed call (see PythonicToolParser).
            self.prev_tool_call_arr.append({"name": calls[index]["name"], "arguments": arguments})
            self.streamed_args_for_tool.append(arguments)
            self.current_tool_id = index
        if not new_content and not new_calls:
            return None
        return DeltaMessage(content=new_content or None, tool_calls=new_calls)

    def _is_last_chunk(self, current_token_ids: Sequence[int], delta_token_ids: Sequence[int],
                       request: Any) -> bool:
        """The parser is not told when the output ends; a stop token or the token limit tells it."""
        stops = self._stop_ids | set(getattr(request, "stop_token_ids", None) or [])
        if stops.intersection(delta_token_ids):
            return True
        limit = getattr(request, "max_completion_tokens", None)
        if limit is None:
            with warnings.catch_warnings():  # the deprecated field still carries the limit of older clients
                warnings.simplefilter("ignore", DeprecationWarning)
                limit = getattr(request, "max_tokens", None)
        return limit is not None and len(current_token_ids) >= limit


def request_tools(request: Any) -> list[dict[str, Any]]:
    """The request's function tools as OpenAI definitions (chat completions or Responses shape)."""
    tools = []
    for tool in getattr(request, "tools", None) or []:
        data = tool.model_dump(exclude_none=True) if hasattr(tool, "model_dump") else dict(tool)
        if "function" in data:
            tools.append({"type": "function", "function": data["function"]})
        elif data.get("type") == "function" and "name" in data:
            tools.append({"type": "function", "function": {"name": data["name"],
                                                           "parameters": data.get("parameters")}})
    return tools


def _stop_token_ids(tokenizer: Any) -> set[int]:
    ids = set()
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    end_of_turn = tokenizer.get_vocab().get("<end_of_turn>") if hasattr(tokenizer, "get_vocab") else None
    if end_of_turn is not None:
        ids.add(end_of_turn)
    return ids


ToolParserManager.register_module(PARSER_NAME, module=Gemma3ToolParser)
