"""The run report, status line, metrics and dry run, from one real caption run on the tiny model.

One job runs per module (real vLLM CPU engine, real local Ray) over a small local dataset with good and
bad records, hostile ones among them (system files, traversal, /proc, a FIFO, symlinks out of the allowed
folder, a server dribbling a byte every 2 s on loopback, a bucket off the allow-list). While it runs, the
test scrapes Ray's Prometheus endpoint; after it, every test reads the same output: the report's numbers
against the manifest and the output rows, its charts, a headless Chromium screenshot of the page, its
gallery as headless Chromium decodes it (driven over the DevTools protocol on loopback), the status lines
in the job's log, and the dry run's plan.
"""
from __future__ import annotations

import base64
import io
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.testing.sample_data import sample_images
from tests.conftest import TINY_CPU_CONFIG, run_job

pytestmark = pytest.mark.integration

GOOD = 24  # the gallery's default size: the report shows every answered row
PRICE_USD = 2.5
# Records naming what a batch job must never read, each with the error kind it must become. Local ones all
# get one kind and one message (not_found), so they cannot tell which files exist.
HOSTILE = {"hostile-passwd": "not_found", "hostile-shadow": "not_found", "hostile-traversal": "not_found",
           "hostile-environ": "not_found", "hostile-fifo": "not_found", "hostile-symlink-secret": "not_found",
           "hostile-symlink-photo": "not_found", "hostile-slow-server": "unreachable",
           "hostile-foreign-bucket": "uri_not_allowed"}
BAD = 7 + len(HOSTILE)
SECRET = b"TOP-SECRET-7f3a: this line must never leave the worker\n"
DRIBBLE_S = 2.0
SCHEMA = pa.schema([("id", pa.string()), ("image", pa.binary()), ("image_uri", pa.string()), ("note", pa.string())])
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


@dataclass
class Run:
    input_dir: Path
    output: Path
    result: subprocess.CompletedProcess
    manifest: dict
    html: str
    rows: list[dict]
    scraped: dict = field(default_factory=dict)
    settings: list[str] = field(default_factory=list)
    secrets: list[bytes] = field(default_factory=list)


def _records(images_dir: Path, slow_url: str) -> list[dict]:
    records = [{"id": f"good-{i:02d}", "image": s.data, "image_uri": None, "note": s.name}
               for i, s in enumerate(sample_images(GOOD))]
    jpeg = records[0]["image"]
    # One good record by path, under the allowed folder: local reads still work where configured.
    (images_dir / "good.jpg").write_bytes(jpeg)
    records[-1].update(image=None, image_uri=str(images_dir / "good.jpg"))
    hostile_uris = {
        "hostile-passwd": "/etc/passwd",
        "hostile-shadow": "file:///etc/shadow",
        "hostile-traversal": f"{images_dir}/../../../../../../../etc/passwd",
        "hostile-environ": "/proc/self/environ",
        "hostile-fifo": str(images_dir / "fifo.jpg"),
        "hostile-symlink-secret": str(images_dir / "notes.jpg"),
        "hostile-symlink-photo": str(images_dir / "photo.jpg"),
        "hostile-slow-server": slow_url,
        "hostile-foreign-bucket": "s3://private/photo.jpg",
    }
    records += [{"id": i, "image": None, "image_uri": hostile_uris[i], "note": None} for i in HOSTILE]
    records += [
        {"id": "bad-not-image-1", "image": b"plain text, not a picture " * 4, "image_uri": None, "note": None},
        {"id": "bad-not-image-2", "image": b"%PDF-1.4 " * 10, "image_uri": None, "note": None},
        {"id": "bad-missing-file", "image": None, "image_uri": str(images_dir / "absent.jpg"), "note": None},
        {"id": "bad-no-image", "image": None, "image_uri": None, "note": None},
        {"id": "dup", "image": jpeg, "image_uri": None, "note": "dup-1"},
        {"id": "dup", "image": jpeg, "image_uri": None, "note": "dup-2"},
        {"id": None, "image": jpeg, "image_uri": None, "note": "no-id"},
    ]
    return records


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Labels that differ between the processes reporting one metric: dropped to sum over processes.
PER_PROCESS_LABELS = r'(WorkerId|SessionName|NodeAddress|Component|Version|otel_[a-z_]+)="[^"]*",?'


