"""Filesystems and S3 clients made from the config's `storage` section.

Code that touches storage receives what these functions make, so that an S3-compatible endpoint is
injected (tests point it at a local server) rather than read from globals. Credentials come from the
standard AWS chain (environment, profile, instance role).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Optional
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from pipeline.config import StorageSection

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

    For s3:// an explicit S3FileSystem is built, because a bare one ignores $AWS_ENDPOINT_URL (docs/notes.md: S3 on a test machine).
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
        return pafs.S3FileSystem(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=storage.max_attempts),
                                 connect_timeout=storage.timeout_s, **kwargs), f"{bucket}/{key}".rstrip("/")
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), path


def make_s3_client(storage: StorageSection, timeout_s: Optional[float] = None, retries: Optional[int] = None):
    """A boto3 S3 client with timeouts and standard-mode retries (throttling, 5xx, connection drops).

    Defaults come from `storage` (max_attempts, timeout_s); a caller with its own policy (image fetches)
    passes its own."""
    import boto3
    from botocore.config import Config

    timeout_s = storage.timeout_s if timeout_s is None else timeout_s
    attempts = storage.max_attempts if retries is None else retries + 1
    # One client serves many threads (the ledger's 16, a fetcher's batch): botocore's pool of 10
    # connections would make the rest reconnect for every request.
    config = Config(connect_timeout=timeout_s, read_timeout=timeout_s, max_pool_connections=32,
                    retries={"max_attempts": attempts, "mode": "standard"})
    return boto3.client("s3", endpoint_url=storage.endpoint_url, region_name=storage.region, config=config)


def write_json(storage: StorageSection, uri: str, payload: dict[str, Any]) -> None:
    """Write a small JSON document (a manifest) to a local path or S3, replacing any previous one."""
    fs, path = make_filesystem(storage, uri)
    data = json.dumps(payload, indent=2, sort_keys=False, default=str).encode()
    if not isinstance(fs, pafs.LocalFileSystem):
        # An S3 object appears whole or not at all when its PUT completes.
        with fs.open_output_stream(path) as out:
            out.write(data)
        return
    # On a local disk a reader could see a half-written file: write beside it, then rename (atomic).
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.create_dir(parent, recursive=True)
    temporary = f"{parent}/.{path.rsplit('/', 1)[-1]}.{os.getpid()}.tmp" if parent else f".{path}.{os.getpid()}.tmp"
    with fs.open_output_stream(temporary) as out:
        out.write(data)
    fs.move(temporary, path)


def write_bytes(storage: StorageSection, uri: str, data: bytes) -> None:
    """Write a small file (a report, a chart) to a local path or S3, replacing any previous one."""
    fs, path = make_filesystem(storage, uri)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if isinstance(fs, pafs.LocalFileSystem) and parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as out:
        out.write(data)


def read_json(storage: StorageSection, uri: str) -> Optional[dict[str, Any]]:
    """Read a small JSON document; None when it does not exist."""
    fs, path = make_filesystem(storage, uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as stream:
        return json.loads(stream.read())


def read_text(storage: StorageSection, uri: str) -> Optional[str]:
    """Read a small UTF-8 text file (an input list); None when it does not exist."""
    fs, path = make_filesystem(storage, uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as stream:
        return stream.read().decode()


def join(uri: str, name: str) -> str:
    return uri.rstrip("/") + "/" + name


def download_prefix(storage: StorageSection, uri: str, local_dir: Path) -> list[Path]:
    """Copy every object under an s3:// prefix into `local_dir`, keeping relative paths (a checkpoint).

    Directory markers (keys ending in '/', which Ray writes) are skipped. Multipart transfers and retries
    are boto3's.
    """
    client = make_s3_client(storage)
    bucket, prefix = split_s3(uri.rstrip("/") + "/")
    files = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for entry in page.get("Contents", []):
            relative = entry["Key"][len(prefix):]
            if not relative or relative.endswith("/"):
                continue
            target = local_dir / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, entry["Key"], str(target))
            files.append(target)
    logger.info("downloaded %d files from %s", len(files), uri)
    return files


def upload_dir(storage: StorageSection, local_dir: Path, uri: str, names: Optional[Iterable[str]] = None) -> list[str]:
    """Upload files under `local_dir` to an s3:// prefix, keeping relative paths: `names` in that order,
    or every file. Callers order the files so that a reader never mistakes a half-finished upload for a
    complete one (a checkpoint's config.json goes last)."""
    client = make_s3_client(storage)
    bucket, prefix = split_s3(uri.rstrip("/") + "/")
    if names is None:
        names = sorted(p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*") if p.is_file())
    uploaded = []
    for relative in names:
        client.upload_file(str(local_dir / relative), bucket, prefix + relative)
        uploaded.append(relative)
    logger.info("uploaded %d files to %s", len(uploaded), uri)
    return uploaded


def abort_multipart_uploads(storage: StorageSection, uri: str) -> int:
    """Abort every unfinished multipart upload under an s3:// prefix; returns how many. Local: 0.

    A writer killed mid-upload (a preempted node) leaves its parts stored and billed, and nothing ever
    completes or aborts them (docs/notes.md: S3 on a test machine); their object never becomes visible, so this only frees space. Run
    it before a job writes to the prefix, never while another job writes there: it cannot tell a live
    upload from an orphan.
    """
    if not is_s3(uri):
        return 0
    client = make_s3_client(storage)
    bucket, prefix = split_s3(uri.rstrip("/") + "/")
    aborted = 0
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix):
        for upload in page.get("Uploads", []):
            client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
            logger.warning("aborted an unfinished multipart upload of s3://%s/%s (started %s)", bucket,
                           upload["Key"], upload.get("Initiated"))
            aborted += 1
    return aborted
