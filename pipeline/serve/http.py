"""The guard as pure ASGI middleware, in front of the FastAPI app of Ray's OpenAI ingress.

Order per request: the API key (before anything is read), a refusal of the key's rate limit still in
force (answered from a cache, before the body is read), the declared then the actual body size
(reading stops at the limit), JSON parsing (depth bounded) and the cheap body checks of
`guard`, the rate limiter (one request plus the body's token estimate; 429 with Retry-After),
then image decode and fetch on a small pool of worker threads per replica (serve.image_decode_concurrency:
bounded memory however many images arrive at once), then the inner app receives the checked body,
rewritten when it carried images. A request refused with a 400 still counts one request against its
key, so a flood of bad requests is limited too. On the way out, any error response is reshaped to the
OpenAI error body (`errors`). Liveness and readiness paths stay open: probes carry no key.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
from typing import Optional

from starlette.datastructures import Headers

from pipeline.config import RateLimit
from pipeline.serve.errors import is_lost_replica, lost_replica_error, reshape_error_body
from pipeline.serve.guard import (
    ApiError,
    ApiKeyCheck,
    FetchImage,
    RequestPolicy,
    body_too_large,
    check_body,
    check_content_length,
    parse_json_body,
    prepare_images,
)
from pipeline.serve.limits import Decision, SharedLimiter, TokenBuckets, retry_after_header

logger = logging.getLogger(__name__)

# Ray's proxy answers /-/healthz and /-/routes itself, before any application.
OPEN_PATHS = frozenset({"/health", "/ready"})
# Bodies of form content types are not JSON (audio uploads); everything else is parsed as JSON, as
# FastAPI does when the content type is missing.
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
# Larger bodies are parsed in a worker thread, so that one big body does not stall the event loop.
INLINE_PARSE_BYTES = 256 * 1024


class GuardMiddleware:
    """Pure ASGI middleware: API key, rate limit, body size, body checks and image preparation;
    error reshaping."""

    def __init__(self, app, *, keys: ApiKeyCheck, policy: RequestPolicy, fetch_image: FetchImage,
                 limiter: Optional[SharedLimiter] = None):
        self.app = app
        self.keys = keys
        self.policy = policy
        self.fetch_image = fetch_image
        # Without a shared limiter (tests), one process's own buckets with the default limits.
        self.limiter = limiter or SharedLimiter(None, TokenBuckets(RateLimit()))
        self._image_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=policy.image_decode_concurrency, thread_name_prefix="image-decode")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        try:
            key = self.keys.check(headers.get("authorization"))
            refusal = self.limiter.cached_refusal(key)
            if refusal is not None:
                raise rate_limited(refusal)
            if scope["method"] in ("POST", "PUT", "PATCH"):
                scope, receive = await self._checked_body(scope, receive, headers, key)
            else:
                await self._admit(key, 0)
        except ApiError as error:
            extra = [(b"www-authenticate", b"Bearer")] if error.status == 401 else []
            await _send_json(send, error.status, error.body(), extra + error.headers)
            return
        reshaper = _ErrorReshaper(send, scope["path"])
        try:
            await self.app(scope, receive, reshaper)
        except Exception as exc:
            # The engine replica went away under a response already begun (a stream): Ray's ingress would
            # end the stream cleanly, without its finish reason (a truncation no client notices; the
            # reshaper holds that end back). End it with an OpenAI error event instead (one a client can
            # tell apart and retry); an unbegun response gets the 503 (Ray's route errors are turned into
            # one by the ingress's exception handler).
            if not is_lost_replica(exc) or not await reshaper.end_with(lost_replica_error()):
                await reshaper.release()
                raise
            logger.warning("%s %s: engine replica lost mid-response (%s)", scope["method"], scope["path"],
                           type(exc).__name__)
        else:
            await reshaper.release()

    async def _checked_body(self, scope, receive, headers: Headers, key: str):
        path = scope["path"]
        try:
            check_content_length(headers.get("content-length"), self.policy)
            raw = await _read_body(receive, self.policy)
            if headers.get("content-type", "").split(";")[0].strip().lower() in FORM_TYPES:
                body, shape = None, None
            else:
                body = (parse_json_body(raw, self.policy.max_json_depth) if len(raw) <= INLINE_PARSE_BYTES else
                        await asyncio.to_thread(parse_json_body, raw, self.policy.max_json_depth))
                shape = check_body(path, body, self.policy, len(raw))
        except ApiError as error:
            if error.code != "client_disconnected":
                await self.limiter.acquire(key, 0)  # counts the request; the 400 stands either way
            raise
        await self._admit(key, shape.cost_tokens if shape is not None else len(raw) // 4)
        if shape is not None and shape.images:
            # Decode and fetch block: on this replica's small pool, off the event loop.
            loop = asyncio.get_running_loop()
            if await loop.run_in_executor(self._image_pool, prepare_images, shape, self.policy, self.fetch_image):
                raw = json.dumps(body).encode()
        new_headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        new_headers.append((b"content-length", str(len(raw)).encode()))
        return {**scope, "headers": new_headers}, _replay(raw, receive)

    async def _admit(self, key: str, tokens: int) -> None:
        decision = await self.limiter.acquire(key, tokens)
        if decision.allowed:
            return
        if decision.too_large:
            raise ApiError(400, f"this request counts about {tokens} tokens (prompt estimate plus max_tokens x n), "
                                f"more than this API key's limit of {decision.tokens_per_minute} tokens per minute "
                                "(serve.rate_limit); lower max_tokens or send less",
                           code="rate_limit_too_small")
        raise rate_limited(decision, tokens)


def rate_limited(decision: Decision, tokens: Optional[int] = None) -> ApiError:
    """The 429 of a refused request: OpenAI's shape (type "requests" or "tokens", code
    rate_limit_exceeded) and a Retry-After header in whole seconds."""
    retry = retry_after_header(decision)
    if decision.limit == "tokens":
        what = f"{decision.tokens_per_minute} tokens per minute" + (
            f" (this request counts about {tokens})" if tokens is not None else "")
    else:
        what = f"{decision.requests_per_minute} requests per minute"
    return ApiError(429, f"rate limit reached for this API key: {what}; try again in {retry} s",
                    type=decision.limit or "requests", code="rate_limit_exceeded",
                    headers=[(b"retry-after", retry.encode())])


async def _read_body(receive, policy: RequestPolicy) -> bytes:
    chunks, total = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ApiError(400, "client disconnected while sending the body", code="client_disconnected")
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > policy.max_body_bytes:
            raise body_too_large(total, policy)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(raw: bytes, receive):
    """The (checked, maybe rewritten) body once, then the connection's own messages (disconnect)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await receive()

    return replayed


