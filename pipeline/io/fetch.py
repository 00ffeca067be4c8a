"""Fetch image bytes named by a URI: local path, file://, s3://, http(s)://, or data:.

Whoever wrote the record is assumed hostile, so every scheme is fenced:

- http(s): a batch job on a cloud cluster must not become a way into the cluster's metadata service or
  internal network, so URLs are resolved first and refused when any address is not globally routable
  (private, loopback, link-local, CGNAT, reserved), unless the config allows private networks. The
  connection then goes to the checked address itself, so a second DNS answer cannot swap it (DNS
  rebinding), and every redirect is checked the same way, host allow-list (`fetch.http_hosts`) included.
- One total deadline per fetch (`fetch.timeout_s`): resolution, connects, reads, redirects and retries
  share it, and a watchdog shuts the fetch's sockets down when it passes, so a server that sends a byte
  every second (or dribbles its headers) cannot hold a worker longer than that.
- Local paths (bare or file://) are off by default and, when on, read only under
  `fetch.local_path_prefixes`: resolved first (.., symlinks), regular files only (a FIFO or device is
  never opened for reading, let alone waited on), and checked again on the opened descriptor. Every way
  a local path can fail gives one error kind and message, so records cannot probe which files exist.
- s3:// URIs optionally only under `fetch.s3_prefixes`.

No error message carries any byte of what was read. Sizes are capped while reading.
"""
from __future__ import annotations

import base64
import binascii
import concurrent.futures
import ipaddress
import logging
import os
import socket
import stat
import threading
import time
from typing import Callable, Optional, TypeVar
from urllib.parse import unquote, urljoin, urlsplit

import urllib3

from pipeline.config import FetchSection, StorageSection
from pipeline.io.records import ErrorKind, RecordError, Stage
from pipeline.io.storage import make_s3_client, split_s3

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK = 1 << 16
# Kernel views, not files: never read, even under a configured prefix (a prefix of "/" included).
_NEVER_LOCAL = ("/proc", "/sys", "/dev")
# getaddrinfo cannot be interrupted; run it here so a fetch can stop waiting at its deadline.
_RESOLVER = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="fetch-resolve")


class _Transient(Exception):
    """A failure worth retrying (timeout, connection reset, 5xx, throttling)."""


def _error(kind: ErrorKind, message: str) -> RecordError:
    return RecordError(kind, message, Stage.FETCH)


def _too_large(uri: str, limit: int) -> RecordError:
    return RecordError(ErrorKind.IMAGE_TOO_LARGE, f"{describe_uri(uri)} is larger than the limit of {limit} bytes",
                       Stage.FETCH)


class _Deadline:
    """The one time limit of a whole fetch."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def error(self, uri: str) -> RecordError:
        return _error(ErrorKind.UNREACHABLE, f"{describe_uri(uri)}: not fetched within fetch.timeout_s "
                      f"({self.seconds:g} s for the whole fetch, retries and redirects included)")


class _Watchdog:
    """Shuts down every socket of one fetch when its deadline passes.

    A socket timeout bounds each read, not their sum: a server sending one byte per read keeps a
    blocking read (headers, TLS handshake, body) going forever. shutdown() from this timer thread makes
    the blocked read return at once. It acts on a duplicate of each socket, which stays valid while TLS
    wraps (and detaches) the original, and it is the same kernel socket.
    """

    def __init__(self, deadline: _Deadline):
        self.fired = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._timer = threading.Timer(deadline.left(), self._fire)
        self._timer.daemon = True

    def __enter__(self) -> "_Watchdog":
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()
        with self._lock:
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock.dup())
            if self.fired:
                _shutdown(self._sockets[-1])

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            for sock in self._sockets:
                _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed by the peer or by us


class _Watched:
    """Mixin for urllib3 connections: hands each new socket to the fetch's watchdog."""

    watchdog: Optional[_Watchdog] = None

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()  # type: ignore[misc]
        if self.watchdog is not None:
            self.watchdog.watch(sock)
        return sock


class _WatchedHTTPConnection(_Watched, urllib3.connection.HTTPConnection):
    pass


class _WatchedHTTPSConnection(_Watched, urllib3.connection.HTTPSConnection):
    pass


