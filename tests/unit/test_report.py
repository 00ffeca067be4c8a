"""The run report from a manifest and output rows: figures, cost formula, error examples, HTML."""
import base64
import io
import re
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pytest
from PIL import Image

from pipeline import records as R
from pipeline.config import PipelineConfig
from pipeline.report import build_report, cost_estimate, error_examples
from pipeline.report_html import render_html

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
