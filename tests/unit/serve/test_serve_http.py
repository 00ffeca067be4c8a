"""The guard middleware over HTTP, and the one OpenAI error shape (pure: no Ray, no engine)."""
import asyncio
import base64
import json
import threading
import time

import httpx
import pytest
from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.testclient import TestClient

import pipeline.serve.guard
from ray.exceptions import ActorDiedError
from pipeline.config import PipelineConfig, RateLimit
from pipeline.serve.errors import reshape_error_body, split_loc, validation_error
from pipeline.serve.guard import ApiKeyCheck, RequestPolicy
from pipeline.serve.http import GuardMiddleware
from pipeline.serve.limits import SharedLimiter, TokenBuckets
from tests.unit.serve.test_serve_guard import MODEL, TEXT, chat, data_url, decoded, image_part, png, png_declaring

KEY = {"Authorization": "Bearer test-key"}


def fake_openai_app() -> FastAPI:
    """FakeOpenAIApp: stands in for the FastAPI app of Ray's OpenAI ingress, which needs Ray Serve and
    an engine (the integration tests run that one). It echoes what reached it and produces the error
    shapes Ray and Serve produce."""
    app = FastAPI()
    # As ingress.py registers it: a lost replica before the response is a 503. Once a stream has begun,
    # Starlette re-raises such a handled error as RuntimeError("Caught handled exception, but response
    # already started.") from it, which is what reaches the guard.
    app.add_exception_handler(ActorDiedError, lambda request, exc: JSONResponse({"error": {}}, status_code=503))

    @app.middleware("http")
    async def passthrough(request: Request, call_next):
        # Ray's ingress wraps its routes in a BaseHTTPMiddleware (its exception handling), which ends a
        # stream whose app failed with a clean last body message before the error reaches the guard.
        return await call_next(request)

    @app.post("/v1/chat/completions")
    async def chat_route(request: Request):
        raw = await request.body()
        return {"received": json.loads(raw), "content_length": request.headers["content-length"], "bytes": len(raw)}

    @app.get("/v1/models")
    async def models():
        return {"data": [{"id": MODEL}]}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def ray_wrapped_error():
        return JSONResponse({"object": "error", "error": {
            "message": "Message: This model's maximum context length is 1024 tokens. However, your prompt "
                       "contains 1500 input tokens. (parameter=input_tokens, value=1500) (Request ID: abc), "
                       "Internal exception: x (Request ID: abc), original exception: y",
            "type": "BadRequestError", "param": None, "code": 400}}, status_code=400)

    @app.get("/v1/overloaded")
    async def overloaded():
        return PlainTextResponse("Request dropped due to backpressure (num_queued_requests=4, "
                                 "max_queued_requests=4).", status_code=503)

    @app.get("/v1/stream")
    async def stream():
        async def chunks():
            for i in range(3):
                yield f"data: {i}\n\n"
        return StreamingResponse(chunks(), media_type="text/event-stream")

    @app.get("/v1/stream-lost")
    async def stream_lost():
        # What Ray's ingress does when the engine replica's node dies mid-stream: the error escapes.
        async def chunks():
            yield "data: 0\n\n"
            raise ActorDiedError()
        return StreamingResponse(chunks(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def client():
    config = PipelineConfig.load(overrides=["serve.max_body_bytes=50000"], environ={})
    app = GuardMiddleware(fake_openai_app(), keys=ApiKeyCheck(["test-key"]), policy=RequestPolicy.from_config(config),
                          fetch_image=lambda url: pytest.fail("no fetch expected"))
    with TestClient(app) as test_client:
        yield test_client


@pytest.mark.parametrize("method, path", [
    ("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/stream"),
    ("GET", "/docs"), ("POST", "/tokenize"),
])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}], ids=["no-key", "wrong-key"])
def test_every_route_needs_a_key(client, method, path, headers):
    response = client.request(method, path, headers=headers, json=chat(TEXT))
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_health_is_open(client):
    assert client.get("/health").json() == {"status": "ok"}


def test_checked_body_reaches_the_app(client):
    body = chat(TEXT, max_tokens=5)
    response = client.post("/v1/chat/completions", headers=KEY, json=body)
    assert response.status_code == 200
    echoed = response.json()
    assert echoed["received"] == body and int(echoed["content_length"]) == echoed["bytes"]


def test_images_reach_the_app_at_the_model_size(client):
    body = chat(image_part(data_url(png((1200, 900)))), TEXT, max_tokens=5)
    echoed = client.post("/v1/chat/completions", headers=KEY, json=body).json()
    assert int(echoed["content_length"]) == echoed["bytes"]
    part = echoed["received"]["messages"][0]["content"][0]
    assert decoded(part["image_url"]["url"]).size == (896, 896)
    assert echoed["received"]["messages"][0]["content"][1] == TEXT and echoed["received"]["max_tokens"] == 5