class MetricsScraper(threading.Thread):
    """Polls Ray's Prometheus endpoint while the job runs; keeps metric names and the largest values."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.stop = threading.Event()
        self.names: set[str] = set()
        self.largest: dict[str, float] = {}

    def run(self) -> None:
        while not self.stop.wait(0.5):
            try:
                body = urllib.request.urlopen(self.url, timeout=2).read().decode()
            except OSError:
                continue
            totals: Counter = Counter()
            for line in body.splitlines():
                match = re.match(r"^([A-Za-z_:][\w:]*)(\{[^}]*\})?\s+([0-9.eE+-]+|NaN)$", line)
                if match:
                    self.names.add(match.group(1))
                    if match.group(1).startswith("ray_pipeline_"):
                        key = match.group(1) + re.sub(PER_PROCESS_LABELS, "", match.group(2) or "")
                        totals[key] += float(match.group(3))
            for key, value in totals.items():
                self.largest[key] = max(self.largest.get(key, 0.0), value)


class _Dribble(http.server.BaseHTTPRequestHandler):
    """Headers at once, then one byte every DRIBBLE_S: each read is quick, the whole never ends."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        for _ in range(1000):
            try:
                self.wfile.write(b"\xff")
                self.wfile.flush()
            except OSError:
                return  # the fetcher hung up at its deadline
            time.sleep(DRIBBLE_S)


def _hostile_disk(base: Path, images_dir: Path) -> list[bytes]:
    """Files outside the allowed folder, reachable through symlinks and a FIFO inside it; returns the
    bytes that must appear nowhere in the output or the report."""
    private = base / "private"
    private.mkdir()
    (private / "notes.txt").write_bytes(SECRET)
    photo = sample_images(GOOD + 1)[-1].data
    (private / "photo.jpg").write_bytes(photo)
    (images_dir / "notes.jpg").symlink_to(private / "notes.txt")
    (images_dir / "photo.jpg").symlink_to(private / "photo.jpg")
    os.mkfifo(images_dir / "fifo.jpg")
    # (The photo's bytes are not listed: its header is every JPEG's. Its row being an error shows it unread.)
    secrets = [SECRET.strip()]
    for system_file in ("/etc/passwd", "/etc/shadow"):
        try:
            head = Path(system_file).read_bytes()[:8]
        except OSError:
            continue  # unreadable to this test: unreadable to the job too
        secrets += [head, repr(head).encode()]
    return secrets


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model) -> Run:
    base = tmp_path_factory.mktemp("report-run")
    images_dir = base / "images"
    images_dir.mkdir()
    input_dir = base / "input"
    input_dir.mkdir()
    secrets = _hostile_disk(base, images_dir)
    slow = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Dribble)
    slow.daemon_threads = True
    threading.Thread(target=slow.serve_forever, daemon=True).start()
    records = _records(images_dir, f"http://127.0.0.1:{slow.server_address[1]}/slow.jpg")
    # Local reads only under images_dir; loopback allowed for the dribbling server (and only it, by host);
    # s3:// only under data/images; a 3 s deadline for each fetch.
    settings = ["--set", "fetch.allow_local_paths=true", "--set", f"fetch.local_path_prefixes=[{images_dir}]",
                "--set", "fetch.allow_private_networks=true", "--set", "fetch.http_hosts=[127.0.0.1]",
                "--set", "fetch.s3_prefixes=[data/images]", "--set", "fetch.timeout_s=3"]
    for part in range(2):
        pq.write_table(pa.Table.from_pylist(records[part::2], schema=SCHEMA), input_dir / f"part-{part}.parquet")
    output = base / "output"
    port = _free_port()
    scraper = MetricsScraper(port)
    scraper.start()
    # Ray's metrics reach the endpoint every 10 s by default; 1 s lets a short run show up.
    result = run_job("jobs.caption", "--input", str(input_dir), "--output", str(output),
                     "--config", str(TINY_CPU_CONFIG), "--model", str(tiny_model), *settings,
                     "--set", "batch.rows_per_file=5", "--set", f"report.gpu_hourly_usd={PRICE_USD}",
                     "--set", "report.status_interval_s=2", "--set", f"runtime.metrics_export_port={port}",
                     env={"RAY_metrics_report_interval_ms": "1000"})
    scraper.stop.set()
    scraper.join()
    slow.shutdown()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-8000:]
    manifest = json.loads((output / "_manifest.json").read_text())
    html = (output / "_report" / "report.html").read_text()
    rows = pads.dataset(output, format="parquet").to_table().to_pylist()
    return Run(input_dir, output, result, manifest, html, rows,
               {"names": scraper.names, "largest": scraper.largest}, settings, secrets)


