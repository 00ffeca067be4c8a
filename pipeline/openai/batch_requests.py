"""OpenAI Batch request lines -> requests the pipeline can run, or the error line each refusal becomes.

One line of an OpenAI Batch input file is `{"custom_id", "method": "POST", "url": "/v1/chat/completions",
"body": {...chat completion request...}}`. `parse_request_line` reads it into a `ParsedRequest`: the
conversation for the chat template (images as placeholders, tool-call arguments as mappings), the image
URLs to fetch, vLLM sampling parameters with the same keys for every request, and the tools as
pipeline.tools reads them for parquet records and the endpoint. Whatever cannot run raises `LineError`:

- file-level problems (not JSON, no custom_id, a duplicate custom_id, another method or url, a line over
  the size limit) are what the OpenAI API reports when it validates the file; here they become lines whose
  `error` is set (`status` None);
- request-level problems (unknown model, a parameter out of range or not supported, too many images,
  max_tokens over the cap) are what the API answers a single request with: a 400 with an error body.

A parameter that would change the result and that the pipeline cannot honour (n > 1, logprobs, audio...)
is refused by name rather than ignored. Pure logic: nothing here imports Ray or vLLM.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from pipeline.config import PipelineConfig
from pipeline.io.records import Stage
from pipeline.openai.checks import RequestCaps, is_int
from pipeline.openai.errors import OpenAIError
from pipeline.tools.request import ToolRequest, ToolRequestError, build_tool_request

CHAT_COMPLETIONS_URL = "/v1/chat/completions"

# Body fields the pipeline honours.
HONOURED = frozenset({
    "messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "presence_penalty",
    "frequency_penalty", "seed", "stop", "tools", "tool_choice", "parallel_tool_calls", "response_format",
    # vLLM's extensions that its OpenAI server accepts too.
    "top_k", "repetition_penalty",
})
# Fields that describe the request to OpenAI's platform and do not change the generated text.
NO_EFFECT = frozenset({"metadata", "user", "store", "service_tier", "prompt_cache_key", "prompt_cache_retention",
                       "prompt_cache_options", "safety_identifier"})
# Fields accepted only at the value that means "off" (the API's default).
DEFAULT_ONLY: dict[str, tuple[Any, ...]] = {
    "n": (None, 1), "logprobs": (None, False), "top_logprobs": (None, 0), "stream": (None, False),
    "stream_options": (None,), "logit_bias": (None, {}), "modalities": (None, ["text"]), "audio": (None,),
    "prediction": (None,), "functions": (None, []), "function_call": (None,), "web_search_options": (None,),
    "reasoning_effort": (None,), "verbosity": (None,), "moderation": (None,),
}
_WHY_NOT = {
    "n": "n > 1 is not supported: send one request line per completion",
    "logprobs": "logprobs is not supported",
    "top_logprobs": "top_logprobs is not supported",
    "stream": "stream is not supported in a batch",
    "logit_bias": "logit_bias is not supported",
    "functions": "functions (deprecated) is not supported: use tools",
    "function_call": "function_call (deprecated) is not supported: use tool_choice",
    "modalities": "only the text modality is supported",
}
_ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP_SEQUENCES = 4


class LineError(OpenAIError):
    """A line that does not run. `status` None: the line is not a usable request (file-level error);
    otherwise the HTTP status the API would answer the request with."""

    def __init__(self, code: str, message: str, *, status: Optional[int] = 400, param: Optional[str] = None,
                 type: str = "invalid_request_error", stage: Stage = Stage.VALIDATE):
        super().__init__(message, status=status, code=code, param=param, type=type)
        self.stage = stage

    def to_json(self) -> str:
        return json.dumps({"code": self.code, "message": self.message, "status": self.status, "param": self.param,
                           "type": self.type, "stage": self.stage.value}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> "LineError":
        data = json.loads(text)
        return cls(data["code"], data["message"], status=data["status"], param=data["param"], type=data["type"],
                   stage=Stage(data["stage"]))


def file_error(code: str, message: str) -> LineError:
    return LineError(code, message, status=None)


def bad_param(param: str, message: str, code: str = "invalid_value") -> LineError:
    return LineError(code, f"{param}: {message}", param=param)


@dataclass(frozen=True)
class RequestLimits(RequestCaps):
    """What one request line is held to, from the config. The model, token cap and image count checks are
    the endpoint's too (`RequestCaps`)."""

    SERVED_BY = "this job serves"
    MODEL_HINT = " (openai_batch.accepted_model_names adds names)"
    TOKENS_SETTING = "openai_batch.max_tokens_cap"
    IMAGES_SETTING = "engine.max_images_per_prompt"

    max_request_bytes: int
    sampling_defaults: Mapping[str, Any] = field(default_factory=dict)

    @staticmethod
    def refusal(code: str, message: str, param: Optional[str]) -> LineError:
        return LineError(code, message, param=param)

    @classmethod
    def from_config(cls, config: PipelineConfig) -> "RequestLimits":
        section = config.openai_batch
        names = (config.model.served_name, *[n for n in section.accepted_model_names if n != config.model.served_name])
        sampling = config.sampling
        cap = section.max_tokens_cap  # the config's cross-checks set the default (pipeline.config)
        defaults = {"max_tokens": min(sampling.max_tokens, cap), "temperature": sampling.temperature,
                    "top_p": sampling.top_p, "top_k": sampling.top_k,
                    "repetition_penalty": sampling.repetition_penalty, "presence_penalty": 0.0,
                    "frequency_penalty": 0.0, "seed": sampling.seed, "stop": list(sampling.stop) or None,
                    "ignore_eos": sampling.ignore_eos, "structured_outputs": None}
        return cls(model_names=names, max_images=config.engine.max_images_per_prompt, max_tokens_cap=cap,
                   max_request_bytes=section.max_request_bytes, sampling_defaults=defaults)