@pytest.mark.parametrize("content, code, words", [
    pytest.param(b"[" * 5000 + b"]" * 5000, "invalid_json", ["nests 5000 levels deep"], id="deep-json"),
    pytest.param(b'{"model": "gemma-3-12b-it", "x": ' + b'{"a": ' * 3000 + b"1" + b"}" * 3001, "invalid_json",
                 ["nests 3001 levels deep"], id="deep-objects"),
    pytest.param(b'{"max_tokens": NaN, "messages": []}', "invalid_json", ["NaN"], id="nan"),
    pytest.param(json.dumps(chat(TEXT, n=1000)).encode(), "n_exceeded", ["n 1000"], id="n-1000"),
    pytest.param(json.dumps(chat(TEXT, max_tokens=5.0)).encode(), "invalid_type", ["got 5.0"], id="float-max-tokens"),
    pytest.param(json.dumps(chat(image_part(data_url(png_declaring(8000, 8000))), TEXT)).encode(), "too_many_pixels",
                 ["8000x8000"], id="pixel-bomb"),
])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/tokenize"])
def test_bad_bodies_are_400s_on_every_route(client, path, content, code, words):
    for content_type in ("application/json", None):  # FastAPI parses JSON without a content type too
        headers = {**KEY, **({"content-type": content_type} if content_type else {})}
        response = client.post(path, headers=headers, content=content)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == code and error["type"] == "invalid_request_error"
        for word in words:
            assert word in error["message"]


def limited_app(rpm: int, tpm: int = 100_000, **config_overrides) -> GuardMiddleware:
    sets = [f"{k}={v}" for k, v in config_overrides.items()]
    config = PipelineConfig.load(overrides=sets, environ={})
    limiter = SharedLimiter(None, TokenBuckets(RateLimit(requests_per_minute=rpm, tokens_per_minute=tpm)))
    return GuardMiddleware(fake_openai_app(), keys=ApiKeyCheck(["test-key", "other-key"]),
                           policy=RequestPolicy.from_config(config), fetch_image=lambda url: pytest.fail("no fetch"),
                           limiter=limiter)


def test_a_key_over_its_rate_gets_429_with_retry_after():
    with TestClient(limited_app(rpm=3)) as client:
        assert [client.get("/v1/models", headers=KEY).status_code for _ in range(3)] == [200, 200, 200]
        response = client.post("/v1/chat/completions", headers=KEY, json=chat(TEXT, max_tokens=5))
        assert response.status_code == 429
        assert response.headers["retry-after"] == "20"
        assert response.json() == {"error": {
            "message": "rate limit reached for this API key: 3 requests per minute; try again in 20 s",
            "type": "requests", "param": None, "code": "rate_limit_exceeded"}}
        # Refused from the cache before the body is read: not even a broken body gets a 400.
        broken = client.post("/v1/chat/completions", headers={**KEY, "content-type": "application/json"},
                             content=b"[" * 5000)
        assert broken.status_code == 429 and int(broken.headers["retry-after"]) <= 20
        other = client.get("/v1/models", headers={"Authorization": "Bearer other-key"})
        assert other.status_code == 200, "another key is not limited"
        assert "test-key" not in response.text


def test_tokens_per_minute():
    with TestClient(limited_app(rpm=100, tpm=600)) as client:
        ok = client.post("/v1/chat/completions", headers=KEY, json=chat(TEXT, max_tokens=500))
        assert ok.status_code == 200
        refused = client.post("/v1/chat/completions", headers=KEY, json=chat(TEXT, max_tokens=500))
        assert refused.status_code == 429 and refused.json()["error"]["type"] == "tokens"
        assert "600 tokens per minute (this request counts about 5" in refused.json()["error"]["message"]
        assert 45 <= int(refused.headers["retry-after"]) <= 60
        small = client.post("/v1/chat/completions", headers=KEY, json=chat(TEXT, max_tokens=5))
        assert small.status_code == 200, "a request that fits what is left passes"
        huge = client.post("/v1/chat/completions", headers={"Authorization": "Bearer other-key"},
                           json=chat(TEXT, max_tokens=2000))
        assert huge.status_code == 400 and huge.json()["error"]["code"] == "rate_limit_too_small"


def test_refused_requests_count_against_the_key():
    with TestClient(limited_app(rpm=2)) as client:
        for _ in range(2):
            assert client.post("/v1/chat/completions", headers=KEY, json=chat(TEXT, n=50)).status_code == 400
        assert client.post("/v1/chat/completions", headers=KEY, json=chat(TEXT)).status_code == 429