class _Page(HTMLParser):
    """The report's machine-readable parts: data-metric values, error rows, example ids, images."""

    def __init__(self):
        super().__init__()
        self.metrics: dict[str, object] = {}
        self.error_counts: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}
        self.images: list[dict[str, str]] = []
        self.charts: list[str] = []
        self.tags: Counter = Counter()
        self._kind = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags[tag] += 1
        if "data-metric" in a:
            self.metrics[a["data-metric"]] = json.loads(a["data-value"]) if a["data-value"] else None
        if "data-error-kind" in a:
            self._kind = a["data-error-kind"]
            self.error_counts[self._kind] = int(a["data-count"])
        if "data-example-id" in a:
            self.examples.setdefault(self._kind, []).append(a["data-example-id"])
        if "data-example-source" in a:
            self.examples.setdefault(self._kind, []).append(None)
        if tag == "figure" and "data-chart" in a:
            self.charts.append(a["data-chart"])
        if tag in ("img", "script", "link", "iframe"):
            self.images.append({"tag": tag, **a})


def _page(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    return page


def test_job_writes_report_and_charts_beside_the_output(run):
    report_dir = run.output / "_report"
    assert sorted(p.name for p in report_dir.iterdir()) == ["errors.png", "latency.png", "report.html",
                                                          "throughput.png", "tokens.png"]
    for png in report_dir.glob("*.png"):
        image = Image.open(png)
        assert image.format == "PNG" and image.width >= 600 and image.height >= 200
    # Parquet readers skip `_report/`: the output still reads as exactly the manifest's rows.
    assert len(run.rows) == run.manifest["counts"]["rows_out"] == run.manifest["counts"]["rows_in"] == GOOD + BAD
    assert "report: " in run.result.stderr and "_report/report.html" in run.result.stderr


def test_report_numbers_equal_the_manifest(run):
    page, m = _page(run.html), run.manifest
    counts, tokens, speed = m["counts"], m["tokens"], m["throughput"]
    assert page.metrics["status"] == m["status"] == "complete"
    expected = {"rows_in": counts["rows_in"], "rows_out": counts["rows_out"], "ok": counts["ok"],
                "errors": counts["errors"], "wall_s": m["wall_s"], "rows_per_s": speed["rows_per_s"],
                "completion_tokens_per_s": speed["completion_tokens_per_s"],
                "total_tokens_per_s": speed["total_tokens_per_s"], "prompt_tokens": tokens["prompt"],
                "completion_tokens": tokens["completion"]}
    assert {k: page.metrics[k] for k in expected} == expected
    assert counts["ok"] == GOOD and counts["errors"] == BAD
    # The visible text is the same number, formatted.
    assert re.search(rf'data-metric="rows_out" data-value="{counts["rows_out"]}">{counts["rows_out"]}<', run.html)


def test_report_errors_by_kind_with_example_ids_from_the_output(run):
    page, m = _page(run.html), run.manifest
    assert page.error_counts == m["counts"]["errors_by_kind"] == {
        "duplicate_id": 2, "missing_id": 1, "missing_image": 1, "not_an_image": 2, "not_found": 8,
        "unreachable": 1, "uri_not_allowed": 1}
    kinds_by_id = {}
    for row in run.rows:
        kinds_by_id.setdefault(row["id"], set()).add(row["error_kind"])
    for kind, examples in page.examples.items():
        assert len(examples) == min(page.error_counts[kind], 5), "every example listed, up to the cap of 5"
        for example in examples:
            assert kind in kinds_by_id[example], (kind, example)
    assert sorted(page.examples["not_an_image"]) == ["bad-not-image-1", "bad-not-image-2"]
    assert page.examples["missing_id"] == [None], "a row without id is shown by its source"
    assert "part-" in run.html and ".parquet" in run.html


def test_hostile_records_are_error_rows_with_no_byte_of_their_files(run):
    by_id = {r["id"]: r for r in run.rows if r["id"]}
    for record_id, kind in HOSTILE.items():
        row = by_id[record_id]
        assert (row["error_kind"], row["error_stage"], row["text"]) == (kind, "fetch", None), row
    # Every local refusal reads the same whatever the cause (missing, FIFO, symlink out, outside the folder).
    local = [by_id[i] for i, kind in HOSTILE.items() if kind == "not_found"] + [by_id["bad-missing-file"]]
    assert {r["error"].replace(r["image_uri"], "<uri>") for r in local} == {
        "not_found: <uri>: no readable regular file at this path under fetch.local_path_prefixes"}
    assert "fetch.timeout_s" in by_id["hostile-slow-server"]["error"]
    assert "fetch.s3_prefixes" in by_id["hostile-foreign-bucket"]["error"]
    # The good record by path under the allowed folder was read and answered.
    by_path = by_id[f"good-{GOOD - 1:02d}"]
    assert by_path["error"] is None and by_path["image_uri"].endswith("/images/good.jpg")
    # No byte of any file the records named, nor of the old "starts with b'...'" echo, in the rows or report.
    cells = "\n".join(str(v) for r in run.rows for v in r.values() if isinstance(v, str))
    for text in (cells, run.html):
        assert "b'" not in text and "starts with" not in text
        for secret in run.secrets:
            assert secret.decode("latin-1") not in text, secret
    for path in run.output.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(secret in data for secret in run.secrets), path


def test_report_latency_and_cost_follow_the_rows_and_the_formula(run):
    page, m = _page(run.html), run.manifest
    answered = [r for r in run.rows if r["error"] is None]
    latencies = [r["engine_latency_s"] for r in answered]
    assert all(v is not None and v > 0 for v in latencies), "every answered row has its engine latency"
    assert all(r["engine_latency_s"] is None for r in run.rows if r["error"] is not None)
    assert page.metrics["latency_rows"] == len(answered) == GOOD
    for q in (50, 90, 99):
        assert page.metrics[f"latency_p{q}_s"] == pytest.approx(float(np.percentile(latencies, q)), abs=1e-4)
    assert page.metrics["latency_max_s"] == pytest.approx(max(latencies), abs=1e-4)
    # finished_at lies inside the run.
    started = time.mktime(time.strptime(m["started"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
    finished = [r["finished_at"].timestamp() for r in run.rows]
    assert all(started - 1 <= t <= started + m["wall_s"] + 1 for t in finished)
    # Cost: one engine worker (tiny CPU config: 1 replica x TP 1) for the wall time, at PRICE_USD/hour.
    hours = m["wall_s"] * 1 / 3600
    assert page.metrics["cost_billed"] == 1
    assert page.metrics["cost_hourly_usd"] == PRICE_USD
    assert page.metrics["cost_usd"] == pytest.approx(hours * PRICE_USD, abs=1e-6)
    assert page.metrics["cost_usd_per_1m_images"] == pytest.approx(hours * PRICE_USD / m["counts"]["rows_out"] * 1e6,
                                                                   abs=0.01)
    assert page.metrics["cost_usd_per_1m_ok"] == pytest.approx(hours * PRICE_USD / m["counts"]["ok"] * 1e6, abs=0.01)
    assert "held for the whole wall time" in run.html


def test_report_is_self_contained(run):
    page = _page(run.html)
    assert page.tags["script"] == 0 and page.tags["link"] == 0 and page.tags["iframe"] == 0
    assert not re.search(r'(src|href)="(https?:)?//', run.html), "nothing loads from the network"
    assert sorted(page.charts) == ["errors", "latency", "throughput", "tokens"]
    images = [i for i in page.images if i["tag"] == "img" and "data-thumbnail" not in i]
    assert len(images) == 4
    assert all(i["src"].startswith("data:image/jpeg;base64,") for i in page.images if "data-thumbnail" in i)
    for image in images:
        assert image["src"].startswith("data:image/png;base64,")
        decoded = Image.open(io.BytesIO(base64.b64decode(image["src"].split(",", 1)[1])))
        assert decoded.format == "PNG" and decoded.width >= 600
    # The inline charts are the PNG files written beside the report.
    inline = {c: i["src"] for c, i in zip(page.charts, images)}
    assert base64.b64decode(inline["latency"].split(",", 1)[1]) == (run.output / "_report" / "latency.png").read_bytes()
    assert run.manifest["versions"]["ray"] in run.html and "kv_cache_memory_bytes" in run.html


def test_report_renders_in_headless_chromium(run, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    assert chromium, "headless Chromium is required: `make test-deps` installs it (apt-get install chromium)"
    shot = tmp_path / "report.png"
    result = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                             f"--screenshot={shot}", "--window-size=1280,2000",
                             (run.output / "_report" / "report.html").as_uri()],
                            capture_output=True, text=True, timeout=120)
    assert shot.exists(), result.stderr[-3000:]
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 2000)
    pixels = np.asarray(image, dtype=float)
    assert pixels.std() > 20, "not a blank page"
    # The charts were drawn: the throughput bars' blue and the latency histogram's green are on screen.
    for color in ((0x25, 0x63, 0xEB), (0x05, 0x96, 0x69)):
        close = (np.abs(pixels - np.array(color)).sum(axis=2) < 30).sum()
        assert close > 500, f"chart color {color} covers only {close} pixels"


def test_status_lines_while_running(run):
    log = run.result.stderr
    lines = [line for line in log.splitlines() if "pipeline.batch.progress" in line]
    total = run.manifest["counts"]["rows_in"]
    running = [line for line in lines if "pipeline.batch.progress: progress: " in line]
    assert running and all(f"/{total} rows" in line and "ETA" in line for line in running), log[-3000:]
    final = [line for line in lines if "done: " in line]
    assert len(final) == 1 and lines[-1] == final[0]
    assert f"done: {total}/{total} rows (100.0%)" in final[0] and "rows/s" in final[0]
    assert f"errors {BAD}: " in final[0] and "not_an_image 2" in final[0] and "duplicate_id 2" in final[0]


def test_pipeline_and_engine_metrics_on_rays_prometheus_endpoint(run):
    names, largest = run.scraped["names"], run.scraped["largest"]
    assert "ray_pipeline_rows_total" in names, sorted(n for n in names if "pipeline" in n)
    assert any(n.startswith("ray_vllm") for n in names), sorted(names)[:50]
    ok = max((v for k, v in largest.items() if k.startswith("ray_pipeline_rows_total") and 'outcome="ok"' in k),
             default=0)
    assert 0 < ok <= GOOD


def test_dry_run_prints_the_plan_without_an_engine(run, tiny_model):
    before = sorted(p.name for p in run.output.rglob("*"))
    result = run_job("jobs.caption", "--input", str(run.input_dir), "--output", str(run.output),
                     "--config", str(TINY_CPU_CONFIG), "--model", str(tiny_model), *run.settings, "--dry-run",
                     timeout_s=300)
    assert result.returncode == 0, result.stderr[-4000:]
    plan = result.stdout
    assert "DRY RUN" in plan
    assert f"{GOOD + BAD} rows, 1 duplicated ids" in plan and "1 rows without id" in plan
    assert "holds a finished run" in plan and "refuses it without --overwrite" in plan
    assert "ray.data.llm vLLM engine: actor pool, one placement group per replica, replicas 1" in plan
    assert '{"CPU": 1}' in plan and "STRICT_PACK" in plan
    assert "no GPU (CPU engine)" in plan and "KV cache of one 1024-token sequence" in plan
    weights = (Path(tiny_model) / "model.safetensors").stat().st_size
    assert f"weights {weights / 2**20:,.2f} MiB" in plan
    assert "RAM 1.00 GiB" in plan, "CPU engine: weights + engine.kv_cache_memory_bytes (1 GiB)"
    assert "EngineCore" in run.result.stderr, "the run's log names vLLM's engine process..."
    assert "EngineCore" not in result.stderr, "...the plan's does not: no engine started"
    assert sorted(p.name for p in run.output.rglob("*")) == before, "the output is untouched"


def test_report_can_be_rebuilt_with_another_price(run, tmp_path):
    from jobs import report

    copy = tmp_path / "output"
    shutil.copytree(run.output, copy)
    assert report.main([str(copy), "--gpu-hourly-usd", str(PRICE_USD * 2)]) == 0
    before, after = _page(run.html).metrics, _page((copy / "_report" / "report.html").read_text()).metrics
    assert after["cost_hourly_usd"] == PRICE_USD * 2
    assert after["cost_usd"] == pytest.approx(run.manifest["wall_s"] / 3600 * PRICE_USD * 2, abs=1e-6)
    assert after["cost_usd"] == pytest.approx(before["cost_usd"] * 2, abs=2e-6)
    assert {k: after[k] for k in ("rows_out", "ok", "errors")} == {k: before[k] for k in ("rows_out", "ok", "errors")}


# ---- the gallery ----

GALLERY_JS = """(async () => {
  const out = [];
  for (const fig of document.querySelectorAll('figure.sample')) {
    const img = fig.querySelector('img[data-thumbnail]');
    const text = fig.querySelector('[data-field=text]');
    const entry = {id: fig.dataset.rowId, kind: fig.dataset.sampleErrorKind || null,
                   text: text ? text.textContent : null, image: null,
                   finish: (fig.querySelector('[data-field=finish_reason]') || {}).textContent || null,
                   error: (fig.querySelector('[data-field=error]') || {}).textContent || null};
    if (img) {
      await img.decode();
      const canvas = document.createElement('canvas');
      canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
      const context = canvas.getContext('2d');
      context.drawImage(img, 0, 0);
      const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
      const sum = [0, 0, 0];
      for (let i = 0; i < data.length; i += 4) { sum[0] += data[i]; sum[1] += data[i + 1]; sum[2] += data[i + 2]; }
      entry.image = {width: img.naturalWidth, height: img.naturalHeight, shown: [img.width, img.height],
                     mean: sum.map(v => v / (data.length / 4)), src: img.src};
    }
    out.push(entry);
  }
  return JSON.stringify(out);
})()"""


def _chromium_evaluate(html: Path, profile: Path, expression: str):
    """Open `html` in headless Chromium and evaluate `expression` in it over the DevTools protocol (a
    websocket on 127.0.0.1). The report has no script of its own; this is the test looking at what the
    browser decoded."""
    from websockets.sync.client import connect

    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    assert chromium, "headless Chromium is required: `make test-deps` installs it (apt-get install chromium)"
    browser = subprocess.Popen([chromium, *CHROMIUM_FLAGS, "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
                                f"--user-data-dir={profile}", html.as_uri()],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            assert time.monotonic() < deadline and browser.poll() is None, "Chromium did not open its DevTools port"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        while True:
            targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=10))
            pages = [t for t in targets if t["type"] == "page"]
            if pages:
                break
            assert time.monotonic() < deadline, targets
            time.sleep(0.1)
        with connect(pages[0]["webSocketDebuggerUrl"], max_size=2**26, open_timeout=30) as socket_:
            calls = iter(range(1, 10_000))

            def evaluate(text: str):
                call = next(calls)
                socket_.send(json.dumps({"id": call, "method": "Runtime.evaluate",
                                         "params": {"expression": text, "awaitPromise": True, "returnByValue": True}}))
                while True:
                    message = json.loads(socket_.recv(timeout=60))
                    if message.get("id") == call:
                        return message["result"]["result"].get("value")

            while evaluate("document.location.protocol + document.readyState") != "file:complete":
                assert time.monotonic() < deadline, "the page did not load"
                time.sleep(0.1)
            return json.loads(evaluate(expression))
    finally:
        browser.terminate()
        browser.wait(30)


def _as_html_reads(text: str) -> str:
    """`text` as a browser's textContent gives it back: HTML parsing turns CR and CRLF into LF, NUL into U+FFFD."""
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "\ufffd")


