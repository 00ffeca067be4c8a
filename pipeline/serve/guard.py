"""What the online endpoint checks before Ray's OpenAI ingress and vLLM see a request (pure logic).

Every client mistake becomes an `ApiError`: an HTTP status and an OpenAI-shaped body
(`{"error": {"message", "type", "param", "code"}}`) whose message names the parameter and carries the
numbers ("max_tokens 9000 exceeds the cap of 4096"). Checked here:

- the API key (bearer token, compared in constant time against every accepted key);
- the request body: size, JSON (its nesting depth bounded before parsing), the model name; what one
  request may make the engine generate: max_tokens / max_completion_tokens / n / best_of must be
  integers (a JSON 5.0 or "5" is a 400: pydantic would coerce them past a cap), n and best_of at most
  serve.max_n, prompt lists at most serve.max_prompts_per_request, and prompts x n x max_tokens within
  serve.max_tokens_cap; content-part types and images per request on every route with `messages`
  (/tokenize and /v1/embeddings render images too);
- each image: data: URLs must be base64 of an image within `images.*` limits and serve.max_image_pixels
  (refused from the header, before any pixel is decoded); http(s) URLs only for hosts on
  `serve.allowed_image_domains`, fetched here with the guarded `Fetcher` (private, loopback and
  link-local addresses refused, connection pinned to the checked address). Either way the image is
  decoded here, within the limits, and the engine gets model-sized pixels and never fetches a URL: an
  upload that already is what the model sees (RGB, at the model's size, upright, one frame, JPEG/PNG/WebP)
  is passed on as it came; any other is resized here and passed on as an uncompressed BMP data: URL.

The checks come in two parts: `check_body` (cheap, on the event loop; its result carries the token
estimate the rate limiter charges) and `prepare_images` (decode and fetch, blocking: a worker thread).
Nothing here imports Ray or vLLM; `ingress` wires it into the HTTP path.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import io
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

from pipeline.config import ImageSection, PipelineConfig
from pipeline.io.images import ImageTarget, prepare_image
from pipeline.io.records import RecordError
from pipeline.openai.checks import RequestCaps, is_int
from pipeline.openai.errors import OpenAIError

logger = logging.getLogger(__name__)

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
# Content-part types passed to the engine. Everything else (audio, video, image_embeds, files) is a 400:
# the model reads text and images only, and those other types would make vLLM fetch or deserialize input.
ALLOWED_PART_TYPES = ("text", "image_url")
TOKEN_LIMIT_FIELDS = ("max_tokens", "max_completion_tokens")
# Fields that multiply the work of a request; all must be JSON integers.
INTEGER_FIELDS = (*TOKEN_LIMIT_FIELDS, "n", "best_of")
# Routes that generate text, and vLLM's max_tokens when a /v1/completions request sets none.
GENERATING_PATHS = (CHAT_PATH, COMPLETIONS_PATH)
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
# Gemma 3 gives each image 256 soft tokens; a prompt's text is estimated at 4 characters a token.
IMAGE_PROMPT_TOKENS = 256
CHARS_PER_TOKEN = 4


class ApiError(OpenAIError):
    """A request the endpoint refuses: an HTTP status and OpenAI's error body (`body()`), plus headers."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error", headers: Optional[list[tuple[bytes, bytes]]] = None):
        super().__init__(message, status=status, code=code, param=param, type=type)
        self.headers = headers or []


def bad_request(message: str, param: Optional[str], code: str) -> ApiError:
    return ApiError(400, message, param=param, code=code)


