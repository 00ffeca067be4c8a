"""The guard middleware over HTTP, and the one OpenAI error shape (pure: no Ray, no engine)."""
import base64
import json

import pytest
from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.testclient import TestClient

from pipeline.config import PipelineConfig
from pipeline.serve_errors import reshape_error_body, split_loc, validation_error
from pipeline.serve_guard import ApiKeyCheck, RequestPolicy
from pipeline.serve_http import GuardMiddleware
from tests.unit.test_serve_guard import MODEL, TEXT, chat, data_url, image_part, png

KEY = {"Authorization": "Bearer test-key"}


def fake_openai_app() -> FastAPI:
    """FakeOpenAIApp: stands in for the FastAPI app of Ray's OpenAI ingress, which needs Ray Serve and
    an engine (the integration tests run that one). It echoes what reached it and produces the error
    shapes Ray and Serve produce."""
    app = FastAPI()

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
    body = chat(image_part(data_url(png())), TEXT, max_tokens=5)
    response = client.post("/v1/chat/completions", headers=KEY, json=body)
    assert response.status_code == 200
    echoed = response.json()
    assert echoed["received"] == body and int(echoed["content_length"]) == echoed["bytes"]


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