def _input_images(run: Run) -> dict[str, Image.Image]:
    """Each good record's input image (bytes, or the allowed local file it names), by id, as the model sees
    it (oriented by EXIF, transparency on white, 16-bit scaled: pipeline.io.images.prepare_image), at 32 px."""
    from pipeline.config import ImageSection
    from pipeline.io.images import ImageTarget, prepare_image

    images = {}
    for row in pads.dataset(run.input_dir, format="parquet").to_table().to_pylist():
        if row["id"] and row["id"].startswith("good-"):
            data = row["image"] if row["image"] is not None else Path(row["image_uri"]).read_bytes()
            images[row["id"]] = prepare_image(data, ImageSection(), ImageTarget()).resize((32, 32))
    return images


def test_thumbnails_only_for_rows_whose_image_decoded(run):
    """Every answered row (all in the sample: 24 <= 4 x report.gallery_size) has a 128 px JPEG of its own
    image; no refused row has any, hostile ones included."""
    inputs = _input_images(run)
    for row in run.rows:
        if row["error"] is not None:
            assert row["error_stage"] in ("validate", "fetch", "image") and row["thumbnail"] is None, row["id"]
            continue
        thumb = Image.open(io.BytesIO(row["thumbnail"]))
        assert thumb.format == "JPEG" and thumb.size == (128, 128) and len(row["thumbnail"]) < 12_000
        small = np.asarray(thumb.convert("RGB").resize((32, 32)), dtype=float)
        distance = {i: np.abs(small - np.asarray(image, dtype=float)).mean() for i, image in inputs.items()}
        assert distance[row["id"]] == min(distance.values()) and distance[row["id"]] < 12, (row["id"], distance)