# ---------------------------------------------------------------------------------------------- auth
class ApiKeyCheck:
    """Accepts `Authorization: Bearer <key>` for any configured key.

    Keys are compared as SHA-256 digests with `hmac.compare_digest`, against every key without an
    early exit, so the time taken tells nothing about how much of a key matched or which one.
    """

    def __init__(self, keys: list[str]):
        if not keys:
            raise ValueError("at least one API key is required")
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    @property
    def count(self) -> int:
        return len(self._digests)

    def check(self, authorization: Optional[str]) -> str:
        """The key id (`limits.key_id`) of the accepted key; ApiError 401 otherwise."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
        digest = hashlib.sha256(token.strip().encode()).digest()
        matched = False
        for known in self._digests:
            matched |= hmac.compare_digest(known, digest)
        if not matched:
            raise ApiError(401, "incorrect API key provided", code="invalid_api_key")
        return digest.hex()[:16]


# ---------------------------------------------------------------------------------------------- body
@dataclass(frozen=True)
class RequestPolicy(RequestCaps):
    """The limits one request is held to, taken from the config. The model, token cap and image count
    checks are OpenAI Batch's too (`RequestCaps`)."""

    SERVED_BY = "this endpoint serves"
    TOKENS_SETTING = "serve.max_tokens_cap"
    IMAGES_SETTING = "serve.max_images_per_request"

    max_body_bytes: int
    allowed_image_domains: frozenset[str]
    image_limits: ImageSection = field(default_factory=ImageSection)
    image_target: ImageTarget = field(default_factory=ImageTarget)
    max_n: int = 1
    max_prompts: int = 1
    max_json_depth: int = 64
    image_decode_concurrency: int = 2

    @staticmethod
    def refusal(code: str, message: str, param: Optional[str]) -> ApiError:
        return bad_request(message, param, code)

    @classmethod
    def from_config(cls, config: PipelineConfig, image_target: Optional[ImageTarget] = None) -> "RequestPolicy":
        """`image_target`: the checkpoint's (serve.build_app reads its preprocessor config, as batch does);
        without it, images.target_size_px or Gemma 3's 896."""
        serve = config.serve
        return cls(
            model_names=(config.model.served_name,),
            max_body_bytes=serve.max_body_bytes,
            max_images=serve.max_images_per_request,
            max_tokens_cap=serve.max_tokens_cap,
            allowed_image_domains=frozenset(serve.allowed_image_domains),
            image_limits=config.images.model_copy(
                update={"max_pixels": min(config.images.max_pixels, serve.max_image_pixels)}),
            image_target=image_target or ImageTarget(size_px=config.images.target_size_px or ImageTarget().size_px),
            max_n=serve.max_n,
            max_prompts=serve.max_prompts_per_request,
            max_json_depth=serve.max_json_depth,
            image_decode_concurrency=serve.image_decode_concurrency,
        )


def check_content_length(value: Optional[str], policy: RequestPolicy) -> None:
    """Refuse a declared body size over the limit before reading it."""
    if value is not None and value.strip().isdigit() and int(value) > policy.max_body_bytes:
        raise body_too_large(int(value), policy)


def body_too_large(size: int, policy: RequestPolicy) -> ApiError:
    # 400 rather than 413: every request limit of this endpoint answers 400 with a message (issue #4).
    return bad_request(f"request body of {size} bytes exceeds the limit of {policy.max_body_bytes} bytes "
                       "(serve.max_body_bytes)", None, "request_too_large")


# A JSON string, escapes included: removed before counting brackets, which inside strings are text.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