@dataclass
class ParsedRequest:
    custom_id: str
    # The conversation as the chat template reads it: content a string or parts {"type": "text"} /
    # {"type": "image"}; assistant tool-call arguments as mappings.
    conversation: list[dict[str, Any]]
    # (parameter path, URL) of each image, in the order of their placeholders.
    images: list[tuple[str, str]]
    # vLLM SamplingParams keyword arguments; the same keys for every request (Ray Data carries them as one
    # Arrow struct, so a key missing in some rows would come back as None in others).
    sampling: dict[str, Any]
    tool_request: Optional[ToolRequest]
    # Whether to render with the tool chat template: tools offered, or tool turns in the conversation.
    tool_template: bool


def read_envelope(text: str | bytes, max_request_bytes: int) -> dict[str, Any]:
    """The line as a JSON object; file-level LineError when it is too large, not JSON or not an object."""
    if len(text) > max_request_bytes:
        raise file_error("request_too_large", f"the line has {len(text)} bytes or more, over the limit of "
                         f"{max_request_bytes} (openai_batch.max_request_bytes)")
    try:
        line = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise file_error("invalid_json_line", f"the line is not valid JSON: {exc}") from None
    if not isinstance(line, dict):
        raise file_error("invalid_json_line", f"the line must be a JSON object, got {type(line).__name__}")
    return line


def custom_id_of(line: Mapping[str, Any]) -> Optional[str]:
    """The line's custom_id when it is a usable one (a non-empty string), else None."""
    value = line.get("custom_id")
    return value if isinstance(value, str) and value.strip() else None


def parse_request_line(text: str | bytes, limits: RequestLimits,
                       duplicate_ids: frozenset[str] = frozenset()) -> ParsedRequest:
    """Read and check one line; raise LineError for the first problem found (see the module docstring)."""
    line = read_envelope(text, limits.max_request_bytes)
    custom_id = custom_id_of(line)
    if custom_id is None:
        raise file_error("missing_custom_id", "the line has no custom_id (a non-empty string that matches the "
                         "output line to its request)")
    if custom_id in duplicate_ids:
        raise file_error("duplicate_custom_id", f"custom_id {custom_id!r} appears more than once in the input; "
                         "every occurrence is refused, since which one is meant cannot be told")
    if line.get("method") != "POST":
        raise file_error("invalid_method", f"method must be 'POST', got {line.get('method')!r}")
    if line.get("url") != CHAT_COMPLETIONS_URL:
        raise file_error("unsupported_url", f"url {line.get('url')!r} is not supported; this job serves "
                         f"{CHAT_COMPLETIONS_URL} only")
    body = line.get("body")
    if not isinstance(body, dict):
        raise file_error("invalid_body", f"body must be a JSON object, got {type(body).__name__}")
    return parse_body(custom_id, body, limits)


def parse_body(custom_id: str, body: dict[str, Any], limits: RequestLimits) -> ParsedRequest:
    check_fields(body)
    check_model(body.get("model"), limits)
    conversation, images, tool_turns = parse_messages(body.get("messages"))
    limits.check_image_count([param for param, _ in images])
    tool_request = parse_tools(body)
    sampling = sampling_params(body, limits)
    structured = response_format_constraint(body.get("response_format"))
    if structured is not None:
        if tool_request is not None and tool_request.tool_choice not in ("auto", "none"):
            raise bad_param("response_format", "cannot be combined with a tool_choice that forces a call "
                            "(both constrain the same output)", "invalid_request")
        sampling["structured_outputs"] = structured
    return ParsedRequest(custom_id, conversation, images, sampling, tool_request,
                         tool_template=tool_request is not None or tool_turns)


