"""The guard as pure ASGI middleware, in front of the FastAPI app of Ray's OpenAI ingress.

Order per request: the API key (before anything is read), the declared then the actual body size
(reading stops at the limit), the body checks of `serve_guard` in a worker thread (image decode and
fetch block), then the inner app receives the checked body, rewritten only when an http(s) image was
inlined. On the way out, any error response is reshaped to the OpenAI error body (`serve_errors`).
Liveness and readiness paths stay open: probes carry no key.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Optional

from starlette.datastructures import Headers

from .serve_errors import reshape_error_body
from .serve_guard import (
    CHAT_PATH,
    COMPLETIONS_PATH,
    ApiError,
    ApiKeyCheck,
    FetchImage,
    RequestPolicy,
    body_too_large,
    check_content_length,
    check_request,
    parse_json_body,
)

logger = logging.getLogger(__name__)

# Ray's proxy answers /-/healthz and /-/routes itself, before any application.
OPEN_PATHS = frozenset({"/health", "/ready"})


class GuardMiddleware:
    """Pure ASGI middleware: API key, body size, body checks and image inlining; error reshaping."""

    def __init__(self, app, *, keys: ApiKeyCheck, policy: RequestPolicy, fetch_image: FetchImage):
        self.app = app
        self.keys = keys
        self.policy = policy
        self.fetch_image = fetch_image

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        try:
            self.keys.check(headers.get("authorization"))
            if scope["method"] in ("POST", "PUT", "PATCH"):
                scope, receive = await self._checked_body(scope, receive, headers)
        except ApiError as error:
            await _send_json(send, error.status, error.body(),
                             [(b"www-authenticate", b"Bearer")] if error.status == 401 else [])
            return
        await self.app(scope, receive, _ErrorReshaper(send, scope["path"]))

    async def _checked_body(self, scope, receive, headers: Headers):
        check_content_length(headers.get("content-length"), self.policy)
        raw = await _read_body(receive, self.policy)
        path = scope["path"]
        if path in (CHAT_PATH, COMPLETIONS_PATH) or "json" in headers.get("content-type", ""):
            body = parse_json_body(raw)
            # Image decode and fetch block: keep them off the event loop that serves every other request.
            if await asyncio.to_thread(check_request, path, body, self.policy, self.fetch_image):
                raw = json.dumps(body).encode()
        new_headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        new_headers.append((b"content-length", str(len(raw)).encode()))
        return {**scope, "headers": new_headers}, _replay(raw, receive)


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

    async def __call__(self, message):
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
            return
        await self._send(message)