def json_depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text, without parsing it (C-speed passes:
    a regex drops the strings, numpy sums the brackets). Exact for valid JSON; for invalid JSON an
    estimate, which the parse then refuses anyway."""
    if raw.count(b"[") + raw.count(b"{") == 0:
        return 0
    brackets = np.frombuffer(_JSON_STRING.sub(b"", raw), dtype=np.uint8)
    steps = (np.isin(brackets, (ord("["), ord("{"))).astype(np.int32)
             - np.isin(brackets, (ord("]"), ord("}"))).astype(np.int32))
    return int(np.cumsum(steps).max(initial=0))


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_body(raw: bytes, max_depth: int = 64) -> Any:
    """The parsed body, or a 400 for anything that is not strict JSON within `max_depth` levels.

    Besides syntax: nesting deeper than max_depth (checked first: Python's parser would hit its
    recursion limit, a 500), NaN and Infinity (not JSON), and integers of more digits than Python
    converts (a ValueError from the parser).
    """
    if raw.count(b"[") + raw.count(b"{") > max_depth:
        depth = json_depth(raw)
        if depth > max_depth:
            raise bad_request(f"request body nests {depth} levels deep; at most {max_depth} "
                              "(serve.max_json_depth)", None, "invalid_json")
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"request body is not valid JSON: {exc}", None, "invalid_json") from None
    except (ValueError, RecursionError) as exc:
        raise bad_request(f"request body is not valid JSON: {str(exc)[:200]}", None, "invalid_json") from None


FetchImage = Callable[[str], bytes]


@dataclass
class RequestShape:
    """What `check_body` learned: the image parts still to check, and the tokens the request may cost."""

    images: list[tuple[str, dict[str, Any]]]
    prompt_tokens: int
    completion_tokens: int

    @property
    def cost_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def check_request(path: str, body: Any, policy: RequestPolicy, fetch_image: FetchImage) -> bool:
    """Check a parsed JSON body of a /v1 POST route, rewriting image URLs in place (both parts).

    Returns True when the body was changed (an image replaced by its prepared data: URL). Blocking
    (image decode and fetch): call it from a worker thread.
    """
    shape = check_body(path, body, policy, len(json.dumps(body)))
    return prepare_images(shape, policy, fetch_image)


def check_body(path: str, body: Any, policy: RequestPolicy, body_bytes: int) -> RequestShape:
    """The cheap checks of a parsed body (no image decoded): raises ApiError, else its shape."""
    if not isinstance(body, dict):
        raise bad_request(f"request body must be a JSON object, got {type(body).__name__}", None, "invalid_type")
    check_model(body, policy)
    check_integer_fields(body)
    check_token_limits(body, policy)
    completion_tokens = check_generation_budget(path, body, policy)
    images = check_messages(body.get("messages"), policy)
    image_chars = 0
    for _, part in images:
        image_url = part.get("image_url")
        url = image_url.get("url") if isinstance(image_url, dict) else image_url
        image_chars += len(url) if isinstance(url, str) else 0
    prompt_tokens = max(0, body_bytes - image_chars) // CHARS_PER_TOKEN + IMAGE_PROMPT_TOKENS * len(images)
    return RequestShape(images, prompt_tokens, completion_tokens)


def check_integer_fields(body: dict[str, Any]) -> None:
    """OpenAI's schema makes these integers; pydantic would coerce 5.0 or "5" and slip past the caps."""
    for name in INTEGER_FIELDS:
        value = body.get(name)
        if value is not None and not is_int(value):
            shown = json.dumps(value)
            raise bad_request(f"{name} must be an integer, got {shown if len(shown) <= 40 else shown[:40] + '...'}",
                              name, "invalid_type")


def check_model(body: dict[str, Any], policy: RequestPolicy) -> None:
    """The model is optional here (vLLM serves its one model); a named one must be ours."""
    model = body.get("model")
    if model is not None:
        policy.check_model(model)


def check_token_limits(body: dict[str, Any], policy: RequestPolicy) -> None:
    for name in TOKEN_LIMIT_FIELDS:
        policy.check_token_cap(name, body.get(name))


def count_prompts(prompt: Any) -> int:
    """Prompts in a /v1/completions `prompt`: a string or one list of token ids is one prompt; a list
    of strings or of token-id lists is one per item."""
    if isinstance(prompt, list) and prompt and not all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        return len(prompt)
    return 1


