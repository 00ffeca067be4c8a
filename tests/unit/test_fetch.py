"""Fetching against a real HTTP server on loopback (so private networks are allowed in most tests)."""
import base64
import http.server
import threading
import time

import pytest

from pipeline.config import FetchSection, StorageSection
from pipeline.fetch import Fetcher, is_public_address
from pipeline.records import ErrorKind, RecordError

PAYLOAD = b"\xff\xd8\xff" + b"x" * 5000


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
        else:
            self._send(404, b"not here")

    def _send(self, status, body):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

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
    assert kind_of(lambda: fetcher(retries=2).fetch(f"{server}/flaky")) == ErrorKind.UNREACHABLE
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


def test_local_paths(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(PAYLOAD)
    assert fetcher().fetch(str(path)) == PAYLOAD
    assert fetcher().fetch(f"file://{path}") == PAYLOAD
    assert kind_of(lambda: fetcher().fetch(str(tmp_path / "missing.jpg"))) == ErrorKind.NOT_FOUND
    assert kind_of(lambda: fetcher(allow_local_paths=False).fetch(str(path))) == ErrorKind.URI_NOT_ALLOWED
    assert kind_of(lambda: fetcher(max_bytes=10).fetch(str(path))) == ErrorKind.IMAGE_TOO_LARGE


def test_data_urls_and_unknown_schemes():
    url = "data:image/jpeg;base64," + base64.b64encode(PAYLOAD).decode()
    assert fetcher().fetch(url) == PAYLOAD
    assert kind_of(lambda: fetcher().fetch("data:image/jpeg;base64,@@@")) == ErrorKind.INVALID_RECORD
    assert kind_of(lambda: fetcher().fetch("gs://bucket/a.jpg")) == ErrorKind.URI_NOT_ALLOWED
    assert kind_of(lambda: fetcher().fetch("http://unreachable.invalid/a.jpg")) == ErrorKind.UNREACHABLE
