"""OpenAI Batch output lines: a chat completion for a request that ran, an error line for one that did not.

Mirrors what the OpenAI Batch API writes (its output and error files, checked against openai/openai-openapi
issue 302, which shows a real error-file line):

- a request that ran: `{"id", "custom_id", "response": {"status_code": 200, "request_id", "body":
  <chat.completion>}, "error": null}`, in the output file;
- a request the API would refuse: `"response": {"status_code": 400, "request_id", "body": {"error":
  {"message", "type", "param", "code"}}}, "error": null`, in the error file;
- a line that is no request at all (not JSON, no custom_id, another url...), which the API reports when
  it validates the whole file: `"response": null, "error": {"code", "message", "line"}`, in the error file.

Ids are derived from the line's file and number, so a rerun over the same input writes the same ids.
Pure logic: nothing here imports Ray or vLLM.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

from pipeline.openai.batch_requests import LineError
from pipeline.io.records import Stage


@dataclass(frozen=True)
class LineIds:
    batch_request: str  # the output line's "id"
    request: str        # response.request_id
    completion: str     # the chat.completion's "id"
    seed: str

    @classmethod
    def of(cls, source: str, line: int) -> "LineIds":
        digest = hashlib.sha256(f"{source}\n{line}".encode()).hexdigest()
        return cls(f"batch_req_{digest[:24]}", digest[24:56], f"chatcmpl-{digest[:24]}", digest)

    def tool_call_id(self, index: int) -> str:
        return "call_" + hashlib.sha256(f"{self.seed}/{index}".encode()).hexdigest()[:24]


def completion_body(ids: LineIds, *, model: str, created: int, content: Optional[str],
                    tool_calls: Iterable[Mapping[str, Any]], finish_reason: str, prompt_tokens: int,
                    completion_tokens: int) -> dict[str, Any]:
    """A `chat.completion` object; `tool_calls` as the tool chain reports them ({"name", "arguments"})."""
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    calls = [{"id": ids.tool_call_id(i), "type": "function",
              "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}
             for i, call in enumerate(tool_calls)]
    if calls:
        message["tool_calls"] = calls
    return {
        "id": ids.completion, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
        "system_fingerprint": None,
    }


def success_line(ids: LineIds, custom_id: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"id": ids.batch_request, "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": ids.request, "body": body}, "error": None}


def error_line(ids: LineIds, custom_id: Optional[str], error: LineError, line: int) -> dict[str, Any]:
    if error.status is None:
        return {"id": ids.batch_request, "custom_id": custom_id, "response": None,
                "error": {"code": error.code, "message": error.message, "line": line}}
    body = error.body()
    return {"id": ids.batch_request, "custom_id": custom_id,
            "response": {"status_code": error.status, "request_id": ids.request, "body": body}, "error": None}


# vLLM raises one type for every request it refuses (vllm.exceptions.VLLMValidationError, a client error);
# Ray's engine stage reports it as "<type>: <message>". The type decides 400 against 500; the message only
# refines the code for the one case readers check for, a prompt over the context.
_CLIENT_ERRORS = ("VLLMValidationError", "VLLMClientError", "VLLMNotFoundError", "ValueError")
# vLLM 0.29's two wordings: its renderer (vllm/renderers/params.py) and its input processor.
_CONTEXT_PHRASES = ("maximum context length", "maximum model length")


def engine_error(inference_error: str) -> LineError:
    """The error line for a request the engine refused or failed (Ray's `__inference_error__`)."""
    kind, separator, message = inference_error.partition(": ")
    if separator and kind in _CLIENT_ERRORS:
        too_long = any(phrase in message for phrase in _CONTEXT_PHRASES)
        code = "context_length_exceeded" if too_long else "invalid_request"
        return LineError(code, message[:2000], param="messages" if code == "context_length_exceeded" else None,
                         stage=Stage.ENGINE)
    return LineError("engine_error", inference_error[:2000], status=500, type="server_error", stage=Stage.ENGINE)


def invalid_tool_call(rounds: int, problem: str) -> LineError:
    """The model's call is unreadable or does not fit its tool's schema (cut by max_tokens, mistyped).

    A 500 of type model_error, as the OpenAI API answers when a model produced invalid content: the request
    was fine, and a retry with a larger max_tokens may succeed.
    """
    return LineError("invalid_tool_call", f"round {rounds}: {problem}"[:2000], status=500, type="model_error",
                     stage=Stage.TOOLS)


def tool_finish_reason(tool_choice: Any, has_calls: bool, plain: str) -> str:
    """As the OpenAI API (and vLLM's server) answer: 'tool_calls' when the model called tools under 'auto' or
    'required', 'stop' for a call forced by name."""
    if has_calls and tool_choice in ("auto", "required"):
        return "tool_calls"
    if has_calls:
        return "stop"
    return plain