def check_generation_budget(path: str, body: dict[str, Any], policy: RequestPolicy) -> int:
    """Check n, best_of and prompt lists; returns the completion tokens the request may generate.

    Every choice of every prompt is a whole generation, so the cap holds for their product: one
    request asking n=200 with max_tokens=512 holds 200 batch slots for the length of 512 tokens.
    """
    n, best_of = body.get("n"), body.get("best_of")
    for name, value in (("n", n), ("best_of", best_of)):
        if value is not None and value > policy.max_n:
            raise bad_request(f"{name} {value} exceeds the limit of {policy.max_n} (serve.max_n): each choice is "
                              "a whole generation; send separate requests instead", name, "n_exceeded")
    if path not in GENERATING_PATHS:
        return 0
    prompts = count_prompts(body.get("prompt")) if path == COMPLETIONS_PATH else 1
    if prompts > policy.max_prompts:
        raise bad_request(f"prompt holds {prompts} prompts; at most {policy.max_prompts} per request "
                          "(serve.max_prompts_per_request)", "prompt", "too_many_prompts")
    choices = max(1, n or 1, best_of or 1)
    limit_field = next((f for f in ("max_completion_tokens", "max_tokens") if body.get(f) is not None), None)
    if limit_field is not None:
        max_tokens, shown = max(0, body[limit_field]), f"{limit_field} ({body[limit_field]})"
    elif path == COMPLETIONS_PATH:
        max_tokens, shown = COMPLETIONS_DEFAULT_MAX_TOKENS, f"max_tokens (not set: {COMPLETIONS_DEFAULT_MAX_TOKENS})"
    else:
        max_tokens, shown = policy.max_tokens_cap, f"max_tokens (not set: the cap, {policy.max_tokens_cap})"
    total = prompts * choices * max_tokens
    if total > policy.max_tokens_cap:
        factors = ([f"{prompts} prompts"] if prompts > 1 else []) + \
                  ([f"{'best_of' if (best_of or 0) > (n or 1) else 'n'} ({choices})"] if choices > 1 else [])
        raise bad_request(f"{' x '.join(factors + [shown])} = {total} tokens to generate exceeds the cap of "
                          f"{policy.max_tokens_cap} (serve.max_tokens_cap); lower max_tokens or "
                          f"{'n' if choices > 1 else 'the number of prompts'}",
                          "n" if choices > 1 else "prompt", "max_tokens_exceeded")
    return total


def check_messages(messages: Any, policy: RequestPolicy) -> list[tuple[str, dict[str, Any]]]:
    """Check part types and count the image parts of every message; returns the image parts. Other
    shape errors are left to the schema."""
    if not isinstance(messages, list):
        return []
    images: list[tuple[str, dict[str, Any]]] = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                continue
            param = f"messages[{i}].content[{j}]"
            kind = part.get("type")
            if kind not in ALLOWED_PART_TYPES:
                raise bad_request(f"{param}.type {kind!r} is not supported (allowed: "
                                  f"{', '.join(ALLOWED_PART_TYPES)})", f"{param}.type", "unsupported_content_type")
            if kind == "image_url":
                images.append((param, part))
    policy.check_image_count([param for param, _ in images])
    for param, part in images:
        image_url = part.get("image_url")
        url = image_url.get("url") if isinstance(image_url, dict) else image_url
        if not isinstance(url, str):
            raise bad_request(f"{param}.image_url.url must be a string URL", f"{param}.image_url.url",
                              "invalid_image_url")
    return images


def prepare_images(shape: RequestShape, policy: RequestPolicy, fetch_image: FetchImage) -> bool:
    """Decode (and fetch) every image of a checked body, replacing each URL in place by the prepared
    image's data: URL. Returns True when the body changed. Blocking: call it from a worker thread."""
    for param, part in shape.images:
        image_url = part["image_url"]
        url = image_url["url"] if isinstance(image_url, dict) else image_url
        prepared = inline_image(url, f"{param}.image_url.url", policy, fetch_image)
        part["image_url"] = {**image_url, "url": prepared} if isinstance(image_url, dict) else {"url": prepared}
    return bool(shape.images)


