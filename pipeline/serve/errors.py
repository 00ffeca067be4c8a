"""One OpenAI error shape for every error the endpoint returns.

The guard raises its own `ApiError`s. Errors raised further in arrive in other shapes: FastAPI's schema
validation (`RequestValidationError`), Ray's ingress (`{"error": {"message": "Message: ..., Internal
exception: ..., original exception: ...", "code": 400, ...}}`, losing vLLM's `param`), and Ray Serve's
plain-text 503 when a deployment's queue is full. `reshape_error_body` turns any of them into
`{"error": {"message", "type", "param", "code"}}` with the message the client needs.

Workaround for ray-project/ray#64833 (Ray's OpenAI error envelope is not spec-compliant) and #64832
(a 500's body carries the original exception, for a replica error the whole remote traceback): only
the leading "Message: ..." part of Ray's message reaches the client. Remove the Ray-specific parsing
when Ray's ingress returns OpenAI-shaped errors itself; the guard's own errors need none of it.
"""
from __future__ import annotations

import json
import re
from typing import Any, Optional

from pipeline.openai.errors import error_body
from pipeline.serve.guard import CHAT_PATH, ApiError

_RAY_WRAPPED = re.compile(r"^Message: (?P<message>.*?), Internal exception: .*$", re.DOTALL)
_REQUEST_ID = re.compile(r"\s*\(Request ID: [^)]*\)")
_TYPES_BY_STATUS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
                    422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable_error"}
_OPENAI_TYPES = frozenset(_TYPES_BY_STATUS.values()) | {"server_error"}


# What Ray raises in the ingress when the engine replica under a request went away (its node lost, its
# process killed) or no replica is left to take it: the request itself was fine and another replica can
# answer it, so the client gets a retryable 503 (code "replica_lost") instead of Ray's bodiless-cause 500, or
# a stream's error event instead of a silently truncated stream (docs/preemption.md). Matched by class name so this module needs no Ray.
LOST_REPLICA_ERRORS = frozenset({"RayActorError", "ActorDiedError", "ActorUnavailableError",
                                 "ReplicaUnavailableError", "DeploymentUnavailableError"})


def is_lost_replica(exc: BaseException) -> bool:
    """Also when raised from one: once a stream has begun, Starlette re-raises an error that has a handler
    (the ingress registers the 503 for these) as RuntimeError("Caught handled exception, but response
    already started.") from it; missing that, the proxy ended the stream cleanly, a silent truncation."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if any(cls.__name__ in LOST_REPLICA_ERRORS for cls in type(exc).__mro__):
            return True
        seen.add(id(exc))
        exc = exc.__cause__
    return False


def lost_replica_error() -> ApiError:
    return ApiError(503, "the model replica serving this request was lost (its node went away or it "
                         "crashed); retry the request", type="service_unavailable_error", code="replica_lost")


def validation_error(errors: list[dict[str, Any]]) -> ApiError:
    """A 400 from pydantic's errors for the request schema, naming the offending parameter.

    A value that matches none of a union's members (a message with an unknown role) gives one error
    per member; they are reported once, at the parameter that holds the union.
    """
    if not errors:
        return ApiError(400, "request does not match the API schema", code="invalid_value")
    param, rest = split_loc(errors[0].get("loc", ()))
    if param is None:
        # A model-level check (e.g. vLLM's VLLMValidationError from a model validator) names the
        # parameter on the exception rather than in the location.
        cause = (errors[0].get("ctx") or {}).get("error")
        param = getattr(cause, "parameter", None) if isinstance(getattr(cause, "parameter", None), str) else None
    if not rest:
        message = f"{param}: {errors[0].get('msg', 'invalid value')}" if param else str(errors[0].get("msg"))
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problems)"
        return ApiError(400, message, param=param, code="invalid_value")
    details: list[str] = []
    roles: list[str] = []
    for error in errors:
        where, field = split_loc(error.get("loc", ()))
        if where != param:
            continue
        if field == "role" and error.get("type") == "literal_error":
            roles += [str(r) for r in (error.get("ctx") or {}).get("expected", "").replace("'", "").split(" or ")]
            continue
        detail = f"{field}: {error.get('msg')}"
        if detail not in details:
            details.append(detail)
    if roles:
        details.insert(0, f"role must be one of {', '.join(dict.fromkeys(r.strip() for r in roles if r.strip()))}")
    return ApiError(400, f"{param or 'body'} matches none of the accepted shapes ({'; '.join(details[:3])}"
                         f"{'; ...' if len(details) > 3 else ''})", param=param, code="invalid_value")


def split_loc(loc: Any) -> tuple[Optional[str], str]:
    """('body', 'messages', 0, 'UserMessage', 'role') -> ('messages[0]', 'role').

    The first part is the parameter path up to a union member's tag (a class or type name); the second
    is the field inside that member, empty when the error has no union tag.
    """
    path, rest = "", []
    for part in loc or ():
        if rest:
            if not _is_tag(part):
                rest.append(str(part))
            continue
        if part == "body" and not path:
            continue
        if _is_tag(part):
            rest.append("")
        elif isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or None, ".".join(r for r in rest if r)


def _is_tag(part: Any) -> bool:
    """A union member or validator tag in a pydantic loc (field names of the API are snake_case)."""
    return isinstance(part, str) and (part[:1].isupper() or "[" in part or part.startswith("function-")
                                      or part in ("str", "int", "float", "bool", "list", "dict"))


def reshape_error_body(status: int, raw: bytes, content_type: str, path: str = "") -> tuple[int, dict[str, Any]]:
    """(status, OpenAI error body) for any error response produced behind the guard."""
    error: dict[str, Any] = {}
    if "json" in content_type:
        try:
            parsed = json.loads(raw or b"null")
        except (UnicodeDecodeError, json.JSONDecodeError):
            parsed = None
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
            error = parsed["error"]
        elif isinstance(parsed, dict) and "detail" in parsed:  # FastAPI's HTTPException shape
            error = {"message": parsed["detail"] if isinstance(parsed["detail"], str) else json.dumps(parsed["detail"])}
    if not error:
        text = raw.decode("utf-8", "replace").strip()
        error = {"message": text or f"HTTP {status}"}
    message = str(error.get("message") or f"HTTP {status}")
    wrapped = _RAY_WRAPPED.match(message)
    if wrapped:
        message = wrapped.group("message")
    message = _REQUEST_ID.sub("", message).strip()
    kind = error.get("type")
    if kind not in _OPENAI_TYPES:
        kind = _TYPES_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")
    code = error.get("code") if isinstance(error.get("code"), str) else None
    param = error.get("param") if isinstance(error.get("param"), str) else None
    if status == 400 and "maximum context length" in message:
        # vLLM's context-length check (its own param, input_tokens, does not survive Ray's ingress).
        code, param = "context_length_exceeded", "messages" if path == CHAT_PATH else "prompt"
    if status == 503 and code is None:
        code = "overloaded"
    return status, error_body(message, type=kind, param=param, code=code)
