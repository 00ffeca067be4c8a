"""The endpoint's request guard: API keys, request limits, image checks and inlining (pure logic)."""
import base64
import copy
import http.server
import io
import json
import struct
import threading
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from pipeline.config import ConfigError, FetchSection, PipelineConfig, StorageSection, read_api_keys
from pipeline.io.fetch import Fetcher
from pipeline.io.images import ImageTarget, prepare_image
from pipeline.serve.guard import (ApiError, ApiKeyCheck, RequestPolicy, check_body, check_content_length,
                                  check_request, count_prompts, json_depth, parse_json_body)
from pipeline.serve.limits import key_id

MODEL = "gemma-3-12b-it"
CHAT = "/v1/chat/completions"


def png(size=(32, 24), color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def png_declaring(width: int, height: int, rows: int = 40) -> bytes:
    """A valid PNG header declaring width x height RGB pixels followed by the first `rows` rows only:
    about a kilobyte that a decoder would expand to width x height x 3 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress((b"\x00" + b"\x00" * width * 3) * rows, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def decoded(url: str, media_type: str = "image/bmp") -> Image.Image:
    header, payload = url.split(",", 1)
    assert header == f"data:{media_type};base64"
    image = Image.open(io.BytesIO(base64.b64decode(payload)))
    image.load()
    return image


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
        # The key's id (the rate limiter's and the logs' name for it), never the key.
        assert check.check(header) == key_id(header.split()[1])
        assert check.check(header) != check.check("Bearer key-one" if "two" in header else "Bearer key-two")
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


@pytest.mark.parametrize("raw, words", [
    pytest.param(b"[" * 5000 + b"]" * 5000, ["nests 5000 levels deep", "at most 64", "serve.max_json_depth"],
                 id="5000-deep"),
    pytest.param(b'{"messages": ' + b'{"a": ' * 65 + b"1" + b"}" * 66, ["nests 66 levels deep"], id="objects-66-deep"),
    pytest.param(b"[" * 100_000, ["nests 100000 levels deep"], id="unclosed-100000"),
    pytest.param(b'{"max_tokens": NaN}', ["NaN is not valid JSON"], id="nan"),
    pytest.param(b'{"max_tokens": -Infinity}', ["-Infinity is not valid JSON"], id="infinity"),
    pytest.param(b'{"n": ' + b"9" * 5000 + b"}", ["4300 digits"], id="huge-integer"),
    pytest.param(b'{"model": "\xff"}', ["not valid JSON", "utf-8"], id="not-utf8"),
])
def test_bodies_that_do_not_parse_are_400s(raw, words):
    with pytest.raises(ApiError) as info:
        parse_json_body(raw, max_depth=64)
    assert (info.value.status, info.value.code) == (400, "invalid_json")
    for word in words:
        assert word in info.value.message, info.value.message


def test_json_depth_ignores_brackets_in_strings():
    text = json.dumps({"messages": [{"role": "user", "content": "[[[{{{ \\\" ]]] " * 50}], "x": [[[1]]]}).encode()
    assert json_depth(text) == 4
    assert parse_json_body(text, max_depth=8)["x"] == [[[1]]]
    at_limit = b"[" * 64 + b"]" * 64
    assert json_depth(at_limit) == 64 and parse_json_body(at_limit, max_depth=64) == eval("[" * 64 + "]" * 64)


@pytest.mark.parametrize("prompt, count", [
    ("one", 1), ([1, 2, 3], 1), (["a", "b"], 2), ([[1, 2], [3]], 2), ([], 1), (None, 1), (["only"], 1),
])
def test_count_prompts(prompt, count):
    assert count_prompts(prompt) == count


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
    pytest.param(chat(image_part(" " * 300 + "file:///etc/passwd"), TEXT), "messages[0].content[0].image_url.url",
                 "invalid_image_url", ["scheme 'none' is not supported"], id="scheme-after-256-characters"),
    pytest.param(chat(image_part("https://evil.example.net/cat.png"), TEXT), "messages[0].content[0].image_url.url",
                 "image_url_not_allowed", ["'evil.example.net' is not one of them", "images.example.com"],
                 id="host-not-allowed"),
    pytest.param(chat(image_part({"not": "a url"}), TEXT), "messages[0].content[0].image_url.url",
                 "invalid_image_url", ["must be a string"], id="url-not-string"),
    pytest.param(chat(image_part(data_url(png_declaring(8000, 8000))), TEXT), "messages[0].content[0].image_url.url",
                 "too_many_pixels", ["8000x8000 = 64000000 pixels", "over the limit of 24000000"], id="pixel-bomb"),
    pytest.param(chat(TEXT, n=1000), "n", "n_exceeded", ["n 1000 exceeds the limit of 1 (serve.max_n)"], id="n-1000"),
    pytest.param(chat(TEXT, best_of=5), "best_of", "n_exceeded", ["best_of 5 exceeds the limit of 1"], id="best-of"),
    pytest.param(chat(TEXT, max_tokens=5.0), "max_tokens", "invalid_type", ["max_tokens must be an integer, got 5.0"],
                 id="max-tokens-float"),
    pytest.param(chat(TEXT, max_tokens="5"), "max_tokens", "invalid_type", ['must be an integer, got "5"'],
                 id="max-tokens-string"),
    pytest.param(chat(TEXT, max_tokens=9000.0), "max_tokens", "invalid_type", ["got 9000.0"], id="float-over-cap"),
    pytest.param(chat(TEXT, max_completion_tokens=True), "max_completion_tokens", "invalid_type", ["got true"],
                 id="max-completion-tokens-bool"),
    pytest.param(chat(TEXT, n=2.0), "n", "invalid_type", ["n must be an integer, got 2.0"], id="n-float"),
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


COMPLETIONS = "/v1/completions"


@pytest.mark.parametrize("path, body, param, words", [
    pytest.param(COMPLETIONS, {"prompt": ["a", "b"], "max_tokens": 4}, "prompt",
                 ["prompt holds 2 prompts; at most 1 per request (serve.max_prompts_per_request)"], id="prompt-list"),
    pytest.param(COMPLETIONS, {"prompt": [[1, 2], [3], [4]], "max_tokens": 4}, "prompt", ["holds 3 prompts"],
                 id="token-id-lists"),
])
def test_prompt_lists_over_the_cap(path, body, param, words):
    with pytest.raises(ApiError) as info:
        check_request(path, {"model": MODEL, **body}, policy(), refuse_fetch)
    assert (info.value.status, info.value.param, info.value.code) == (400, param, "too_many_prompts")
    for word in words:
        assert word in info.value.message


@pytest.mark.parametrize("path, body, param, words", [
    pytest.param(CHAT, chat(TEXT, n=4, max_tokens=1025), "n",
                 ["n (4) x max_tokens (1025) = 4100 tokens to generate exceeds the cap of 4096"], id="n-x-max-tokens"),
    pytest.param(CHAT, chat(TEXT, n=2, max_completion_tokens=3000), "n",
                 ["n (2) x max_completion_tokens (3000) = 6000"], id="n-x-max-completion-tokens"),
    pytest.param(CHAT, chat(TEXT, n=2), "n", ["n (2) x max_tokens (not set: the cap, 4096) = 8192"],
                 id="n-without-max-tokens"),
    pytest.param(COMPLETIONS, {"prompt": ["a", "b", "c"], "n": 2, "max_tokens": 700}, "n",
                 ["3 prompts x n (2) x max_tokens (700) = 4200"], id="prompts-x-n-x-max-tokens"),
    pytest.param(COMPLETIONS, {"prompt": ["a", "b", "c", "d"], "max_tokens": 1025}, "prompt",
                 ["4 prompts x max_tokens (1025) = 4100", "lower max_tokens or the number of prompts"],
                 id="prompts-x-max-tokens"),
    pytest.param(COMPLETIONS, {"prompt": "a", "n": 2, "best_of": 4, "max_tokens": 2000}, "n",
                 ["best_of (4) x max_tokens (2000) = 8000"], id="best-of-counts"),
])
def test_the_cap_holds_for_the_whole_request(path, body, param, words):
    """With n and prompt lists allowed, what a request may generate in all is still the cap."""
    wide = policy(**{"serve.max_n": 4, "serve.max_prompts_per_request": 4})
    with pytest.raises(ApiError) as info:
        check_request(path, {"model": MODEL, **body}, wide, refuse_fetch)
    assert (info.value.status, info.value.param, info.value.code) == (400, param, "max_tokens_exceeded")
    for word in words:
        assert word in info.value.message, info.value.message
    allowed = {**body, "max_tokens": 100, "max_completion_tokens": None}
    assert check_request(path, {"model": MODEL, **allowed}, wide, refuse_fetch) is False


def test_token_estimate_of_a_request():
    """What the rate limiter charges: prompt characters / 4, 256 per image, plus all it may generate."""
    text = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 4000}], "max_tokens": 100}
    shape = check_body(CHAT, text, policy(), len(json.dumps(text)))
    assert shape.completion_tokens == 100 and 1000 <= shape.prompt_tokens <= 1030 and shape.images == []
    listed = {"model": MODEL, "prompt": ["ab", "cd", "ef"], "n": 2}
    wide = policy(**{"serve.max_n": 4, "serve.max_prompts_per_request": 4})
    assert check_body(COMPLETIONS, listed, wide, 60).completion_tokens == 3 * 2 * 16, "vLLM's default of 16"
    image = chat(image_part(data_url(png((900, 900), (1, 2, 3)))), TEXT, max_tokens=10)
    shape = check_body(CHAT, image, policy(), len(json.dumps(image)))
    assert len(shape.images) == 1 and 256 <= shape.prompt_tokens < 320, "the image counts 256, not its base64"
    assert check_body("/tokenize", text, policy(), 100).completion_tokens == 0


def test_text_requests_pass_unchanged():
    for path, body in [(CHAT, chat(TEXT, max_tokens=4096)), (COMPLETIONS, {"model": MODEL, "prompt": "hi", "max_tokens": 10}),
                       (COMPLETIONS, {"model": MODEL, "prompt": [1, 2, 3], "n": 1, "best_of": 1}),
                       (CHAT, {"messages": [{"role": "user", "content": "hello"}], "max_tokens": None})]:
        before = copy.deepcopy(body)
        assert check_request(path, body, policy(), refuse_fetch) is False
        assert body == before
    with pytest.raises(ApiError, match="must be a JSON object"):
        check_request(CHAT, ["not", "an", "object"], policy(), refuse_fetch)


def test_images_are_passed_on_at_the_model_size():
    """Decoded once here and passed on as the exact pixels batch would give the model (lossless BMP at
    the model's size), so the engine decodes 896 x 896 pixels however large the upload was."""
    original = png((1600, 1200), (10, 200, 90))
    body = chat(image_part(data_url(original)), TEXT, max_tokens=4096)
    assert check_request(CHAT, body, policy(), refuse_fetch) is True
    sent = decoded(body["messages"][0]["content"][0]["image_url"]["url"])
    assert sent.size == (896, 896) and sent.mode == "RGB"
    expected = prepare_image(original, policy().image_limits, ImageTarget(896))
    assert np.array_equal(np.asarray(sent), np.asarray(expected))
    assert body["messages"][0]["content"][1] == TEXT and body["max_tokens"] == 4096


def encoded(image: Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def noise(size=(896, 896), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(7)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


@pytest.mark.parametrize("fmt, media_type", [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp")])
def test_an_upload_already_at_the_model_size_goes_on_as_it_came(fmt, media_type):
    """An RGB 896 x 896 JPEG/PNG/WebP is what the model sees already: its own bytes go on (a BMP would be
    ~26x a JPEG's size through the ingress and the engine replica), and they decode to the pixels batch
    would give the model."""
    original = encoded(noise(), fmt, **({"quality": 90} if fmt != "PNG" else {}))
    body, large = chat(image_part(data_url(original, media_type)), TEXT), policy(**{"images.max_bytes": 5_000_000})
    assert check_request(CHAT, body, large, refuse_fetch) is True
    url = body["messages"][0]["content"][0]["image_url"]["url"]
    assert base64.b64decode(url.split(",", 1)[1]) == original
    expected = prepare_image(original, large.image_limits, ImageTarget(896))
    assert np.array_equal(np.asarray(decoded(url, media_type).convert("RGB")), np.asarray(expected))


def test_an_upload_that_needs_changing_goes_on_as_the_prepared_pixels():
    """Rotated by EXIF, grayscale, or one pixel off the size: the prepared pixels go on, as BMP."""
    rotated = noise().getexif()
    rotated[0x0112] = 6  # EXIF Orientation: rotate 90
    uploads = {"exif-rotated": encoded(noise(), "JPEG", exif=rotated.tobytes()),
               "grayscale": encoded(noise(mode="L"), "JPEG"),
               "895 px": encoded(noise((895, 896)), "PNG")}
    large = policy(**{"images.max_bytes": 5_000_000})
    for name, original in uploads.items():
        body = chat(image_part(data_url(original, "image/jpeg")), TEXT)
        check_request(CHAT, body, large, refuse_fetch)
        sent = decoded(body["messages"][0]["content"][0]["image_url"]["url"])
        expected = prepare_image(original, large.image_limits, ImageTarget(896))
        assert np.array_equal(np.asarray(sent), np.asarray(expected)), name


def test_the_checkpoint_image_size_is_used():
    small = RequestPolicy.from_config(PipelineConfig.load(environ={}), ImageTarget(size_px=224))
    body = chat(image_part(data_url(png((640, 480)))), TEXT)
    check_request(CHAT, body, small, refuse_fetch)
    assert decoded(body["messages"][0]["content"][0]["image_url"]["url"]).size == (224, 224)


def test_pixel_bomb_is_refused_from_its_header(monkeypatch):
    """8000 x 8000 declared in about a kilobyte: refused before any pixel is decoded (decoding fails the test)."""
    bomb = png_declaring(8000, 8000)
    assert len(bomb) < 1500

    def no_decode(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", no_decode)
    with pytest.raises(ApiError) as info:
        check_request(CHAT, chat(image_part(data_url(bomb)), TEXT), policy(), refuse_fetch)
    assert info.value.code == "too_many_pixels"
    # The serving limit is the lower of serve.max_image_pixels and images.max_pixels.
    assert policy().image_limits.max_pixels == 24_000_000
    assert policy(**{"images.max_pixels": 1_000_000}).image_limits.max_pixels == 1_000_000


def test_images_are_checked_on_every_route_with_messages():
    """/tokenize and /v1/embeddings render chat messages, images included: the same checks apply."""
    for path in ("/tokenize", "/v1/embeddings"):
        with pytest.raises(ApiError) as info:
            check_request(path, chat(image_part(data_url(png_declaring(8000, 8000))), TEXT), policy(), refuse_fetch)
        assert info.value.code == "too_many_pixels"
        with pytest.raises(ApiError) as info:
            check_request(path, chat({"type": "image_embeds", "image_embeds": "AAAA"}), policy(), refuse_fetch)
        assert info.value.code == "unsupported_content_type"


def test_more_images_when_configured():
    many = policy(**{"engine.max_images_per_prompt": 3, "serve.max_images_per_request": 3})
    body = chat(*[image_part(data_url(png())) for _ in range(3)], TEXT)
    assert check_request(CHAT, body, many, refuse_fetch) is True
    assert all(decoded(part["image_url"]["url"]).size == (896, 896) for part in body["messages"][0]["content"][:3])


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
    sent = decoded(body["messages"][0]["content"][0]["image_url"]["url"])
    assert sent.size == (896, 896) and sent.getpixel((448, 448)) == (0, 0, 255)


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
