"""The run report from a manifest and output rows: figures, cost formula, error examples, HTML."""
import base64
import io
import re
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pytest
from PIL import Image

from pipeline.io import records as R
from pipeline.config import PipelineConfig
from pipeline.report.build import build_report, cost_estimate, error_examples
from pipeline.report.html import render_html

START = datetime(2026, 11, 1, 12, 0, 0, tzinfo=timezone.utc)
CPU = ["engine.device=cpu", "engine.kv_cache_memory_bytes=1073741824", "engine.tensor_parallel_size=1", "batch.engine_replicas=1"]


def _table(with_timing: bool = True) -> pa.Table:
    rows = []
    for i in range(8):
        rows.append({R.ID: f"ok-{i}", R.SOURCE: "s3://b/in/part-0.parquet", R.PROMPT_TOKENS: 280 + i,
                     R.COMPLETION_TOKENS: 20, R.FINISHED_AT: START + timedelta(seconds=40 + i),
                     R.ENGINE_LATENCY_S: float(i + 1)})
    for i, (kind, stage) in enumerate([("not_found", "fetch")] * 3 + [("corrupt_image", "image")]):
        rows.append({R.ID: f"bad-{i}" if i else None, R.SOURCE: "s3://b/in/part-1.parquet",
                     R.ERROR: f"{kind}: <b>bad</b> {i}", R.ERROR_KIND: kind, R.ERROR_STAGE: stage,
                     R.FINISHED_AT: START + timedelta(seconds=10)})
    table = pa.Table.from_pylist(rows, schema=R.output_schema(pa.schema([("id", pa.string())])))
    return table if with_timing else table.drop_columns([R.FINISHED_AT, R.ENGINE_LATENCY_S])


def _manifest(config: PipelineConfig, wall_s: float = 100.0) -> dict:
    return {"status": "complete", "input": "s3://b/in", "output": "s3://b/out", "files": ["a", "b"],
            "started": START.isoformat(), "finished": (START + timedelta(seconds=wall_s)).isoformat(),
            "wall_s": wall_s,
            "counts": {"rows_in": 12, "rows_out": 12, "ok": 8, "errors": 4,
                       "errors_by_kind": {"corrupt_image": 1, "not_found": 3},
                       "errors_by_stage": {"fetch": 3, "image": 1}},
            "tokens": {"prompt": 2268, "completion": 160},
            "throughput": {"rows_per_s": 0.12, "completion_tokens_per_s": 1.6, "total_tokens_per_s": 24.28},
            "model": {"source": "s3://m", "scheme": "fp8-dynamic"}, "config": config.model_dump(mode="json"),
            "versions": {"ray": "2.60.0"}, "host": "h"}


@pytest.mark.parametrize("overrides, billed", [
    pytest.param(["engine.tensor_parallel_size=4"], 32, id="largest-replicas-x-tp"),
    pytest.param(["batch.engine_replicas=2", "engine.tensor_parallel_size=1"], 2, id="fixed-pool"),
    pytest.param(["report.billed_gpus=40"], 40, id="billed-override"),
    pytest.param(["engine.gpu_share=0.5", "engine.gpu_memory_utilization=0.45", "engine.kv_cache_memory_bytes=1"],
                 4, id="two-replicas-per-gpu"),
])
def test_cost_per_million_images(overrides, billed):
    config = PipelineConfig.load(overrides=["batch.engine_replicas=[1,8]", "report.gpu_hourly_usd=3.0", *overrides],
                                 environ={})
    cost = cost_estimate(config, _manifest(config, wall_s=3600.0))
    assert cost["billed"] == billed and cost["unit"] == "GPU"
    assert cost["usd"] == pytest.approx(3.0 * billed)
    assert cost["usd_per_1m_images"] == pytest.approx(3.0 * billed / 12 * 1e6, abs=0.01)
    assert cost["usd_per_1m_ok"] == pytest.approx(3.0 * billed / 8 * 1e6, abs=0.01)
    assert any("whole wall time" in a for a in cost["assumptions"])