async def _send_json(send, status: int, body: dict, extra_headers: list[tuple[bytes, bytes]]) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()), *extra_headers]})
    await send({"type": "http.response.body", "body": payload})


class _ErrorReshaper:
    """Wraps `send`: an error response (status >= 400) leaves in the OpenAI error shape.

    Success responses, streamed ones included, pass through untouched; an error body is small and
    buffered whole before it is rewritten.
    """

    def __init__(self, send, path: str):
        self._send = send
        self._path = path
        self._start: Optional[dict] = None
        self._chunks: list[bytes] = []
        self._sent_start = self._finished = self._event_stream = False
        self._held_end: Optional[dict] = None

    async def end_with(self, error: ApiError) -> bool:
        """End a response the app failed to finish with `error`: the JSON error if nothing was sent yet,
        else a last `data: {"error": ...}` event if it is a stream (what OpenAI's clients raise as an
        APIError). False when neither can be sent (a JSON body already begun, or the response complete)."""
        if self._finished:
            return False
        if not self._sent_start:
            await _send_json(self._send, error.status, error.body(), error.headers)
        elif self._event_stream:
            held, self._held_end = self._held_end, None
            if held is not None and held.get("body"):
                await self._send({**held, "more_body": True})
            await self._send({"type": "http.response.body", "more_body": False,
                              "body": f"data: {json.dumps(error.body())}\n\n".encode()})
        else:
            return False
        self._finished = True
        return True

    async def release(self) -> None:
        """Send a stream's held end (the app returned, or failed otherwise than by a lost replica)."""
        held, self._held_end = self._held_end, None
        if held is not None:
            self._finished = True
            await self._send(held)

    async def __call__(self, message):
        if message["type"] == "http.response.start" and message["status"] < 400:
            self._sent_start = True
            content_type = Headers(raw=message["headers"]).get("content-type", "")
            self._event_stream = content_type.startswith("text/event-stream")
        elif message["type"] == "http.response.body" and self._start is None and not message.get("more_body"):
            if self._event_stream:
                # A stream's end is held until the app returns (release): Ray's ingress wraps its routes in
                # a BaseHTTPMiddleware, which ends a stream whose app failed (a lost replica) with this
                # clean last message before the error reaches the guard, a truncation no client notices.
                self._held_end = message
                return
            self._finished = True
        if message["type"] == "http.response.start" and message["status"] >= 400:
            self._start = message
            return
        if self._start is not None and message["type"] == "http.response.body":
            self._chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            start, self._start = self._start, None
            content_type = Headers(raw=start["headers"]).get("content-type", "")
            status, body = reshape_error_body(start["status"], b"".join(self._chunks), content_type,
                                              self._path)
            keep = [(k, v) for k, v in start["headers"] if k.lower() not in (b"content-length", b"content-type")]
            payload = json.dumps(body).encode()
            await self._send({**start, "status": status,
                              "headers": keep + [(b"content-type", b"application/json"),
                                                 (b"content-length", str(len(payload)).encode())]})
            await self._send({"type": "http.response.body", "body": payload})
            self._sent_start = self._finished = True
            return
        await self._send(message)
