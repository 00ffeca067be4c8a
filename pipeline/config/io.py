"""Where rows' bytes come from and how images are held: read by `pipeline.io` (storage, fetch, images).
"""
from __future__ import annotations

import os
from typing import Optional

from pydantic import Field, field_validator, model_validator

from pipeline.config.base import _Section


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