def test_no_price_no_dollars():
    config = PipelineConfig.load(environ={})
    cost = cost_estimate(config, _manifest(config))
    assert "usd" not in cost and any("report.gpu_hourly_usd" in a for a in cost["assumptions"])
    assert 'data-metric="cost_usd_per_1m_images"' not in render_html(build_report(config, _manifest(config), _table(),
                                                                                 charts=False))


def test_error_examples_largest_kind_first_with_ids_or_sources():
    entries = error_examples(_table(), per_kind=2)
    assert [(e["kind"], e["count"], e["stages"]) for e in entries] == [("not_found", 3, ["fetch"]),
                                                                      ("corrupt_image", 1, ["image"])]
    assert [x["id"] for x in entries[0]["examples"]] == [None, "bad-1"]
    assert entries[0]["examples"][0]["source"] == "s3://b/in/part-1.parquet"


def test_figures_come_from_manifest_and_rows():
    config = PipelineConfig.load(overrides=CPU + ["report.gpu_hourly_usd=1.0"], environ={})
    report = build_report(config, _manifest(config), _table(), charts=False)
    f = report.figures
    assert (f["rows_out"], f["ok"], f["errors"], f["rows_per_s"]) == (12, 8, 4, 0.12)
    assert (f["latency_rows"], f["latency_p50_s"], f["latency_max_s"]) == (8, 4.5, 8.0)
    assert f["mean_completion_tokens"] == 20.0
    assert report.cost["unit"] == "engine worker" and report.cost["billed"] == 1


def test_html_is_self_contained_escaped_and_machine_readable():
    config = PipelineConfig.load(overrides=CPU + ["report.gpu_hourly_usd=1.0"], environ={})
    html = render_html(build_report(config, _manifest(config), _table()))
    assert "<script" not in html and "<b>bad</b>" not in html and "&lt;b&gt;bad&lt;/b&gt;" in html
    values = dict(re.findall(r'data-metric="([a-z0-9_]+)" data-value="([^"]*)"', html))
    assert values["rows_out"] == "12" and values["errors"] == "4" and values["cost_billed"] == "1"
    assert values["cost_usd"] == str(round(100 / 3600, 6))
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(images) == 4
    assert all(Image.open(io.BytesIO(base64.b64decode(i))).format == "PNG" for i in images)
    assert 'data-error-kind="not_found" data-count="3"' in html and 'data-example-id="bad-1"' in html


def test_output_without_timing_columns_still_reports():
    """Outputs written before finished_at/engine_latency_s existed: no latency, charts say so."""
    config = PipelineConfig.load(environ={})
    report = build_report(config, _manifest(config), _table(with_timing=False))
    assert report.figures["latency_rows"] == 0 and report.figures["latency_p50_s"] is None
    assert set(report.charts) == {"throughput", "latency", "tokens", "errors"}
    assert 'data-value="">n/a<' in render_html(report)


# ---- the gallery: thumbnails made in the prepare stage, the sample, the page ----

import json as _json
import random

import numpy as np
from html.parser import HTMLParser

import pyarrow.parquet as pq

from pipeline.report.gallery import OVERSAMPLE, ThumbnailSampler, sample_keys
from pipeline.io.images import ImageTarget, prepare_image, thumbnail_jpeg
from pipeline.stages.prepare import PrepareRecords
from pipeline.testing.sample_data import sample_images