def test_image_decodes_are_bounded_per_replica(monkeypatch):
    """Eight large images at once: at most serve.image_decode_concurrency decodes run together, and a
    text request is answered while they are all still waiting (it is not queued behind them)."""
    running, most, done = 0, 0, 0
    lock = threading.Lock()
    release = threading.Event()
    real = pipeline.serve.guard.prepare_image

    def counted(*args):
        nonlocal running, most, done
        with lock:
            running += 1
            most = max(most, running)
        try:
            assert release.wait(30), "never released"
            return real(*args)
        finally:
            with lock:
                running -= 1
                done += 1

    monkeypatch.setattr(pipeline.serve.guard, "prepare_image", counted)
    app = limited_app(rpm=100, **{"serve.image_decode_concurrency": 2})
    body = chat(image_part(data_url(png((2000, 1500), (9, 9, 9)))), TEXT, max_tokens=5)

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://guard", timeout=60) as client:
            images = [asyncio.create_task(client.post("/v1/chat/completions", headers=KEY, json=body))
                      for _ in range(8)]
            while running < 2:
                await asyncio.sleep(0.01)
            text = await client.post("/v1/chat/completions", headers=KEY, json=chat(TEXT, max_tokens=5))
            decodes_done_by_then = done
            release.set()
            return [r.status_code for r in await asyncio.gather(*images)], text.status_code, decodes_done_by_then

    statuses, text_status, decodes_done_by_then = asyncio.run(run())
    assert statuses == [200] * 8 and text_status == 200
    assert most == 2, most
    assert decodes_done_by_then == 0


def test_declared_and_streamed_body_size(client):
    big = chat({"type": "text", "text": "x" * 60_000})
    response = client.post("/v1/chat/completions", headers=KEY, json=big)
    assert response.status_code == 400
    assert "exceeds the limit of 50000 bytes" in response.json()["error"]["message"]

    def chunked():  # no Content-Length: the limit applies while reading
        payload = json.dumps(big).encode()
        for start in range(0, len(payload), 8192):
            yield payload[start:start + 8192]

    response = client.post("/v1/chat/completions", headers={**KEY, "content-type": "application/json"},
                           content=chunked())
    assert response.status_code == 400 and response.json()["error"]["code"] == "request_too_large"


def test_bad_json_and_bad_image(client):
    response = client.post("/v1/chat/completions", headers={**KEY, "content-type": "application/json"},
                           content=b'{"model": "gemma-3-12b-it", "messages": [')
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
    bad = chat(image_part("data:image/jpeg;base64," + base64.b64encode(b"GIF89a-broken").decode()), TEXT)
    error = client.post("/v1/chat/completions", headers=KEY, json=bad).json()["error"]
    assert error["param"] == "messages[0].content[0].image_url.url" and error["type"] == "invalid_request_error"


def test_errors_from_inside_are_reshaped(client):
    error = client.post("/v1/completions", headers=KEY, json={"model": MODEL, "prompt": "hi"}).json()["error"]
    assert error == {"message": "This model's maximum context length is 1024 tokens. However, your prompt contains "
                                "1500 input tokens. (parameter=input_tokens, value=1500)",
                     "type": "invalid_request_error", "param": "prompt", "code": "context_length_exceeded"}
    response = client.get("/v1/overloaded", headers=KEY)
    assert response.status_code == 503 and response.headers["content-type"] == "application/json"
    assert response.json()["error"] == {
        "message": "Request dropped due to backpressure (num_queued_requests=4, max_queued_requests=4).",
        "type": "service_unavailable_error", "param": None, "code": "overloaded"}


def test_streams_pass_through(client):
    response = client.get("/v1/stream", headers=KEY)
    assert response.status_code == 200 and response.text == "data: 0\n\ndata: 1\n\ndata: 2\n\n"


def test_a_replica_lost_mid_stream_ends_the_stream_with_an_error_event(client):
    response = client.get("/v1/stream-lost", headers=KEY)
    assert response.status_code == 200
    first, last = response.text.split("\n\n")[:2]
    assert first == "data: 0"
    assert json.loads(last.removeprefix("data: "))["error"]["code"] == "replica_lost"


