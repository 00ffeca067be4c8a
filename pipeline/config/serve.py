"""The online endpoint: scaling, admission, auth and request limits; the API keys, read where they are checked.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, field_validator

from pipeline.config.base import _Section
from pipeline.config.errors import ConfigError


class RateLimit(_Section):
    """One API key's share of the endpoint: token buckets that refill continuously over a minute."""

    requests_per_minute: int = Field(
        default=600, ge=1,
        description="Requests per minute for one API key; a minute's worth may come as one burst.",
    )
    tokens_per_minute: int = Field(
        default=200_000, ge=1,
        description="Tokens per minute for one API key, counted when a request is admitted: an estimate of "
        "its prompt (body characters / 4, 256 per image) plus what it may generate (max_tokens x n x "
        "prompts). A request that alone needs more is a 400.",
    )


class ServeSection(_Section):
    """The online endpoint (`jobs.serve`, `pipeline.serve.app`): scaling, admission, auth and request limits."""

    host: str = Field(
        default="127.0.0.1",
        description="Address the Serve HTTP proxy binds. 0.0.0.0 on a cluster behind a load balancer; "
        "the loopback default keeps a local run private.",
    )
    port: int = Field(default=8000, ge=1, le=65535, description="Port of the Serve HTTP proxy.")
    proxy_location: Literal["EveryNode", "HeadOnly"] = Field(
        default="EveryNode",
        description="Where Serve runs HTTP proxies: on every node with a replica (behind a load balancer), or "
        "on the head only. A lost node takes its proxy's open connections with it, so with spot engine "
        "nodes send traffic only to proxies on on-demand nodes, or use HeadOnly (docs/preemption.md).",
    )
    app_name: str = Field(default="gemma", description="Ray Serve application name (`serve status`).")
    warmup: bool = Field(
        default=True,
        description="Each engine replica runs an image request and (with tools on) a tool call before "
        "Serve routes traffic to it, so the first users of a new or scaled-out replica do not pay its "
        "one-time kernel, image-processor and grammar compilation costs. Adds seconds to a replica's start.",
    )
    in_process_engine: bool = Field(
        default=True,
        description="An engine replica of one GPU (tensor_parallel_size x pipeline_parallel_size = 1) runs "
        "the model in vLLM's engine-core process, as `vllm serve` and Ray Data do, instead of in a separate "
        "Ray worker that every engine step crosses to: 1.06x requests/s at 64 streams on an H200, and the "
        "only way engine.gpu_share below 1 starts online (docs/performance.md). Larger replicas always use "
        "Ray's executor; off restores it for one-GPU replicas too.",
    )
    min_replicas: int = Field(
        default=1, ge=0,
        description="Engine replicas kept warm. 0 scales to zero when idle, at the price of a cold start "
        "of minutes (model load) for the first request.",
    )
    max_replicas: int = Field(
        default=4, ge=1,
        description="Engine replicas at most; each takes tensor_parallel_size x pipeline_parallel_size "
        "GPUs. Bounds the cost of a traffic spike.",
    )
    target_ongoing_requests: float = Field(
        default=96, gt=0,
        description="Requests in flight per engine replica that the autoscaler aims for. Ray's default "
        "(1e9) never scales up. Lower scales out earlier (latency), higher packs replicas "
        "(throughput); keep it below max_ongoing_requests.",
    )
    max_ongoing_requests: int = Field(
        default=256, ge=1,
        description="Requests one engine replica accepts at once; more wait in the caller's queue. Near "
        "engine.max_num_seqs keeps the engine's batch full without a deep hidden queue inside vLLM.",
    )
    max_queued_requests: int = Field(
        default=512, ge=0,
        description="Requests waiting for an engine replica, beyond which the endpoint answers 503 at "
        "once instead of letting clients hang (-1 in Ray means unbounded; here it is always bounded).",
    )
    ingress_min_replicas: int = Field(default=1, ge=1, description="HTTP ingress replicas kept (CPU only).")
    ingress_max_replicas: int = Field(
        default=4, ge=1,
        description="HTTP ingress replicas at most. The ingress checks keys, fetches and decodes images, "
        "so it needs CPU in proportion to image traffic.",
    )
    ingress_num_cpus: float = Field(
        default=1.0, ge=0,
        description="CPUs reserved per ingress replica (it decodes and checks images). 0 lets it run on a "
        "machine whose CPUs the engine replicas already reserve, as on a 2-core laptop.",
    )
    ingress_target_ongoing_requests: float = Field(
        default=64, gt=0, description="Requests per ingress replica that its autoscaler aims for.",
    )
    api_keys_env: str = Field(
        default="GEMMA_API_KEYS",
        description="Environment variable holding the accepted API keys (comma-separated), read by each "
        "ingress replica at start. Keys never travel through the config or Ray.",
    )
    api_keys_file: Optional[str] = Field(
        default=None,
        description="File with one accepted API key per line (e.g. a mounted Kubernetes secret), read by "
        "each ingress replica at start; used together with api_keys_env. With no key found, the "
        "endpoint refuses to start rather than serve unauthenticated.",
    )
    allowed_image_domains: list[str] = Field(
        default_factory=list,
        description="Host names (exact, case-insensitive) from which http(s) image_url values are "
        "fetched by the endpoint itself; any other http(s) URL is a 400. data: URLs are always "
        "accepted. Addresses that resolve to private, loopback or link-local networks are refused "
        "even for listed hosts.",
    )
    max_body_bytes: int = Field(
        default=16 * 2**20, ge=1024,
        description="Largest request body. Base64 inflates an image by 4/3, so this bounds the image "
        "size clients can send inline.",
    )
    max_images_per_request: int = Field(
        default=1, ge=0,
        description="Images accepted in one request, at most engine.max_images_per_prompt. Each image "
        "costs 256 tokens of context and one decode on the ingress.",
    )
    max_tokens_cap: Optional[int] = Field(
        default=None, ge=1,
        description="Largest max_tokens / max_completion_tokens a request may ask for (larger is a 400), "
        "and the limit when a request sets none. Bounds the time one request holds a batch slot. None "
        "means half of engine.max_model_len (4096 for the default 8192). It also caps the whole request: "
        "max_tokens x n x prompts.",
    )
    max_n: int = Field(
        default=1, ge=1,
        description="Largest n (and best_of) a request may ask for: each choice is a whole generation, so "
        "n multiplies the work of one request. 1 unless configured.",
    )
    max_prompts_per_request: int = Field(
        default=1, ge=1,
        description="Largest list of prompts one /v1/completions request may carry (a list of strings or "
        "of token-id lists; one list of token ids is one prompt). Each prompt is a whole generation.",
    )
    max_json_depth: int = Field(
        default=64, ge=8,
        description="Deepest nesting of objects and arrays in a request body, checked before the body is "
        "parsed. Requests need about 6 levels, tool schemas a few more.",
    )
    max_image_pixels: int = Field(
        default=24_000_000, ge=1,
        description="Largest image (width x height) the endpoint decodes, checked on the image header "
        "before any pixel is decoded; the lower of this and images.max_pixels applies. A decode takes "
        "about 3-4 bytes per pixel of memory on the ingress.",
    )
    image_decode_concurrency: int = Field(
        default=2, ge=1,
        description="Images one ingress replica decodes (or fetches) at a time; more wait their turn. "
        "Bounds the ingress's memory to about this many times max_image_pixels x 4 bytes.",
    )
    rate_limit: RateLimit = Field(
        default_factory=RateLimit,
        description="Requests and tokens per minute of each API key, shared by every ingress replica (one "
        "limiter deployment keeps the buckets). Over it, a request is a 429 with Retry-After.",
    )
    key_rate_limits: dict[str, RateLimit] = Field(
        default_factory=dict,
        description="Limits for particular API keys instead of serve.rate_limit, by key id: the first 16 "
        "hex digits of the key's SHA-256 (`python -m pipeline.serve.limits` prints them from keys on stdin), "
        "so no key appears in the config or in logs. Quote them in YAML: an id of digits alone reads as a "
        "number.",
    )

    @field_validator("key_rate_limits")
    @classmethod
    def _key_ids(cls, limits: dict[str, RateLimit]) -> dict[str, RateLimit]:
        for key_id in limits:
            if len(key_id) != 16 or any(c not in "0123456789abcdef" for c in key_id):
                raise ValueError(f"expected key ids of 16 lowercase hex digits (python -m pipeline.serve.limits "
                                 f"prints a key's id), got {len(key_id)} characters that are not one "
                                 "(not echoed: it may be a key)")
        return limits

    @field_validator("allowed_image_domains")
    @classmethod
    def _bare_host_names(cls, domains: list[str]) -> list[str]:
        for domain in domains:
            if not domain or "/" in domain or ":" in domain:
                raise ValueError(f"expected bare host names such as images.example.com, got {domain!r}")
        return [d.lower().rstrip(".") for d in domains]


def read_api_keys(serve: ServeSection, environ: Optional[dict[str, str]] = None) -> list[str]:
    """The accepted API keys: `$<serve.api_keys_env>` (comma-separated) plus `serve.api_keys_file`.

    Called where the keys are checked (each ingress replica at start), so secrets come from that
    process's environment or a mounted file and never travel inside the config. Raises ConfigError
    when none is found: the endpoint refuses to start unauthenticated.
    """
    environ = os.environ if environ is None else environ
    keys = [k.strip() for k in environ.get(serve.api_keys_env, "").split(",") if k.strip()]
    if serve.api_keys_file:
        try:
            text = Path(serve.api_keys_file).read_text()
        except OSError as exc:
            raise ConfigError(f"serve.api_keys_file: cannot read {serve.api_keys_file}: {exc.strerror}") from None
        keys += [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not keys:
        raise ConfigError(
            f"no API key: set ${serve.api_keys_env} (comma-separated) or serve.api_keys_file; the "
            "endpoint does not serve without authentication"
        )
    return keys