class _Gallery(HTMLParser):
    """Each gallery card: row id, error kind, thumbnail (decoded), and the text of its data-field elements."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.cards: list[dict] = []
        self.imgs: list[dict] = []
        self._field = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "figure" and "data-row-id" in a:
            self.cards.append({"id": a["data-row-id"], "kind": a.get("data-sample-error-kind"), "thumbnail": None,
                               "no_thumbnail": None, "fields": {}})
        if tag == "img":
            self.imgs.append(a)
        if self.cards and tag == "img" and "data-thumbnail" in a:
            self.cards[-1]["thumbnail"] = base64.b64decode(a["src"].split(",", 1)[1])
        if self.cards and "data-no-thumbnail" in a:
            self.cards[-1]["no_thumbnail"] = a["data-no-thumbnail"]
        if "data-field" in a:
            self._field = a["data-field"]
            self.cards[-1]["fields"][self._field] = ""

    def handle_data(self, data):
        if self._field:
            self.cards[-1]["fields"][self._field] += data

    def handle_endtag(self, tag):
        self._field = None


def _cards(html: str) -> list[dict]:
    parser = _Gallery()
    parser.feed(html)
    return parser.cards


def test_sample_keys_are_fixed_by_seed_and_spread():
    hashes = list(range(1000))
    a, b = sample_keys(hashes, [None] * 1000, 0), sample_keys(hashes, [None] * 1000, 0)
    assert a == b and len(set(a)) == 1000
    assert sample_keys(hashes, [None] * 1000, 1) != a
    assert sorted(a)[:24] != sorted(hashes)[:24], "not the identity: neighbours in a file are not picked together"
    # without a row_hash the id decides; with neither, the row is outside any sample
    assert sample_keys([None, None], ["x", None], 0)[0] == sample_keys([None], ["x"], 0)[0]
    assert sample_keys([None], [None], 0) == [None]


def test_every_worker_split_keeps_thumbnails_for_the_global_sample_and_few_others():
    """The bottom-k sketch: whatever the split over workers and the order, the k smallest keys of the job
    all get a thumbnail, and a worker keeps about k(1 + ln(n/k)) of n rows."""
    rng = random.Random(5)
    keys = sample_keys(list(range(60_000)), [None] * 60_000, 0)
    k = 96
    global_bottom = set(sorted(keys)[:k])
    for workers in (1, 3, 7):
        rng.shuffle(keys)
        samplers = [ThumbnailSampler(k) for _ in range(workers)]
        kept = {key for key in keys if samplers[rng.randrange(workers)].take(key)}
        assert global_bottom <= kept
        per_worker = 60_000 / workers
        assert len(kept) < workers * k * (2 + np.log(per_worker / k)), len(kept)
    assert not ThumbnailSampler(0).take(1) and not ThumbnailSampler(5).take(None)


def _prepare_batch(config: PipelineConfig, rows: list[dict]) -> pa.Table:
    schema = pa.schema([(R.ID, pa.string()), (R.IMAGE, pa.binary()), (R.IMAGE_URI, pa.string()),
                        (R.ROW_HASH, pa.uint64()), (R.THUMBNAIL, pa.binary())])
    stage = PrepareRecords(config, ImageTarget(size_px=224), frozenset())
    return stage(pa.Table.from_pylist(rows, schema=schema))


def test_prepare_stage_makes_thumbnails_only_of_decoded_images(tmp_path):
    """Real PrepareRecords (real fetcher, real decode): a decoded row in the sample gets a JPEG of the
    model's view; a refused local path, bytes that are not an image and a record's own `thumbnail` value
    get none."""
    secret = tmp_path / "secret.jpg"
    photo = sample_images(1)[0].data
    secret.write_bytes(photo)  # a real JPEG, but local paths are off by default: refused, no thumbnail
    rows = [{R.ID: f"ok-{i}", R.IMAGE: s.data, R.ROW_HASH: i, R.THUMBNAIL: None} for i, s in enumerate(sample_images(4))]
    rows += [{R.ID: "local", R.IMAGE_URI: str(secret), R.ROW_HASH: 10, R.THUMBNAIL: photo},
             {R.ID: "text", R.IMAGE: b"hello " * 20, R.ROW_HASH: 11, R.THUMBNAIL: photo}]
    config = PipelineConfig.load(overrides=["report.thumbnail_px=64"], environ={})
    out = _prepare_batch(config, rows).to_pylist()
    by_id = {r[R.ID]: r for r in out}
    for i in range(4):
        thumb = Image.open(io.BytesIO(by_id[f"ok-{i}"][R.THUMBNAIL]))
        assert thumb.format == "JPEG" and thumb.size == (64, 64)
        assert len(by_id[f"ok-{i}"][R.THUMBNAIL]) < 8000
    assert by_id["local"][R.ROW_ERROR_KIND] == "uri_not_allowed" and by_id["local"][R.THUMBNAIL] is None
    assert by_id["text"][R.ROW_ERROR_KIND] == "not_an_image" and by_id["text"][R.THUMBNAIL] is None
    # gallery_size 0: no thumbnails at all
    off = _prepare_batch(PipelineConfig.load(overrides=["report.gallery_size=0"], environ={}), rows)
    assert off[R.THUMBNAIL].null_count == off.num_rows


def test_prepare_stage_keeps_only_the_smallest_keys_per_worker():
    config = PipelineConfig.load(overrides=["report.gallery_size=2"], environ={})  # k = 2 x OVERSAMPLE
    image = sample_images(1)[0].data
    rows = [{R.ID: f"r{i}", R.IMAGE: image, R.ROW_HASH: i, R.THUMBNAIL: None} for i in range(40)]
    out = _prepare_batch(config, rows)
    keys = sample_keys(list(range(40)), [None] * 40, 0)
    with_thumbnail = {i for i, t in enumerate(out[R.THUMBNAIL].to_pylist()) if t is not None}
    assert {i for i in range(40) if keys[i] in sorted(keys)[:2 * OVERSAMPLE]} <= with_thumbnail
    assert len(with_thumbnail) < 40


def _gallery_table(n_ok: int = 24) -> pa.Table:
    """Output rows with real thumbnails made the way the prepare stage makes them."""
    config = PipelineConfig.load(environ={})
    rows = []
    for i, sample in enumerate(sample_images(n_ok + 2)):
        image = prepare_image(sample.data, config.images, ImageTarget())
        rows.append({R.ID: f"ok-{i}", R.ROW_HASH: i, R.TEXT: f"caption <{i}> & more " * 20,
                     R.FINISH_REASON: "length", R.PROMPT_TOKENS: 270, R.COMPLETION_TOKENS: 64,
                     R.SOURCE: "in/part-0.parquet", R.THUMBNAIL: thumbnail_jpeg(image, 128)})
    engine_thumb = rows.pop()[R.THUMBNAIL]
    rows.pop()
    rows.append({R.ID: "engine-failed", R.ROW_HASH: 900, R.ERROR: "engine_error: boom", R.ERROR_KIND: "engine_error",
                 R.ERROR_STAGE: "engine", R.THUMBNAIL: engine_thumb})
    # A refused row carrying bytes in its thumbnail column (a tampered output): never shown.
    rows.append({R.ID: "refused", R.ROW_HASH: 901, R.ERROR: "uri_not_allowed: /etc/passwd: local paths are off",
                 R.ERROR_KIND: "uri_not_allowed", R.ERROR_STAGE: "fetch", R.THUMBNAIL: engine_thumb})
    rows.append({R.ID: "not-jpeg", R.ROW_HASH: 902, R.TEXT: "x", R.THUMBNAIL: b"<svg onload=alert(1)>"})
    schema = R.output_schema(pa.schema([(R.ID, pa.string())]), tools=True)
    return pa.Table.from_pylist(rows, schema=schema)


def test_gallery_of_24_real_thumbnails_stays_under_one_megabyte():
    config = PipelineConfig.load(overrides=CPU, environ={})
    table = _gallery_table()
    html = render_html(build_report(config, _manifest(config), table))
    assert len(html.encode()) < 1_000_000, len(html.encode())
    cards = _cards(html)
    answered = [c for c in cards if c["kind"] is None]
    assert len(answered) == 24
    by_id = {r[R.ID]: r for r in table.to_pylist()}
    for card in answered:
        row = by_id[card["id"]]
        if card["id"] == "not-jpeg":
            assert card["thumbnail"] is None, "bytes that are not a JPEG are never put into the page"
            continue
        assert card["thumbnail"] == row[R.THUMBNAIL]
        assert Image.open(io.BytesIO(card["thumbnail"])).size == (128, 128)
        assert row[R.TEXT].startswith(card["fields"]["text"].rstrip("…"))
        assert card["fields"]["finish_reason"] == "length" and card["fields"]["completion_tokens"] == "64"
        assert card["fields"]["prompt"] == config.batch.default_prompt
    assert "<svg" not in html and "caption <" not in html and "caption &lt;0&gt; &amp; more" in html
    errors = {c["id"]: c for c in cards if c["kind"]}
    assert errors["engine-failed"]["thumbnail"] == by_id["engine-failed"][R.THUMBNAIL]
    assert errors["refused"]["thumbnail"] is None and "refused before" in errors["refused"]["no_thumbnail"]
    assert errors["refused"]["fields"]["error"] == "uri_not_allowed: /etc/passwd: local paths are off"


def test_gallery_is_a_fixed_sample_and_can_be_turned_off():
    config = PipelineConfig.load(overrides=CPU + ["report.gallery_size=5"], environ={})
    table = _gallery_table(10)
    first = [c["id"] for c in _cards(render_html(build_report(config, _manifest(config), table, charts=False)))]
    again = [c["id"] for c in _cards(render_html(build_report(config, _manifest(config), table.take(
        list(reversed(range(table.num_rows)))), charts=False)))]
    assert first == again and len([i for i in first if i.startswith("ok-") or i == "not-jpeg"]) == 5
    reseeded = PipelineConfig.load(overrides=CPU + ["report.gallery_size=5", "report.gallery_seed=9"], environ={})
    assert [c["id"] for c in _cards(render_html(build_report(reseeded, _manifest(reseeded), table, charts=False)))] \
        != first
    off = PipelineConfig.load(overrides=CPU + ["report.gallery_size=0"], environ={})
    html = render_html(build_report(off, _manifest(off), table, charts=False))
    assert _cards(html) == [] and "data:image/jpeg" not in html


def test_tool_calls_are_shown(tmp_path):
    config = PipelineConfig.load(overrides=CPU, environ={})
    table = _gallery_table(2)
    calls = _json.dumps([{"name": "get_weather", "arguments": {"city": "<Paris>"}}])
    table = table.set_column(table.schema.get_field_index(R.TOOL_CALLS), R.TOOL_CALLS,
                             pa.array([calls] + [None] * (table.num_rows - 1), pa.string()))
    cards = _cards(render_html(build_report(config, _manifest(config), table, charts=False)))
    card = next(c for c in cards if c["id"] == "ok-0")
    assert _json.loads(card["fields"]["tool_calls"]) == [{"name": "get_weather", "arguments": {"city": "<Paris>"}}]


def test_show_output_writes_a_gallery_of_chosen_ids_or_a_sample(tmp_path, monkeypatch, capsys):
    from jobs import show_output

    out = tmp_path / "out"
    out.mkdir()
    table = _gallery_table(6)
    pq.write_table(table.slice(0, 4), out / "part-0.parquet")
    pq.write_table(table.slice(4), out / "part-1.parquet")
    config = PipelineConfig.load(environ={})
    (out / "_manifest.json").write_text(_json.dumps(_manifest(config)))
    monkeypatch.chdir(tmp_path)
    page = tmp_path / "chosen.html"
    assert show_output.main([str(out), "--html", str(page), "--ids", "ok-5", "refused", "ok-1"]) == 0
    cards = {c["id"]: c for c in _cards(page.read_text())}
    assert set(cards) == {"ok-5", "refused", "ok-1"}
    rows = {r[R.ID]: r for r in table.to_pylist()}
    assert cards["ok-5"]["thumbnail"] == rows["ok-5"][R.THUMBNAIL]
    assert cards["refused"]["thumbnail"] is None
    sample = tmp_path / "sample.html"
    assert show_output.main([str(out), "--html", str(sample), "--sample", "4", "--seed", "2"]) == 0
    assert len(_cards(sample.read_text())) == 4
    assert "wrote 4 rows" in capsys.readouterr().out
    assert show_output.main([str(out), "--html", str(page), "--ids", "nope"]) == 1


def test_a_large_output_is_reported_from_a_sample_with_the_same_gallery_and_exact_counts(tmp_path):
    """report.max_rows_read: 8,000 rows read as a 1-in-8 sample by row key, against the same output read whole.
    Thumbnails are made as the prepare stage makes them (a bottom-k sketch over sample keys), so the
    sampled report's gallery must be the whole-output report's, row for row."""
    import numpy as np
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from pipeline.batch.manifest import build_manifest
    from pipeline.report.build import write_report
    from pipeline.report.gallery import ThumbnailSampler, sample_keys, sampler_size

    rows_total, rng = 8000, np.random.default_rng(3)
    hashes = rng.integers(0, 2**64 - 1, rows_total, dtype=np.uint64, endpoint=True)
    keys = sample_keys(hashes.tolist(), [None] * rows_total, 0)
    sampler = ThumbnailSampler(sampler_size(6))
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (9, 9, 9)).save(buffer, "JPEG")
    rows = []
    for i in range(rows_total):
        kind = ("not_found", "fetch") if i % 97 == 0 else ("engine_error", "engine") if i % 389 == 0 else None
        thumbnail = buffer.getvalue() if sampler.take(keys[i]) and (kind is None or kind[1] == "engine") else None
        rows.append({R.ID: f"r{i}", R.ROW_HASH: int(hashes[i]), R.SOURCE: "in/part.parquet", R.TEXT: "ok" if not kind else None,
                     R.PROMPT_TOKENS: None if kind else 300, R.COMPLETION_TOKENS: None if kind else 10,
                     R.ERROR: f"{kind[0]}: x" if kind else None, R.ERROR_KIND: kind[0] if kind else None,
                     R.ERROR_STAGE: kind[1] if kind else None, R.THUMBNAIL: thumbnail,
                     R.FINISHED_AT: START + timedelta(seconds=i / 100), R.ENGINE_LATENCY_S: None if kind else 1.0 + i % 7})
    table = pa.Table.from_pylist(rows, schema=R.output_schema(pa.schema([("id", pa.string())])))
    output = tmp_path / "out"
    output.mkdir()
    for n in range(4):
        pq.write_table(table.slice(n * 2000, 2000), output / f"part-{n}.parquet", row_group_size=500)

    def report(max_rows_read):
        config = PipelineConfig.load(overrides=["report.gallery_size=6", f"report.max_rows_read={max_rows_read}"],
                                     environ={})
        manifest = build_manifest(config=config, input_uri="in", output_uri=str(output), rows_in=rows_total,
                                  output=pads.dataset(str(output), format="parquet"), checkpoint={},
                                  started=START.timestamp(), finished=START.timestamp() + 80)
        write_report(config, str(output), manifest)
        return (output / "_report" / "report.html").read_text(), manifest

    whole, manifest = report(10_000)
    sampled, _ = report(1000)
    assert "Engine latency (a 1-in-8 sample of rows)" in sampled and "sample of rows" not in whole
    timed = int(re.search(r'data-metric="latency_rows" data-value="(\d+)"', sampled).group(1))
    answered = manifest["counts"]["ok"]
    assert answered / 8 * 0.8 < timed < answered / 8 * 1.2, "about one answered row in eight"
    gallery = lambda html: re.findall(r'<figure class="sample".*?</figure>', html, flags=re.S)
    assert gallery(sampled) == gallery(whole) and len(gallery(whole)) > 6, "same rows, same order"
    assert len(re.findall(r'data-section="gallery"', sampled)) == 1
    errors = lambda html: dict(re.findall(r'data-error-kind="(\w+)" data-count="(\d+)"', html))
    assert errors(sampled) == errors(whole) == {k: str(v) for k, v in manifest["counts"]["errors_by_kind"].items()}
