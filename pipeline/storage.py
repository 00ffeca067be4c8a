"""Filesystems and S3 clients made from the config's `storage` section.

Code that touches storage receives what these functions make, so that an S3-compatible endpoint is
injected (tests point it at a local server) rather than read from globals. Credentials come from the
standard AWS chain (environment, profile, instance role).
"""
from __future__ import annotations

import json
import logging
from typing import Any, Optional
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from .config import StorageSection

logger = logging.getLogger(__name__)


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/key` -> (bucket, key)."""
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"not an s3:// URI: {uri!r}")
    return parts.netloc, parts.path.lstrip("/")


def make_filesystem(storage: StorageSection, uri: str) -> tuple[Optional[pafs.FileSystem], str]:
    """The pyarrow filesystem and in-filesystem path for `uri` (local path or s3://).

    For s3:// an explicit S3FileSystem is built, because a bare one ignores $AWS_ENDPOINT_URL (NOTES §5).
    """
    if is_s3(uri):
        bucket, key = split_s3(uri)
        kwargs: dict[str, Any] = {}
        if storage.endpoint_url:
            endpoint = urlsplit(storage.endpoint_url)
            kwargs["endpoint_override"] = endpoint.netloc or storage.endpoint_url
            kwargs["scheme"] = endpoint.scheme or "https"
        if storage.region:
            kwargs["region"] = storage.region
        return pafs.S3FileSystem(**kwargs), f"{bucket}/{key}".rstrip("/")
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), path


def make_s3_client(storage: StorageSection, timeout_s: float = 30.0, retries: int = 3):
    """A boto3 S3 client with timeouts and standard-mode retries (throttling, 5xx, connection drops)."""
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=timeout_s, read_timeout=timeout_s,
                    retries={"max_attempts": retries + 1, "mode": "standard"})
    return boto3.client("s3", endpoint_url=storage.endpoint_url, region_name=storage.region, config=config)


def write_json(storage: StorageSection, uri: str, payload: dict[str, Any]) -> None:
    """Write a small JSON document (a manifest) to a local path or S3, replacing any previous one."""
    fs, path = make_filesystem(storage, uri)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if isinstance(fs, pafs.LocalFileSystem) and parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as out:
        out.write(json.dumps(payload, indent=2, sort_keys=False, default=str).encode())


def read_json(storage: StorageSection, uri: str) -> Optional[dict[str, Any]]:
    """Read a small JSON document; None when it does not exist."""
    fs, path = make_filesystem(storage, uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as stream:
        return json.loads(stream.read())


def join(uri: str, name: str) -> str:
    return uri.rstrip("/") + "/" + name