class _WatchedPool:
    """Mixin for a urllib3 connection pool: every connection it opens reports to the fetch's watchdog."""

    def __init__(self, *args, watchdog: _Watchdog, **kwargs):
        super().__init__(*args, **kwargs)
        self.watchdog = watchdog

    def _new_conn(self):
        conn = super()._new_conn()
        conn.watchdog = self.watchdog
        return conn


class _WatchedHTTPPool(_WatchedPool, urllib3.HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(_WatchedPool, urllib3.HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


class Fetcher:
    """Reads image bytes for one worker; holds its S3 client and is reused across batches.

    Safe to call from several threads at once (the endpoint does): each fetch keeps its own state."""

    def __init__(self, fetch: FetchSection, storage: StorageSection, max_bytes: int,
                 resolve: Callable[[str, int], list[str]] | None = None):
        self.policy = fetch
        self.storage = storage
        self.max_bytes = max_bytes
        self._resolve = resolve or _resolve_host
        self._s3 = None
        # Resolved once: a prefix that is itself a symlink (/data -> /mnt/data) compares as its target.
        self._local_prefixes = [os.path.realpath(p) for p in fetch.local_path_prefixes]

    def fetch(self, uri: str) -> bytes:
        uri = uri.strip()
        deadline = _Deadline(self.policy.timeout_s)
        parts = urlsplit(uri)
        scheme = parts.scheme.lower()
        if scheme in ("http", "https"):
            return self._http_fetch(uri, deadline)
        if scheme == "s3":
            return self._s3_get(uri, deadline)
        if scheme == "data":
            return self._data_url(uri)
        if scheme == "file":
            if parts.netloc not in ("", "localhost"):
                raise _error(ErrorKind.URI_NOT_ALLOWED,
                             f"{describe_uri(uri)}: a file:// URI names a file on the worker (file:///path)")
            return self._local(uri, unquote(parts.path), deadline)
        if scheme == "":
            return self._local(uri, uri, deadline)
        raise _error(ErrorKind.URI_NOT_ALLOWED,
                     f"scheme {scheme!r} is not supported (use s3://, http(s)://, file:// or a path)")

    # ------------------------------------------------------------------ local
    def _local(self, uri: str, path: str, deadline: _Deadline) -> bytes:
        if not self.policy.allow_local_paths:
            raise _error(ErrorKind.URI_NOT_ALLOWED,
                         f"local paths are not allowed (fetch.allow_local_paths is off): {describe_uri(uri)}")

        def refused() -> RecordError:
            # One kind and one message for missing, unreadable, not a regular file and outside the prefixes.
            return _error(ErrorKind.NOT_FOUND, f"{describe_uri(uri)}: no readable regular file at this path "
                          "under fetch.local_path_prefixes")

        if not path or "\x00" in path:
            raise refused()
        real = os.path.realpath(path)  # .. and every symlink resolved before the prefix check
        if not self._under_prefixes(real):
            raise refused()
        try:
            # Not a regular file (FIFO, device, socket, directory): refused before any open().
            if not stat.S_ISREG(os.lstat(real).st_mode):
                raise refused()
            # O_NOFOLLOW: the last component cannot have become a symlink since realpath; O_NONBLOCK: a
            # FIFO swapped in meanwhile does not block the open (fstat below refuses it).
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError:
            raise refused() from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or not self._opened_under_prefixes(fd, real, info):
                raise refused()
            if info.st_size > self.max_bytes:
                raise _too_large(uri, self.max_bytes)
            return self._read_fd(fd, uri, deadline)
        except OSError:
            raise refused() from None
        finally:
            os.close(fd)

    def _under_prefixes(self, real: str) -> bool:
        if any(real == p or real.startswith(p + "/") for p in _NEVER_LOCAL):
            return False
        return any(real == p or real.startswith(p.rstrip("/") + "/") for p in self._local_prefixes)

    def _opened_under_prefixes(self, fd: int, real: str, info: os.stat_result) -> bool:
        """The file actually opened, judged again: a directory above it swapped for a symlink between the
        check and the open (TOCTOU) shows here."""
        try:
            opened = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # no /proc (not Linux): the path must still name the very file opened
            now = os.stat(real, follow_symlinks=False)
            return (now.st_dev, now.st_ino) == (info.st_dev, info.st_ino)
        return self._under_prefixes(opened)

    def _read_fd(self, fd: int, uri: str, deadline: _Deadline) -> bytes:
        return self._read_bounded(lambda: os.read(fd, _CHUNK), uri, deadline)

    def _read_bounded(self, read: Callable[[], bytes], uri: str, deadline: _Deadline) -> bytes:
        """Chunks from `read()` until it returns none: refused past max_bytes or past the deadline."""
        chunks, total = [], 0
        while chunk := read():
            total += len(chunk)
            if total > self.max_bytes:
                raise _too_large(uri, self.max_bytes)
            chunks.append(chunk)
            if deadline.left() <= 0:
                raise deadline.error(uri)
        return b"".join(chunks)

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
    def _s3_get(self, uri: str, deadline: _Deadline) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            bucket, key = split_s3(uri)
        except ValueError as exc:
            raise RecordError(ErrorKind.INVALID_RECORD, str(exc), Stage.FETCH) from None
        if not self._s3_allowed(bucket, key):
            raise _error(ErrorKind.URI_NOT_ALLOWED, f"{describe_uri(uri)} is not under fetch.s3_prefixes")
        if self._s3 is None:
            # The endpoint is the operator's (storage.endpoint_url), not the record's: botocore's
            # per-attempt timeouts and standard-mode retries bound it; the deadline is checked while reading.
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
        try:
            with response["Body"] as body:
                return self._read_bounded(lambda: body.read(_CHUNK), uri, deadline)
        except (BotoCoreError, urllib3.exceptions.HTTPError, OSError) as exc:
            raise _error(ErrorKind.UNREACHABLE, f"{uri}: {type(exc).__name__} while reading") from None

    def _s3_allowed(self, bucket: str, key: str) -> bool:
        if not self.policy.s3_prefixes:
            return True
        # Dot segments are refused outright: some S3-compatible servers normalise them away, which would
        # turn bucket/images/../secret into bucket/secret after this check.
        if any(part in (".", "..") for part in key.split("/")):
            return False
        for prefix in self.policy.s3_prefixes:
            allowed_bucket, _, folder = prefix.partition("/")
            if bucket == allowed_bucket and (not folder or key.startswith(folder + "/")):
                return True
        return False

    # ------------------------------------------------------------------ http(s)://
    def _http_fetch(self, uri: str, deadline: _Deadline) -> bytes:
        with _Watchdog(deadline) as watchdog:
            try:
                data = self._with_retries(uri, deadline, lambda: self._http(uri, deadline, watchdog))
            except RecordError as exc:
                if watchdog.fired and exc.kind == ErrorKind.UNREACHABLE:
                    raise deadline.error(uri) from None
                raise
            if watchdog.fired:  # a body read to "end of stream" may have been cut short by the watchdog
                raise deadline.error(uri)
            return data

    def _with_retries(self, uri: str, deadline: _Deadline, attempt: Callable[[], _T]) -> _T:
        delay_s = 0.5
        for number in range(self.policy.retries + 1):
            try:
                return attempt()
            except _Transient as exc:
                if deadline.left() <= 0:
                    raise deadline.error(uri) from None
                if number == self.policy.retries or deadline.left() <= delay_s:
                    raise _error(ErrorKind.UNREACHABLE,
                                 f"{describe_uri(uri)}: {exc} (after {number + 1} attempts)") from None
                logger.info("retrying %s after transient failure: %s", describe_uri(uri), exc)
                time.sleep(delay_s)
                delay_s *= 2
        raise AssertionError("unreachable")

    def _http(self, url: str, deadline: _Deadline, watchdog: _Watchdog) -> bytes:
        for _ in range(self.policy.max_redirects + 1):
            parts = urlsplit(url)
            host = parts.hostname
            try:
                port = parts.port or (443 if parts.scheme == "https" else 80)
            except ValueError:
                raise RecordError(ErrorKind.INVALID_RECORD, f"URL has an invalid port: {describe_uri(url)}",
                                  Stage.FETCH) from None
            if not host:
                raise RecordError(ErrorKind.INVALID_RECORD, f"URL has no host: {describe_uri(url)}", Stage.FETCH)
            if not self.host_allowed(host):
                raise _error(ErrorKind.URI_NOT_ALLOWED, f"host {host!r} is not in fetch.http_hosts")
            address = self._checked_address(host, port, deadline)
            if deadline.left() <= 0:
                raise deadline.error(url)
            timeout = urllib3.Timeout(connect=deadline.left(), read=deadline.left())
            if parts.scheme == "https":
                pool = _WatchedHTTPSPool(address, port, timeout=timeout, retries=False, maxsize=1,
                                         server_hostname=host, assert_hostname=host, watchdog=watchdog)
            else:
                pool = _WatchedHTTPPool(address, port, timeout=timeout, retries=False, maxsize=1, watchdog=watchdog)
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            host_header = host if parts.port is None else f"{host}:{parts.port}"
            try:
                response = pool.urlopen("GET", target, headers={"Host": host_header, "User-Agent": "gemma3-fp8-pipeline"},
                                        redirect=False, preload_content=False)
            except (urllib3.exceptions.TimeoutError, urllib3.exceptions.ProtocolError,
                    urllib3.exceptions.NewConnectionError) as exc:
                pool.close()
                raise _Transient(type(exc).__name__) from None
            except urllib3.exceptions.SSLError as exc:
                pool.close()
                if watchdog.fired:
                    raise deadline.error(url) from None
                raise _error(ErrorKind.UNREACHABLE, f"{describe_uri(url)}: TLS error: {exc}") from None
            except urllib3.exceptions.HTTPError as exc:
                pool.close()
                raise _Transient(type(exc).__name__) from None
            try:
                if response.status in _REDIRECTS:
                    location = response.headers.get("Location")
                    if not location:
                        raise _error(ErrorKind.UNREACHABLE, f"{describe_uri(url)}: redirect without Location")
                    url = urljoin(url, location)
                    if urlsplit(url).scheme not in ("http", "https"):
                        raise _error(ErrorKind.URI_NOT_ALLOWED,
                                     f"redirect to a non-http URL refused: {describe_uri(url)}")
                    continue
                if response.status in (404, 410):
                    raise _error(ErrorKind.NOT_FOUND, f"{describe_uri(url)}: HTTP {response.status}")
                if response.status in (401, 403):
                    raise _error(ErrorKind.URI_NOT_ALLOWED, f"{describe_uri(url)}: HTTP {response.status}")
                if response.status == 429 or response.status >= 500:
                    raise _Transient(f"HTTP {response.status}")
                if response.status != 200:
                    raise _error(ErrorKind.UNREACHABLE, f"{describe_uri(url)}: HTTP {response.status}")
                length = response.headers.get("Content-Length")
                if length and length.isdigit() and int(length) > self.max_bytes:
                    raise _too_large(url, self.max_bytes)
                return self._read_capped(response, url)
            finally:
                response.release_conn()
                pool.close()
        raise _error(ErrorKind.UNREACHABLE, f"{describe_uri(url)}: more than {self.policy.max_redirects} redirects")

    def _read_capped(self, response, url: str) -> bytes:
        chunks, total = [], 0
        try:
            for chunk in response.stream(_CHUNK):
                total += len(chunk)
                if total > self.max_bytes:
                    raise _too_large(url, self.max_bytes)
                chunks.append(chunk)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise _Transient(f"{type(exc).__name__} while reading") from None
        return b"".join(chunks)

    def host_allowed(self, host: str) -> bool:
        """Whether `host` passes fetch.http_hosts (empty: every host; addresses are judged separately)."""
        hosts = self.policy.http_hosts
        if not hosts:
            return True
        name = host.lower().rstrip(".")
        return any(name == h or (h.startswith("*.") and name.endswith(h[1:])) for h in hosts)

    def _checked_address(self, host: str, port: int, deadline: _Deadline) -> str:
        try:
            addresses = _RESOLVER.submit(self._resolve, host, port).result(timeout=deadline.left())
        except concurrent.futures.TimeoutError:
            raise _error(ErrorKind.UNREACHABLE, f"cannot resolve host {host!r} within fetch.timeout_s") from None
        except (socket.gaierror, UnicodeError) as exc:
            reason = exc.strerror if isinstance(exc, socket.gaierror) and exc.strerror else exc
            raise _error(ErrorKind.UNREACHABLE, f"cannot resolve host {host!r}: {reason}") from None
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
    """A short form of a URI for logs and error messages (data: URLs and hostile records can be long)."""
    if uri is None:
        return "<none>"
    if uri.startswith("data:"):
        return uri[:32] + "..."
    return uri if len(uri) <= 300 else uri[:300] + "..."