def check_fields(body: Mapping[str, Any]) -> None:
    for name, value in body.items():
        if name in HONOURED or name in NO_EFFECT:
            continue
        if name in DEFAULT_ONLY:
            if not _is_default(value, DEFAULT_ONLY[name]):
                raise LineError("unsupported_parameter", _WHY_NOT.get(name, f"{name} is not supported") +
                                f" (got {json.dumps(value)[:80]})", param=name)
            continue
        raise LineError("unsupported_parameter", f"unknown or unsupported parameter {name!r}", param=name)
    if "messages" not in body:
        raise LineError("missing_required_parameter", "messages is required", param="messages")


def check_model(model: Any, limits: RequestLimits) -> None:
    if not isinstance(model, str) or not model:
        raise LineError("missing_required_parameter", "model is required (a string)", param="model")
    limits.check_model(model)


# ------------------------------------------------------------------------------------------- messages
def parse_messages(messages: Any) -> tuple[list[dict[str, Any]], list[tuple[str, str]], bool]:
    """(conversation, images, whether any turn is a tool call or result)."""
    if not isinstance(messages, list) or not messages:
        raise bad_param("messages", "must be a non-empty list of messages", "invalid_type")
    conversation: list[dict[str, Any]] = []
    images: list[tuple[str, str]] = []
    tool_turns = False
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_param(where, "must be an object", "invalid_type")
        role = message.get("role")
        if role not in _ROLES:
            raise bad_param(f"{where}.role", f"{role!r} is not supported (use {', '.join(_ROLES)})")
        content = message.get("content")
        if role in ("system", "developer"):
            conversation.append({"role": "system", "content": _text_only(content, f"{where}.content")})
        elif role == "user":
            conversation.append({"role": "user", "content": _user_content(content, f"{where}.content", images)})
        elif role == "tool":
            if not isinstance(message.get("tool_call_id"), str):
                raise bad_param(f"{where}.tool_call_id", "is required for a tool message", "missing_required_parameter")
            conversation.append({"role": "tool", "tool_call_id": message["tool_call_id"],
                                 "content": _text_only(content, f"{where}.content")})
            tool_turns = True
        else:
            turn: dict[str, Any] = {"role": "assistant",
                                    "content": None if content is None else _text_only(content, f"{where}.content")}
            if message.get("function_call") is not None or message.get("audio") is not None:
                raise bad_param(where, "function_call and audio in assistant messages are not supported",
                                "unsupported_parameter")
            if message.get("tool_calls"):
                turn["tool_calls"] = _tool_calls(message["tool_calls"], f"{where}.tool_calls")
                tool_turns = True
            elif content is None:
                raise bad_param(f"{where}.content", "an assistant message needs content or tool_calls",
                                "missing_required_parameter")
            conversation.append(turn)
    return conversation, images, tool_turns