@pytest.mark.parametrize("error, status", [(ActorDiedError(), 503), (KeyError("a bug"), None)])
def test_a_replica_lost_before_the_response_is_a_retryable_503(error, status):
    """An app that fails before it answers (no FastAPI under the guard here: Ray's ingress turns its route
    errors into responses itself, ingress.py registers the 503 for a lost replica there)."""
    async def failing_app(scope, receive, send):
        raise error

    config = PipelineConfig.load(environ={})
    app = GuardMiddleware(failing_app, keys=ApiKeyCheck(["test-key"]), policy=RequestPolicy.from_config(config),
                          fetch_image=lambda url: pytest.fail("no fetch expected"))
    client = TestClient(app)  # no lifespan: the app has none
    if status is None:  # any other error is left to the app server (its 500)
        with pytest.raises(type(error)):
            client.get("/v1/models", headers=KEY)
        return
    response = client.get("/v1/models", headers=KEY)
    assert response.status_code == status
    assert response.json()["error"]["code"] == "replica_lost"
    assert response.json()["error"]["type"] == "service_unavailable_error"


@pytest.mark.parametrize("status, raw, content_type, path, expected", [
    pytest.param(404, b'{"detail": "Not Found"}', "application/json", "/v1/x",
                 {"message": "Not Found", "type": "invalid_request_error", "param": None, "code": None}, id="fastapi-detail"),
    pytest.param(400, b'{"error": {"message": "max_tokens 9 too big", "type": "invalid_request_error", '
                      b'"param": "max_tokens", "code": "max_tokens_exceeded"}}', "application/json", "/v1/x",
                 {"message": "max_tokens 9 too big", "type": "invalid_request_error", "param": "max_tokens",
                  "code": "max_tokens_exceeded"}, id="already-openai"),
    pytest.param(400, b'{"error": {"message": "Message: This model\'s maximum context length is 1024 tokens., '
                      b'Internal exception: a, original exception: b", "code": 400, "type": "BadRequestError"}}',
                 "application/json", "/v1/chat/completions",
                 {"message": "This model's maximum context length is 1024 tokens.", "type": "invalid_request_error",
                  "param": "messages", "code": "context_length_exceeded"}, id="ray-wrapped-context-length"),
    pytest.param(500, b'{"error": {"message": "Message: Internal Server Error (Request ID: 7f), Internal exception: '
                      b'Internal Server Error (Request ID: 7f), original exception: ray::ServeReplica Traceback '
                      b'(most recent call last): File /srv/secret.py", "code": 500, "type": "InternalServerError"}}',
                 "application/json", "/v1/chat/completions",
                 {"message": "Internal Server Error", "type": "server_error", "param": None, "code": None},
                 id="ray-500-without-remote-traceback"),
    pytest.param(500, b"Internal Server Error", "text/plain", "/v1/x",
                 {"message": "Internal Server Error", "type": "server_error", "param": None, "code": None}, id="500-text"),
    pytest.param(408, b"", "text/plain", "/v1/x",
                 {"message": "HTTP 408", "type": "timeout_error", "param": None, "code": None}, id="empty"),
])
def test_reshape_error_body(status, raw, content_type, path, expected):
    assert reshape_error_body(status, raw, content_type, path) == (status, {"error": expected})


def test_schema_errors_name_the_parameter():
    # Shapes of pydantic's errors for vLLM's ChatCompletionRequest (as FastAPI reports them).
    missing = validation_error([{"loc": ("body", "messages"), "msg": "Field required", "type": "missing"}])
    assert (missing.param, missing.message) == ("messages", "messages: Field required")
    union = validation_error([
        {"loc": ("body", "messages", 0, "ChatCompletionSystemMessageParam", "content", "str"),
         "msg": "Input should be a valid string", "type": "string_type"},
        {"loc": ("body", "messages", 0, "ChatCompletionUserMessageParam", "role"), "msg": "Input should be 'user'",
         "type": "literal_error", "ctx": {"expected": "'user'"}},
        {"loc": ("body", "messages", 0, "ChatCompletionToolMessageParam", "role"), "msg": "Input should be 'tool'",
         "type": "literal_error", "ctx": {"expected": "'tool'"}},
    ])
    assert union.param == "messages[0]"
    assert union.message == ("messages[0] matches none of the accepted shapes (role must be one of user, tool; "
                             "content: Input should be a valid string)")
    assert split_loc(("body", "tools", 2, "function", "name")) == ("tools[2].function.name", "")


class FakeVLLMValidationError(ValueError):
    """Stands in for vllm.exceptions.VLLMValidationError (importing vLLM would make this test slow): a
    model validator's error that names its parameter as an attribute."""

    parameter = "tool_choice"


def test_model_level_errors_name_their_parameter():
    error = validation_error([{"loc": ("body",), "type": "value_error", "ctx": {"error": FakeVLLMValidationError()},
                               "msg": "Value error, When using `tool_choice`, `tools` must be set."}])
    assert error.param == "tool_choice"
    assert error.message == "tool_choice: Value error, When using `tool_choice`, `tools` must be set."
