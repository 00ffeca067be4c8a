"""Fetching against real servers on loopback (so private networks are allowed in most tests) and real
files, FIFOs and symlinks in a temporary directory."""
import base64
import http.server
import io
import os
import socket
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

import pipeline.io.fetch
from pipeline.config import FetchSection, ImageSection, StorageSection
from pipeline.io.fetch import Fetcher, describe_uri, is_public_address
from pipeline.io.images import ImageTarget, prepare_image
from pipeline.io.records import ErrorKind, RecordError

PAYLOAD = b"\xff\xd8\xff" + b"x" * 5000
DRIBBLE_S = 2.0
SECRET = b"root:x:0:0:TOP-SECRET-LINE\n"


class Handler(http.server.BaseHTTPRequestHandler):
    hits: dict[str, int] = {}

    def log_message(self, *args):
        pass

    def do_GET(self):
        Handler.hits[self.path] = Handler.hits.get(self.path, 0) + 1
        if self.path == "/img.jpg":
            self._send(200, PAYLOAD)
        elif self.path == "/redirect":
            self._redirect("/img.jpg")
        elif self.path == "/loop":
            self._redirect("/loop")
        elif self.path == "/to-metadata":
            self._redirect("http://169.254.169.254/latest/meta-data/")
        elif self.path == "/big":
            self._send(200, b"x" * 200_000)
        elif self.path == "/big-chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(20):
                chunk = b"y" * 10_000
                self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/flaky":
            self._send(503, b"busy")
        elif self.path == "/slow":
            time.sleep(2)
            self._send(200, PAYLOAD)
        elif self.path == "/forbidden":
            self._send(403, b"no")
        elif self.path == "/to-localhost":
            self._redirect(f"http://localhost:{self.server.server_address[1]}/img.jpg")
        elif self.path == "/dribble-body":
            # Headers at once, then one byte every DRIBBLE_S: each read returns well within any per-read
            # timeout, so only a deadline over the whole fetch ends it.
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self._dribble(b"x" * 1000)
        elif self.path == "/dribble-headers":
            self._dribble(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n" + b"X-Pad: " + b"p" * 1000)
        else:
            self._send(404, b"not here")

    def _send(self, status, body):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _dribble(self, data):
        self.wfile.flush()
        for byte in data:
            try:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            except OSError:
                return  # the client hung up: the point of these tests
            time.sleep(DRIBBLE_S)

    def _redirect(self, location):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()


class QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # the client hanging up on /slow is the point of that test


@pytest.fixture(scope="module")
def server():
    httpd = QuietServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def fetcher(max_bytes=100_000, **policy) -> Fetcher:
    options = {"allow_private_networks": True, "retries": 1, "timeout_s": 1.0, **policy}
    return Fetcher(FetchSection(**options), StorageSection(), max_bytes=max_bytes)


def kind_of(call) -> ErrorKind:
    with pytest.raises(RecordError) as info:
        call()
    return info.value.kind


def test_http_get_and_redirect(server):
    assert fetcher().fetch(f"{server}/img.jpg") == PAYLOAD
    assert fetcher().fetch(f"{server}/redirect") == PAYLOAD


@pytest.mark.parametrize("path, kind", [
    pytest.param("/missing", ErrorKind.NOT_FOUND, id="404"),
    pytest.param("/forbidden", ErrorKind.URI_NOT_ALLOWED, id="403"),
    pytest.param("/loop", ErrorKind.UNREACHABLE, id="redirect-loop"),
    pytest.param("/big", ErrorKind.IMAGE_TOO_LARGE, id="content-length-over-cap"),
    pytest.param("/big-chunked", ErrorKind.IMAGE_TOO_LARGE, id="chunked-over-cap"),
    pytest.param("/slow", ErrorKind.UNREACHABLE, id="read-timeout"),
])
def test_http_failures_have_kinds(server, path, kind):
    assert kind_of(lambda: fetcher().fetch(server + path)) == kind


def test_transient_failures_are_retried_a_bounded_number_of_times(server):
    Handler.hits.pop("/flaky", None)
    assert kind_of(lambda: fetcher(retries=2, timeout_s=10).fetch(f"{server}/flaky")) == ErrorKind.UNREACHABLE
    assert Handler.hits["/flaky"] == 3


def test_loopback_and_private_addresses_are_refused_by_default(server):
    strict = fetcher(allow_private_networks=False)
    before = dict(Handler.hits)
    assert kind_of(lambda: strict.fetch(f"{server}/img.jpg")) == ErrorKind.URI_NOT_ALLOWED
    assert kind_of(lambda: strict.fetch("http://169.254.169.254/latest/meta-data/")) == ErrorKind.URI_NOT_ALLOWED
    assert Handler.hits == before, "a refused URL must not be requested at all"


def test_a_name_with_any_private_address_is_refused():
    # DNS answers mixing public and private addresses (rebinding) are refused as a whole. The resolver
    # is replaced, not the network: no connection is attempted for a refused host.
    resolver = {"images.example.com": ["93.184.216.34", "10.1.2.3"]}
    strict = Fetcher(FetchSection(), StorageSection(), 1000, resolve=lambda host, port: resolver[host])
    assert kind_of(lambda: strict.fetch("https://images.example.com/a.jpg")) == ErrorKind.URI_NOT_ALLOWED


class FakePublicLoopbackFetcher(Fetcher):
    """Treats the loopback test server as if it were on the internet; every other address is judged
    by the real rule. Needed because no public server is reachable from the test machine."""

    def address_allowed(self, address):
        return address == "127.0.0.1" or super().address_allowed(address)


def test_redirects_are_checked_like_the_first_hop(server):
    strict = FakePublicLoopbackFetcher(FetchSection(retries=0), StorageSection(), 100_000)
    assert strict.fetch(f"{server}/redirect") == PAYLOAD
    with pytest.raises(RecordError) as info:
        strict.fetch(f"{server}/to-metadata")
    assert info.value.kind == ErrorKind.URI_NOT_ALLOWED and "169.254.169.254" in info.value.message


@pytest.mark.parametrize("address, public", [
    ("8.8.8.8", True), ("2001:4860:4860::8888", True), ("127.0.0.1", False), ("10.0.0.8", False),
    ("172.16.3.4", False), ("192.168.1.1", False), ("169.254.169.254", False), ("100.64.0.1", False),
    ("0.0.0.0", False), ("::1", False), ("fe80::1", False), ("fd00::1", False), ("::ffff:127.0.0.1", False),
    ("224.0.0.1", False),
])
def test_public_address_table(address, public):
    assert is_public_address(address) is public


# ----------------------------------------------------------------------------------- one deadline
@pytest.mark.parametrize("path", ["/dribble-body", "/dribble-headers"])
def test_a_server_sending_a_byte_every_two_seconds_is_cut_at_the_deadline(server, path):
    # A per-read timeout of 3 s never fires on a byte every 2 s; only the fetch's one deadline does.
    Handler.hits.pop(path, None)
    started = time.monotonic()
    with pytest.raises(RecordError) as info:
        fetcher(timeout_s=3.0, retries=2).fetch(server + path)
    elapsed = time.monotonic() - started
    assert info.value.kind == ErrorKind.UNREACHABLE and "fetch.timeout_s" in info.value.message
    assert elapsed < 3.0 + 1.5, f"held for {elapsed:.1f} s past a 3 s deadline"
    assert Handler.hits[path] == 1, "no retry after the deadline"


def test_a_tls_handshake_dribbled_a_byte_at_a_time_is_cut_at_the_deadline():
    """A raw TCP server that answers a ClientHello with a TLS record header announcing 16 KiB, then one
    byte every 0.5 s: the handshake's reads all return in time, the whole never ends."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve():
        conn, _ = listener.accept()
        with conn:
            conn.recv(4096)
            try:
                conn.sendall(b"\x16\x03\x03\x40\x00")
                for _ in range(100):
                    conn.sendall(b"\x02")
                    time.sleep(0.5)
            except OSError:
                pass

    threading.Thread(target=serve, daemon=True).start()
    started = time.monotonic()
    with pytest.raises(RecordError) as info:
        fetcher(timeout_s=2.0).fetch(f"https://127.0.0.1:{listener.getsockname()[1]}/a.jpg")
    assert info.value.kind == ErrorKind.UNREACHABLE and "fetch.timeout_s" in info.value.message
    assert time.monotonic() - started < 2.0 + 1.5
    listener.close()


# ----------------------------------------------------------------------------------- allow-lists
def test_http_host_allow_list_covers_the_first_hop_and_every_redirect(server):
    port = server.rsplit(":", 1)[1]
    listed = fetcher(http_hosts=["localhost"])
    assert listed.fetch(f"http://localhost:{port}/img.jpg") == PAYLOAD
    before = dict(Handler.hits)
    with pytest.raises(RecordError) as info:
        listed.fetch(f"{server}/img.jpg")  # 127.0.0.1 is not "localhost"
    assert info.value.kind == ErrorKind.URI_NOT_ALLOWED and "fetch.http_hosts" in info.value.message
    assert Handler.hits == before, "a host off the list is not requested"
    # A listed host redirecting to one off the list.
    assert fetcher(http_hosts=["127.0.0.1"]).fetch(f"{server}/redirect") == PAYLOAD
    assert kind_of(lambda: fetcher(http_hosts=["127.0.0.1"]).fetch(f"{server}/to-localhost")) == \
        ErrorKind.URI_NOT_ALLOWED


@pytest.mark.parametrize("host, allowed", [
    ("images.example.com", True), ("IMAGES.example.com.", True), ("a.cdn.example.net", True),
    ("x.a.cdn.example.net", True), ("cdn.example.net", False), ("badcdn.example.net", False),
    ("example.com", False), ("images.example.com.evil.io", False),
])
def test_http_host_patterns(host, allowed):
    policy = FetchSection(http_hosts=["images.example.com", "*.cdn.example.net"])
    assert Fetcher(policy, StorageSection(), 100).host_allowed(host) is allowed


@pytest.mark.parametrize("uri", [
    "s3://private/photo.jpg", "s3://data/other/photo.jpg", "s3://data/images-private/photo.jpg",
    "s3://data/images/../secrets/key.jpg", "s3://data/images/./../x.jpg", "s3://datax/images/a.jpg",
])
def test_s3_uri_outside_the_allowed_prefixes_is_refused_before_any_request(uri):
    strict = Fetcher(FetchSection(s3_prefixes=["s3://data/images/", "public"]), StorageSection(), 100)
    with pytest.raises(RecordError) as info:
        strict.fetch(uri)
    assert info.value.kind == ErrorKind.URI_NOT_ALLOWED and "fetch.s3_prefixes" in info.value.message
    assert strict._s3 is None, "no S3 client was even made"


def test_s3_allow_list_matches_buckets_and_folders():
    strict = Fetcher(FetchSection(s3_prefixes=["data/images", "public"]), StorageSection(), 100)
    assert strict._s3_allowed("data", "images/a.jpg") and strict._s3_allowed("data", "images/x/y.png")
    assert strict._s3_allowed("public", "anything/at/all.jpg")
    assert not strict._s3_allowed("data", "images") and not strict._s3_allowed("data", "imagesx/a.jpg")
    assert Fetcher(FetchSection(), StorageSection(), 100)._s3_allowed("any-bucket", "k"), "empty: no limit"


# ----------------------------------------------------------------------------------- local paths
@pytest.fixture
def disk(tmp_path):
    """An allowed folder with one image, next to a secret file and folder that records must not reach."""
    allowed = tmp_path / "images"
    allowed.mkdir()
    (allowed / "a.jpg").write_bytes(PAYLOAD)
    secret_dir = tmp_path / "private"
    secret_dir.mkdir()
    (secret_dir / "secret.txt").write_bytes(SECRET)
    (secret_dir / "photo.jpg").write_bytes(PAYLOAD)
    os.symlink(secret_dir / "secret.txt", allowed / "link-to-secret.jpg")
    os.symlink(secret_dir / "photo.jpg", allowed / "link-to-photo.jpg")
    os.symlink(secret_dir, allowed / "link-to-dir")
    os.mkfifo(allowed / "fifo.jpg")
    (tmp_path / "images-private").mkdir()
    (tmp_path / "images-private" / "b.jpg").write_bytes(PAYLOAD)
    return tmp_path


def local_fetcher(*prefixes, max_bytes=100_000) -> Fetcher:
    policy = FetchSection(allow_local_paths=True, local_path_prefixes=[str(p) for p in prefixes])
    return Fetcher(policy, StorageSection(), max_bytes=max_bytes)


def test_local_paths_are_off_by_default(disk):
    for uri in (str(disk / "images" / "a.jpg"), f"file://{disk / 'images' / 'a.jpg'}", "/etc/passwd"):
        with pytest.raises(RecordError) as info:
            Fetcher(FetchSection(), StorageSection(), 100_000).fetch(uri)
        assert info.value.kind == ErrorKind.URI_NOT_ALLOWED and "fetch.allow_local_paths" in info.value.message


def test_local_paths_need_prefixes_when_on():
    with pytest.raises(ValueError, match="local_path_prefixes"):
        FetchSection(allow_local_paths=True)


def test_local_files_under_a_prefix_are_read(disk):
    allowed = local_fetcher(disk / "images")
    path = disk / "images" / "a.jpg"
    assert allowed.fetch(str(path)) == PAYLOAD
    assert allowed.fetch(f"file://{path}") == PAYLOAD
    assert allowed.fetch(f"file://localhost{path}") == PAYLOAD
    assert allowed.fetch(f"{disk}/images/../images/a.jpg") == PAYLOAD, ".. that stays inside is fine"
    assert kind_of(lambda: local_fetcher(disk / "images", max_bytes=10).fetch(str(path))) == \
        ErrorKind.IMAGE_TOO_LARGE
    # A prefix that is itself a symlink compares as its target.
    os.symlink(disk / "images", disk / "alias")
    assert local_fetcher(disk / "alias").fetch(str(path)) == PAYLOAD


HOSTILE = [
    pytest.param("/etc/passwd", id="system-file"),
    pytest.param("file:///etc/shadow", id="file-uri-system-file"),
    pytest.param("{images}/../../../../../../etc/passwd", id="dotdot-traversal"),
    pytest.param("file://{images}/%2e%2e/private/secret.txt", id="encoded-traversal"),
    pytest.param("/proc/self/environ", id="proc"),
    pytest.param("{images}/fifo.jpg", id="fifo-under-prefix"),
    pytest.param("{images}/link-to-secret.jpg", id="symlink-out-of-prefix"),
    pytest.param("{images}/link-to-photo.jpg", id="symlink-to-an-image-outside"),
    pytest.param("{images}/link-to-dir/secret.txt", id="symlinked-dir-out-of-prefix"),
    pytest.param("{root}/images-private/b.jpg", id="sibling-with-the-prefix-as-prefix"),
    pytest.param("{images}/missing.jpg", id="missing"),
    pytest.param("{images}", id="directory"),
    pytest.param("{images}/a.jpg\x00.png", id="nul-byte"),
]


def fetch_in_thread(fetcher_: Fetcher, uri: str) -> BaseException | bytes:
    """Runs the fetch in a thread, so a fetch that blocks (a FIFO without writer) fails the test
    instead of hanging it."""
    outcome: list = []

    def run():
        try:
            outcome.append(fetcher_.fetch(uri))
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive(), f"fetching {uri!r} blocked"
    return outcome[0]


@pytest.mark.parametrize("template", HOSTILE)
def test_hostile_local_paths_all_get_one_error_without_content(disk, template):
    uri = template.format(images=disk / "images", root=disk)
    outcome = fetch_in_thread(local_fetcher(disk / "images"), uri)
    assert isinstance(outcome, RecordError), f"{uri!r} was read"
    assert outcome.kind == ErrorKind.NOT_FOUND
    # One message for every cause: missing, unreadable, FIFO, directory, outside the prefixes.
    assert outcome.message.replace(describe_uri(uri), "<uri>") == \
        "<uri>: no readable regular file at this path under fetch.local_path_prefixes"
    assert b"TOP-SECRET" not in outcome.message.encode() and "root:" not in outcome.message


@pytest.mark.parametrize("path", ["/proc/self/environ", "/proc/self/cmdline", "/sys/kernel/hostname",
                                  "/dev/zero", "/dev/null"])
def test_kernel_views_are_refused_even_under_a_root_prefix(path):
    outcome = fetch_in_thread(local_fetcher("/"), path)
    assert isinstance(outcome, RecordError) and outcome.kind == ErrorKind.NOT_FOUND


def test_a_root_prefix_reads_ordinary_files(disk):
    assert local_fetcher("/").fetch(str(disk / "private" / "photo.jpg")) == PAYLOAD


def test_a_directory_swapped_for_a_symlink_after_the_check_is_caught_on_the_open_file(disk, monkeypatch):
    """The race (a directory under the prefix replaced by a symlink between resolving the path and
    opening it) is made certain by a fake realpath that resolves nothing, as if the swap happened
    right after it. The check on the opened descriptor must still refuse the file outside."""
    monkeypatch.setattr(pipeline.io.fetch.os.path, "realpath", lambda path: os.path.normpath(path))
    allowed = local_fetcher(disk / "images")
    assert allowed.fetch(str(disk / "images" / "a.jpg")) == PAYLOAD
    outcome = fetch_in_thread(allowed, str(disk / "images" / "link-to-dir" / "photo.jpg"))
    assert isinstance(outcome, RecordError) and outcome.kind == ErrorKind.NOT_FOUND


def test_errors_of_files_that_are_not_images_carry_no_byte_of_them(disk):
    """Under an allowed prefix, a text file is fetched; the image stage's error names no byte of it."""
    (disk / "images" / "notes.jpg").write_bytes(SECRET * 3)
    data = local_fetcher(disk / "images").fetch(str(disk / "images" / "notes.jpg"))
    with pytest.raises(RecordError) as info:
        prepare_image(data, ImageSection(), ImageTarget())
    assert info.value.kind == ErrorKind.NOT_AN_IMAGE and "not an image" in info.value.message
    assert "root" not in info.value.message and "b'" not in info.value.message
    # Pillow quotes a few file bytes in some errors (here a PNG chunk id); they are scrubbed.
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40)).save(buffer, "PNG")
    broken = bytearray(buffer.getvalue())
    broken[36] = 0
    with pytest.raises(RecordError) as info:
        prepare_image(bytes(broken), ImageSection(), ImageTarget())
    assert info.value.kind == ErrorKind.CORRUPT_IMAGE and "chunk <bytes>" in info.value.message
    assert "b'" not in info.value.message


def test_data_urls_and_unknown_schemes():
    url = "data:image/jpeg;base64," + base64.b64encode(PAYLOAD).decode()
    assert fetcher().fetch(url) == PAYLOAD
    assert kind_of(lambda: fetcher().fetch("data:image/jpeg;base64,@@@")) == ErrorKind.INVALID_RECORD
    assert kind_of(lambda: fetcher().fetch("gs://bucket/a.jpg")) == ErrorKind.URI_NOT_ALLOWED
    assert kind_of(lambda: fetcher().fetch("http://unreachable.invalid/a.jpg")) == ErrorKind.UNREACHABLE