# --------------------------------------------------------------------------------------------- images
def inline_image(url: str, param: str, policy: RequestPolicy, fetch_image: FetchImage) -> str:
    """Check one image URL; returns a data: URL of the image prepared at the model's size."""
    # The scheme from the URL's head: urlsplit copies the whole string several times, and a data: URL
    # is megabytes (a URL whose scheme is not in its first 256 characters has none we accept).
    scheme = urlsplit(url[:256]).scheme.lower()
    if scheme == "data":
        return prepared_data_url(decode_data_url(url, param, policy), param, policy)
    if scheme in ("http", "https"):
        host = (urlsplit(url).hostname or "").lower().rstrip(".")
        if host not in policy.allowed_image_domains:
            allowed = ", ".join(sorted(policy.allowed_image_domains)) or "none"
            raise bad_request(f"{param}: images are fetched only from allowed hosts (serve.allowed_image_domains: "
                              f"{allowed}); {host or 'the URL'!r} is not one of them. Send the image inline as a "
                              "base64 data: URL instead", param, "image_url_not_allowed")
        try:
            data = fetch_image(url)
        except RecordError as exc:
            raise bad_request(f"{param}: cannot use image {_short(url)}: {exc.message}", param,
                              exc.kind.value) from None
        return prepared_data_url(data, param, policy)
    raise bad_request(f"{param}: URL scheme {scheme or 'none'!r} is not supported; send a base64 data: URL or an "
                      "http(s) URL on an allowed host", param, "invalid_image_url")


def decode_data_url(url: str, param: str, policy: RequestPolicy) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.lower().endswith(";base64"):
        raise bad_request(f"{param}: a data: URL must be base64-encoded (data:image/png;base64,...)", param,
                          "invalid_image_url")
    approx = len(payload) * 3 // 4
    if approx > policy.image_limits.max_bytes:
        raise bad_request(f"{param}: image of about {approx} bytes exceeds the limit of "
                          f"{policy.image_limits.max_bytes} bytes (images.max_bytes)", param, "image_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad_request(f"{param}: data: URL payload is not valid base64 ({exc}; {len(payload)} characters)",
                          param, "invalid_base64") from None


# Formats the engine decodes itself, with their media types: an upload in one of them that needs no
# change is passed on as it came.
PASS_THROUGH_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}


def prepared_data_url(data: bytes, param: str, policy: RequestPolicy) -> str:
    """Decode the image within the limits and prepare it at the model's size, as batch does
    (images.prepare_image); returns the data: URL the engine gets.

    A corrupt, truncated, oversized or non-image payload becomes a 400 naming the part instead of an
    engine error; a pixel bomb is refused from its header. An upload that preparing leaves unchanged
    (`unchanged_media_type`) goes on as it came: the engine decodes the same pixels from its few hundred KB
    (on an H200 the BMP of an 896 px JPEG, 26x its size, made the ingress and the engine replica's event
    loop the bottleneck at 64 streams). Any other goes on as BMP: the pixels exactly (lossless) for about
    10 ms of encoding where PNG takes hundreds.
    """
    try:
        image = prepare_image(data, policy.image_limits, policy.image_target)
    except RecordError as exc:
        raise bad_request(f"{param}: {exc.message}", param, exc.kind.value) from None
    media_type = unchanged_media_type(data, policy.image_target.size_px)
    if media_type:
        return f"data:{media_type};base64," + base64.b64encode(data).decode()
    buffer = io.BytesIO()
    image.save(buffer, format="BMP")
    return "data:image/bmp;base64," + base64.b64encode(buffer.getvalue()).decode()


def unchanged_media_type(data: bytes, size_px: int) -> Optional[str]:
    """The media type of an image that `prepare_image` would leave as it is: already RGB, size_px square,
    one frame, no EXIF rotation, in a format the engine decodes. None for any other. Reads the header
    only; call it on bytes that `prepare_image` accepted."""
    with Image.open(io.BytesIO(data)) as image:
        media_type = PASS_THROUGH_FORMATS.get(image.format or "")
        if (media_type is None or image.mode != "RGB" or image.size != (size_px, size_px)
                or getattr(image, "n_frames", 1) != 1):
            return None
        try:
            orientation = image.getexif().get(0x0112, 1)  # EXIF Orientation: 1 is upright
        except Exception:  # noqa: BLE001 - unreadable EXIF: let prepare_image's pixels go instead
            return None
        return media_type if orientation in (None, 1) else None


def _short(url: str, limit: int = 80) -> str:
    return url if len(url) <= limit else url[:limit] + "..."