def _text_only(content: Any, where: str) -> str:
    """String content, or the text of text parts joined by newlines."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad_param(f"{where}[{j}]", f"only text parts are allowed here, got {kind!r}",
                                "unsupported_content_type")
            texts.append(part["text"])
        return "\n".join(texts)
    raise bad_param(where, "must be a string or a list of text parts", "invalid_type")


def _user_content(content: Any, where: str, images: list[tuple[str, str]]) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise bad_param(where, "must be a string or a non-empty list of content parts", "invalid_type")
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        param = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else None
            if not isinstance(url, str) or not url.strip():
                raise bad_param(f"{param}.image_url.url", "must be a URL string", "invalid_image_url")
            # `detail` has no effect: Gemma 3 sees every image at its one resolution (896 px).
            images.append((f"{param}.image_url.url", url.strip()))
            parts.append({"type": "image"})
        else:
            raise bad_param(f"{param}.type", f"{kind!r} is not supported (allowed: text, image_url)",
                            "unsupported_content_type")
    return parts


def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """Assistant tool calls with their arguments as mappings, as the tool template renders them (and as
    vLLM's server passes them to templates)."""
    if not isinstance(calls, list):
        raise bad_param(where, "must be a list", "invalid_type")
    parsed = []
    for k, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise bad_param(f"{where}[{k}]", "expected {\"type\": \"function\", \"function\": {\"name\", "
                            "\"arguments\"}}", "invalid_type")
        arguments = function.get("arguments") or "{}"
        try:
            decoded = json.loads(arguments) if isinstance(arguments, str) else arguments
        except json.JSONDecodeError as exc:
            raise bad_param(f"{where}[{k}].function.arguments", f"is not valid JSON: {exc}") from None
        if not isinstance(decoded, dict):
            raise bad_param(f"{where}[{k}].function.arguments", "must be a JSON object")
        parsed.append({"id": call.get("id"), "type": "function",
                       "function": {"name": function["name"], "arguments": decoded}})
    return parsed


# ---------------------------------------------------------------------------------- tools and sampling
def parse_tools(body: Mapping[str, Any]) -> Optional[ToolRequest]:
    """The request's tools and tool choice through pipeline.tools (the checks the records get)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if not tools:
        if choice not in (None, "none", "auto"):
            raise bad_param("tool_choice", "is only allowed when tools are given")
        return None
    if not isinstance(tools, list):
        raise bad_param("tools", "must be a list of tool definitions", "invalid_type")
    if isinstance(choice, dict):
        function = choice.get("function")
        if choice.get("type") != "function" or not isinstance(function, dict) \
                or not isinstance(function.get("name"), str):
            raise bad_param("tool_choice", "must be 'auto', 'none', 'required' or {\"type\": \"function\", "
                            "\"function\": {\"name\": ...}}")
        choice = function["name"]
    elif choice is not None and choice not in ("auto", "none", "required"):
        raise bad_param("tool_choice", f"{choice!r} must be 'auto', 'none', 'required' or a named function")
    try:
        request = build_tool_request(json.dumps(tools), choice, (), "auto")
    except ToolRequestError as exc:
        raise LineError("invalid_tools", str(exc), param="tools") from None
    assert request is not None
    if body.get("parallel_tool_calls") is False and request.tool_choice in ("auto", "required"):
        raise bad_param("parallel_tool_calls", "false is supported only with a named tool_choice or 'none' "
                        "(Gemma 3 may answer with several calls)", "unsupported_parameter")
    return request


def sampling_params(body: Mapping[str, Any], limits: RequestLimits) -> dict[str, Any]:
    params = dict(limits.sampling_defaults)
    limit_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(limit_name)
    if max_tokens is not None:
        if not is_int(max_tokens) or max_tokens < 1:
            raise bad_param(limit_name, f"must be an integer >= 1, got {json.dumps(max_tokens)}")
        limits.check_token_cap(limit_name, max_tokens)
        params["max_tokens"] = max_tokens
    for name, low, high, low_open in (("temperature", 0.0, 2.0, False), ("top_p", 0.0, 1.0, True),
                                      ("presence_penalty", -2.0, 2.0, False), ("frequency_penalty", -2.0, 2.0, False),
                                      ("repetition_penalty", 0.0, 2.0, True)):
        value = body.get(name)
        if value is None:
            continue
        if not _is_number(value) or value > high or value < low or (low_open and value == low):
            bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
            raise bad_param(name, f"must be a number in {bound}, got {json.dumps(value)}")
        params[name] = float(value)
    if body.get("top_k") is not None:
        if not is_int(body["top_k"]) or body["top_k"] < -1:
            raise bad_param("top_k", f"must be an integer >= -1 (0 or -1 disable it), got {json.dumps(body['top_k'])}")
        params["top_k"] = body["top_k"]
    if body.get("seed") is not None:
        if not is_int(body["seed"]):
            raise bad_param("seed", f"must be an integer, got {json.dumps(body['seed'])}")
        params["seed"] = body["seed"]
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) \
                or len(stops) > MAX_STOP_SEQUENCES:
            raise bad_param("stop", f"must be a non-empty string or a list of at most {MAX_STOP_SEQUENCES} of them")
        params["stop"] = stops or None
    return params


def response_format_constraint(response_format: Any) -> Optional[dict[str, str]]:
    """vLLM structured_outputs for `response_format`; None for plain text.

    The schema travels as a JSON string, as pipeline.tools does for forced calls: Ray Data carries one
    Arrow type per column, and schemas of different shapes per row would not fit one.
    """
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json": json.dumps({"type": "object"})}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise bad_param("response_format.json_schema.schema", "is required (a JSON schema object)",
                            "missing_required_parameter")
        from jsonschema.exceptions import SchemaError
        from jsonschema.validators import validator_for

        try:
            validator_for(schema).check_schema(schema)
        except SchemaError as exc:
            raise bad_param("response_format.json_schema.schema",
                            f"is not a valid JSON schema: {exc.message}") from None
        return {"json": json.dumps(schema, ensure_ascii=False)}
    raise bad_param("response_format.type", f"{kind!r} must be 'text', 'json_object' or 'json_schema'")


def _is_default(value: Any, defaults: tuple[Any, ...]) -> bool:
    """`value` is one of `defaults` with the same type (so that True does not pass for 1)."""
    return value is None or any(type(value) is type(d) and value == d for d in defaults if d is not None)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