def test_report_gallery_decodes_in_headless_chromium_and_matches_its_rows(run, tmp_path):
    html_path = run.output / "_report" / "report.html"
    assert html_path.stat().st_size < 1_000_000, html_path.stat().st_size
    cards = _chromium_evaluate(html_path, tmp_path / "profile", GALLERY_JS)
    rows = {r["id"]: r for r in run.rows if r["id"] and r["error"] is None}
    answered = [c for c in cards if c["kind"] is None]
    assert sorted(c["id"] for c in answered) == sorted(rows) and len(answered) == GOOD == 24
    for card in answered:
        row = rows[card["id"]]
        image = card["image"]
        assert image is not None, card["id"]
        assert (image["width"], image["height"], image["shown"]) == (128, 128, [128, 128])
        # The browser decoded the row's own thumbnail: the bytes are the row's, the pixels agree with Pillow's.
        assert base64.b64decode(image["src"].split(",", 1)[1]) == row["thumbnail"]
        mean = np.asarray(Image.open(io.BytesIO(row["thumbnail"])).convert("RGB"), dtype=float).mean(axis=(0, 1))
        assert np.abs(mean - np.asarray(image["mean"])).max() < 2.0, (card["id"], mean, image["mean"])
        assert card["text"] == _as_html_reads(row["text"]) and card["finish"] == row["finish_reason"]
    # Errors: a few rows of each kind, none with an image (all were refused before decoding), the message shown.
    errors = [c for c in cards if c["kind"] is not None]
    by_kind = Counter(c["kind"] for c in errors)
    assert by_kind == {k: min(n, 3) for k, n in run.manifest["counts"]["errors_by_kind"].items()}
    errors_by_id = {r["id"]: r["error"] for r in run.rows if r["error"] is not None}
    for card in errors:
        assert card["image"] is None and card["text"] is None, card
        if card["id"]:
            assert card["error"] == errors_by_id[card["id"]], "the row's message, and nothing more of the record"


def test_show_output_writes_a_gallery_of_chosen_rows(run, tmp_path):
    from jobs import show_output

    chosen = tmp_path / "chosen.html"
    assert show_output.main([str(run.output), "--html", str(chosen), "--ids", "good-03", "hostile-passwd",
                             "bad-not-image-1"]) == 0
    cards = {c["id"]: c for c in _chromium_evaluate(chosen, tmp_path / "profile", GALLERY_JS)}
    rows = {r["id"]: r for r in run.rows if r["id"]}
    assert set(cards) == {"good-03", "hostile-passwd", "bad-not-image-1"}
    assert base64.b64decode(cards["good-03"]["image"]["src"].split(",", 1)[1]) == rows["good-03"]["thumbnail"]
    assert cards["hostile-passwd"]["image"] is None and cards["bad-not-image-1"]["image"] is None
    text = chosen.read_text()
    assert "not_found: /etc/passwd" in text and "root:" not in text
    sample = tmp_path / "sample.html"
    assert show_output.main([str(run.output), "--html", str(sample), "--sample", str(GOOD + BAD)]) == 0
    assert sample.stat().st_size < 1_000_000
    assert len(re.findall(r'<figure class="sample"', sample.read_text())) == GOOD + BAD
