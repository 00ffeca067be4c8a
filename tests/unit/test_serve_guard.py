"""The endpoint's request guard: API keys, request limits, image checks and inlining (pure logic)."""
import base64
import copy
import http.server
import io
import threading

import pytest
from PIL import Image

from pipeline.config import ConfigError, FetchSection, PipelineConfig, StorageSection, read_api_keys
from pipeline.fetch import Fetcher
from pipeline.serve_guard import ApiError, ApiKeyCheck, RequestPolicy, check_content_length, check_request, parse_json_body

MODEL = "gemma-3-12b-it"
CHAT = "/v1/chat/completions"


def png(size=(32, 24), color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def policy(**overrides) -> RequestPolicy:
    sets = ["serve.allowed_image_domains=[images.example.com]", "images.max_bytes=100000"]
    config = PipelineConfig.load(overrides=sets + [f"{k}={v}" for k, v in overrides.items()], environ={})
    return RequestPolicy.from_config(config)


def chat(*parts, **fields):
    return {"model": MODEL, "messages": [{"role": "user", "content": list(parts)}], **fields}


def image_part(url):
    return {"type": "image_url", "image_url": {"url": url}}


TEXT = {"type": "text", "text": "What is in the image?"}


def refuse_fetch(url):
    raise AssertionError(f"no fetch expected, got {url}")


# ---------------------------------------------------------------------------------------------- keys
@pytest.mark.parametrize("header, ok", [
    pytest.param("Bearer key-one", True, id="first-key"),
    pytest.param("Bearer key-two", True, id="second-key"),
    pytest.param("bearer   key-two  ", True, id="scheme-case-and-spaces"),
    pytest.param(None, False, id="missing"),
    pytest.param("", False, id="empty"),
    pytest.param("Bearer", False, id="no-token"),
    pytest.param("Basic key-one", False, id="wrong-scheme"),
    pytest.param("Bearer key-one-and-more", False, id="longer-key"),
    pytest.param("Bearer key-on", False, id="prefix-of-key"),
    pytest.param("Bearer KEY-ONE", False, id="case-matters"),
])
def test_api_key_check(header, ok):
    check = ApiKeyCheck(["key-one", "key-two"])
    if ok:
        check.check(header)
        return
    with pytest.raises(ApiError) as info:
        check.check(header)
    assert info.value.status == 401 and info.value.code == "invalid_api_key"
    assert "key-one" not in info.value.message and "key-two" not in info.value.message


def test_api_keys_from_env_and_file(tmp_path):
    serve = PipelineConfig.load(environ={}).serve
    assert read_api_keys(serve, {"GEMMA_API_KEYS": " a, b ,,"}) == ["a", "b"]
    secret = tmp_path / "keys"
    secret.write_text("# rotated 2026-11\nfile-key-1\n\n  file-key-2  \n")
    with_file = serve.model_copy(update={"api_keys_file": str(secret), "api_keys_env": "OTHER"})
    assert read_api_keys(with_file, {"OTHER": "env-key"}) == ["env-key", "file-key-1", "file-key-2"]
    assert read_api_keys(with_file, {}) == ["file-key-1", "file-key-2"]


def test_no_key_refuses_to_start(tmp_path):
    serve = PipelineConfig.load(environ={}).serve
    with pytest.raises(ConfigError, match=r"no API key: set \$GEMMA_API_KEYS"):
        read_api_keys(serve, {"GEMMA_API_KEYS": " , "})
    missing = serve.model_copy(update={"api_keys_file": str(tmp_path / "absent")})
    with pytest.raises(ConfigError, match="serve.api_keys_file: cannot read"):
        read_api_keys(missing, {"GEMMA_API_KEYS": "k"})


# ---------------------------------------------------------------------------------------------- body
def test_body_size_and_json():
    with pytest.raises(ApiError, match="request body of 20000000 bytes exceeds the limit of 16777216 bytes"):
        check_content_length("20000000", policy())
    check_content_length("1000", policy())
    check_content_length(None, policy())
    with pytest.raises(ApiError, match="not valid JSON") as info:
        parse_json_body(b'{"model": ')
    assert info.value.status == 400 and info.value.code == "invalid_json"


TOO_BIG = png((300, 300), (1, 2, 3))  # a few hundred bytes; limits below are set under it


@pytest.mark.parametrize("body, param, code, words", [
    pytest.param({"model": "gpt-4o", "messages": []}, "model", "model_not_found",
                 ["'gpt-4o' does not exist", MODEL], id="unknown-model"),
    pytest.param(chat(TEXT, max_tokens=9000), "max_tokens", "max_tokens_exceeded",
                 ["max_tokens 9000 exceeds the cap of 4096"], id="max-tokens-over-cap"),
    pytest.param(chat(TEXT, max_completion_tokens=5000), "max_completion_tokens", "max_tokens_exceeded",
                 ["max_completion_tokens 5000 exceeds the cap of 4096"], id="max-completion-tokens-over-cap"),
    pytest.param(chat(image_part(data_url(png())), image_part(data_url(png())), TEXT),
                 "messages[0].content[1]", "too_many_images", ["2 images", "at most 1"], id="too-many-images"),
    pytest.param(chat({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}),
                 "messages[0].content[0].type", "unsupported_content_type", ["'input_audio'", "text, image_url"],
                 id="audio-part"),
    pytest.param(chat({"type": "image_embeds", "image_embeds": "AAAA"}), "messages[0].content[0].type",
                 "unsupported_content_type", ["'image_embeds'"], id="embeds-part"),
    pytest.param(chat(image_part("data:image/png;base64,iVBORw0KGgo***notbase64***"), TEXT),
                 "messages[0].content[0].image_url.url", "invalid_base64", ["not valid base64"], id="bad-base64"),
    pytest.param(chat(image_part("data:image/png,rawbytes"), TEXT), "messages[0].content[0].image_url.url",
                 "invalid_image_url", ["must be base64-encoded"], id="data-url-not-base64"),
    pytest.param(chat(image_part(data_url(b"%PDF-1.4 not a picture at all", "image/png")), TEXT),
                 "messages[0].content[0].image_url.url", "not_an_image", ["not an image"], id="pdf-payload"),
    pytest.param(chat(image_part(data_url(png()[:60])), TEXT), "messages[0].content[0].image_url.url",
                 "corrupt_image", ["damaged"], id="truncated-png"),
    pytest.param(chat(image_part(data_url(b"x" * 150_000)), TEXT), "messages[0].content[0].image_url.url",
                 "image_too_large", ["about 150000 bytes exceeds the limit of 100000"], id="image-over-max-bytes"),
    pytest.param(chat(image_part("file:///etc/passwd"), TEXT), "messages[0].content[0].image_url.url",
                 "invalid_image_url", ["scheme 'file' is not supported"], id="file-url"),
    pytest.param(chat(image_part("https://evil.example.net/cat.png"), TEXT), "messages[0].content[0].image_url.url",
                 "image_url_not_allowed", ["'evil.example.net' is not one of them", "images.example.com"],
                 id="host-not-allowed"),
    pytest.param(chat(image_part({"not": "a url"}), TEXT), "messages[0].content[0].image_url.url",
                 "invalid_image_url", ["must be a string"], id="url-not-string"),
])
def test_bad_requests_are_400s_naming_the_parameter(body, param, code, words):
    with pytest.raises(ApiError) as info:
        check_request(CHAT, body, policy(), refuse_fetch)
    error = info.value
    assert (error.status, error.param, error.code) == (400, param, code), error.message
    for word in words:
        assert word in error.message
    assert error.body() == {"error": {"message": error.message, "type": "invalid_request_error",
                                      "param": param, "code": code}}


def test_valid_requests_pass_unchanged():
    body = chat(image_part(data_url(png())), TEXT, max_tokens=4096)
    before = copy.deepcopy(body)
    assert check_request(CHAT, body, policy(), refuse_fetch) is False
    assert body == before
    assert check_request("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 10}, policy(),
                         refuse_fetch) is False
    no_model = {"messages": [{"role": "user", "content": "hello"}]}
    assert check_request(CHAT, no_model, policy(), refuse_fetch) is False
    with pytest.raises(ApiError, match="must be a JSON object"):
        check_request(CHAT, ["not", "an", "object"], policy(), refuse_fetch)


def test_more_images_when_configured():
    many = policy(**{"engine.max_images_per_prompt": 3, "serve.max_images_per_request": 3})
    body = chat(*[image_part(data_url(png())) for _ in range(3)], TEXT)
    assert check_request(CHAT, body, many, refuse_fetch) is False


# --------------------------------------------------------------------------------------- http images
class ImageHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        body = png((40, 30), (0, 0, 255)) if self.path == "/cat.png" else b"<html>not an image</html>"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def image_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ImageHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


class FakePublicLoopbackFetcher(Fetcher):
    """Resolves the allow-listed test host to the loopback server and judges that one address as public.

    Needed because no public server is reachable from the test machine; every other address is judged
    by the real rule, and the guard's own host allow-list is untouched.
    """

    def __init__(self):
        super().__init__(FetchSection(retries=0), StorageSection(), max_bytes=100_000,
                         resolve=lambda host, port: ["127.0.0.1"])

    def address_allowed(self, address):
        return address == "127.0.0.1"


def test_allowed_http_image_is_fetched_and_inlined(image_server):
    body = chat(image_part(f"http://images.example.com:{image_server}/cat.png"), TEXT)
    assert check_request(CHAT, body, policy(), FakePublicLoopbackFetcher().fetch) is True
    url = body["messages"][0]["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (40, 30)


def test_allowed_http_payload_that_is_not_an_image(image_server):
    body = chat(image_part(f"http://images.example.com:{image_server}/page.html"), TEXT)
    with pytest.raises(ApiError, match="not an image") as info:
        check_request(CHAT, body, policy(), FakePublicLoopbackFetcher().fetch)
    assert info.value.code == "not_an_image"


@pytest.mark.parametrize("address", ["127.0.0.1", "10.0.0.7", "169.254.169.254", "::1"])
def test_allowed_host_resolving_to_a_private_address_is_refused(address):
    # The real Fetcher's address policy (allow_private_networks off), with the resolver replaced: no
    # connection is attempted for a refused address.
    fetcher = Fetcher(FetchSection(retries=0), StorageSection(), 100_000, resolve=lambda host, port: [address])
    body = chat(image_part("https://images.example.com/cat.png"), TEXT)
    with pytest.raises(ApiError) as info:
        check_request(CHAT, body, policy(), fetcher.fetch)
    assert info.value.status == 400 and info.value.code == "uri_not_allowed"
    assert address in info.value.message and info.value.param == "messages[0].content[0].image_url.url"
