"""Fetch image bytes named by a URI: local path, file://, s3://, http(s)://, or data:.

A batch job on a cloud cluster must not become a way into the cluster's metadata service or internal
network, so http(s) URLs are resolved first and refused when any address is not globally routable
(private, loopback, link-local, CGNAT, reserved), unless the config allows private networks. The
connection then goes to the checked address itself, so a second DNS answer cannot swap it
(DNS rebinding), and every redirect is checked the same way. Sizes are capped while reading.
"""
from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import os
import socket
import time
from typing import Callable, Optional, TypeVar
from urllib.parse import unquote, urljoin, urlsplit

from .config import FetchSection, StorageSection
from .records import ErrorKind, RecordError, Stage
from .storage import make_s3_client, split_s3

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK = 1 << 16


class _Transient(Exception):
    """A failure worth retrying (timeout, connection reset, 5xx, throttling)."""


def _error(kind: ErrorKind, message: str) -> RecordError:
    return RecordError(kind, message, Stage.FETCH)


def _too_large(uri: str, limit: int) -> RecordError:
    return RecordError(ErrorKind.IMAGE_TOO_LARGE, f"{uri} is larger than the limit of {limit} bytes", Stage.FETCH)


class Fetcher:
    """Reads image bytes for one worker; holds its S3 client and is reused across batches."""

    def __init__(self, fetch: FetchSection, storage: StorageSection, max_bytes: int,
                 resolve: Callable[[str, int], list[str]] | None = None):
        self.policy = fetch
        self.storage = storage
        self.max_bytes = max_bytes
        self._resolve = resolve or _resolve_host
        self._s3 = None

    def fetch(self, uri: str) -> bytes:
        uri = uri.strip()
        scheme = urlsplit(uri).scheme.lower()
        if scheme in ("http", "https"):
            return self._with_retries(uri, lambda: self._http(uri))
        if scheme == "s3":
            return self._s3_get(uri)
        if scheme == "data":
            return self._data_url(uri)
        if scheme == "file" or scheme == "":
            return self._local(unquote(urlsplit(uri).path) if scheme == "file" else uri)
        raise _error(ErrorKind.URI_NOT_ALLOWED,
                     f"scheme {scheme!r} is not supported (use s3://, http(s)://, file:// or a path)")

    # ------------------------------------------------------------------ local
    def _local(self, path: str) -> bytes:
        if not self.policy.allow_local_paths:
            raise _error(ErrorKind.URI_NOT_ALLOWED, f"local paths are not allowed (fetch.allow_local_paths): {path}")
        try:
            size = os.stat(path).st_size
            if size > self.max_bytes:
                raise _too_large(path, self.max_bytes)
            with open(path, "rb") as handle:
                return handle.read(self.max_bytes + 1)
        except FileNotFoundError:
            raise _error(ErrorKind.NOT_FOUND, f"no such file: {path}") from None
        except IsADirectoryError:
            raise _error(ErrorKind.NOT_FOUND, f"is a directory, not a file: {path}") from None
        except PermissionError:
            raise _error(ErrorKind.URI_NOT_ALLOWED, f"permission denied: {path}") from None

    # ------------------------------------------------------------------ data:
    def _data_url(self, uri: str) -> bytes:
        header, sep, payload = uri.partition(",")
        if not sep or not header.endswith(";base64"):
            raise RecordError(ErrorKind.INVALID_RECORD, "data: URL must be base64 (data:<type>;base64,...)",
                              Stage.FETCH)
        if len(payload) * 3 // 4 > self.max_bytes:
            raise _too_large("data: URL", self.max_bytes)
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise RecordError(ErrorKind.INVALID_RECORD, f"data: URL is not valid base64: {exc}",
                              Stage.FETCH) from None

    # ------------------------------------------------------------------ s3://
    def _s3_get(self, uri: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            bucket, key = split_s3(uri)
        except ValueError as exc:
            raise RecordError(ErrorKind.INVALID_RECORD, str(exc), Stage.FETCH) from None
        if self._s3 is None:
            # botocore retries transient failures itself (standard mode).
            self._s3 = make_s3_client(self.storage, timeout_s=self.policy.timeout_s, retries=self.policy.retries)
        try:
            response = self._s3.get_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchKey", "NoSuchBucket", "404", "NotFound") or status == 404:
                raise _error(ErrorKind.NOT_FOUND, f"{uri}: {code or status}") from None
            if code in ("AccessDenied", "403", "Forbidden") or status == 403:
                raise _error(ErrorKind.URI_NOT_ALLOWED, f"{uri}: access denied") from None
            raise _error(ErrorKind.UNREACHABLE, f"{uri}: {code or status}: {exc}") from None
        except BotoCoreError as exc:
            raise _error(ErrorKind.UNREACHABLE, f"{uri}: {type(exc).__name__}: {exc}") from None
        if response.get("ContentLength", 0) > self.max_bytes:
            response["Body"].close()
            raise _too_large(uri, self.max_bytes)
        with response["Body"] as body:
            data = body.read(self.max_bytes + 1)
        if len(data) > self.max_bytes:
            raise _too_large(uri, self.max_bytes)
        return data

    # ------------------------------------------------------------------ http(s)://
    def _with_retries(self, uri: str, attempt: Callable[[], _T]) -> _T:
        delay_s = 0.5
        for number in range(self.policy.retries + 1):
            try:
                return attempt()
            except _Transient as exc:
                if number == self.policy.retries:
                    raise _error(ErrorKind.UNREACHABLE,
                                 f"{uri}: {exc} (after {number + 1} attempts)") from None
                logger.info("retrying %s after transient failure: %s", uri, exc)
                time.sleep(delay_s)
                delay_s *= 2
        raise AssertionError("unreachable")

    def _http(self, url: str) -> bytes:
        import urllib3

        for _ in range(self.policy.max_redirects + 1):
            parts = urlsplit(url)
            host = parts.hostname
            if not host:
                raise RecordError(ErrorKind.INVALID_RECORD, f"URL has no host: {url}", Stage.FETCH)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            address = self._checked_address(host, port)
            timeout = urllib3.Timeout(connect=self.policy.timeout_s, read=self.policy.timeout_s)
            if parts.scheme == "https":
                pool = urllib3.HTTPSConnectionPool(address, port, timeout=timeout, retries=False, maxsize=1,
                                                   server_hostname=host, assert_hostname=host)
            else:
                pool = urllib3.HTTPConnectionPool(address, port, timeout=timeout, retries=False, maxsize=1)
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            host_header = host if parts.port is None else f"{host}:{parts.port}"
            try:
                response = pool.urlopen("GET", target, headers={"Host": host_header, "User-Agent": "gemma3-fp8-pipeline"},
                                        redirect=False, preload_content=False)
            except (urllib3.exceptions.TimeoutError, urllib3.exceptions.ProtocolError,
                    urllib3.exceptions.NewConnectionError) as exc:
                raise _Transient(f"{type(exc).__name__}: {exc}") from None
            except urllib3.exceptions.SSLError as exc:
                raise _error(ErrorKind.UNREACHABLE, f"{url}: TLS error: {exc}") from None
            except urllib3.exceptions.HTTPError as exc:
                raise _Transient(f"{type(exc).__name__}: {exc}") from None
            try:
                if response.status in _REDIRECTS:
                    location = response.headers.get("Location")
                    if not location:
                        raise _error(ErrorKind.UNREACHABLE, f"{url}: redirect without Location")
                    url = urljoin(url, location)
                    if urlsplit(url).scheme not in ("http", "https"):
                        raise _error(ErrorKind.URI_NOT_ALLOWED, f"redirect to a non-http URL refused: {url}")
                    continue
                if response.status in (404, 410):
                    raise _error(ErrorKind.NOT_FOUND, f"{url}: HTTP {response.status}")
                if response.status in (401, 403):
                    raise _error(ErrorKind.URI_NOT_ALLOWED, f"{url}: HTTP {response.status}")
                if response.status == 429 or response.status >= 500:
                    raise _Transient(f"HTTP {response.status}")
                if response.status != 200:
                    raise _error(ErrorKind.UNREACHABLE, f"{url}: HTTP {response.status}")
                length = response.headers.get("Content-Length")
                if length and length.isdigit() and int(length) > self.max_bytes:
                    raise _too_large(url, self.max_bytes)
                return self._read_capped(response, url)
            finally:
                response.release_conn()
                pool.close()
        raise _error(ErrorKind.UNREACHABLE, f"{url}: more than {self.policy.max_redirects} redirects")

    def _read_capped(self, response, url: str) -> bytes:
        import urllib3

        chunks, total = [], 0
        try:
            for chunk in response.stream(_CHUNK):
                total += len(chunk)
                if total > self.max_bytes:
                    raise _too_large(url, self.max_bytes)
                chunks.append(chunk)
        except (urllib3.exceptions.TimeoutError, urllib3.exceptions.ProtocolError) as exc:
            raise _Transient(f"{type(exc).__name__} while reading: {exc}") from None
        return b"".join(chunks)

    def _checked_address(self, host: str, port: int) -> str:
        try:
            addresses = self._resolve(host, port)
        except socket.gaierror as exc:
            raise _error(ErrorKind.UNREACHABLE, f"cannot resolve host {host!r}: {exc.strerror or exc}") from None
        if not addresses:
            raise _error(ErrorKind.UNREACHABLE, f"host {host!r} has no address")
        for address in addresses:
            if not self.address_allowed(address):
                raise _error(ErrorKind.URI_NOT_ALLOWED,
                                 f"host {host!r} resolves to {address}, a private, loopback, link-local or "
                             "reserved address (set fetch.allow_private_networks to allow)")
        return addresses[0]

    def address_allowed(self, address: str) -> bool:
        return self.policy.allow_private_networks or is_public_address(address)


def is_public_address(address: str) -> bool:
    """True only for globally routable unicast addresses (IPv4-mapped IPv6 judged as IPv4)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _resolve_host(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: list[str] = []
    for info in infos:
        address = info[4][0]
        if address not in seen:
            seen.append(address)
    return seen


def describe_uri(uri: Optional[str]) -> str:
    """A short form of a URI for logs (data: URLs are long)."""
    if uri is None:
        return "<none>"
    return uri if not uri.startswith("data:") else uri[:32] + "..."
