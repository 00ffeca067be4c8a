"""The run report: `_report/report.html` and PNG charts under the output prefix, after each run.

An operator of a million-image job wants to know, without reading logs, whether it went well, how fast,
at what cost, and which records failed and why. The report answers from two sources only, so it can be
rebuilt at any time (`python -m jobs.report OUTPUT`): the manifest (counts, throughput, config,
versions) and the output rows themselves (per-row finish times, engine latencies, tokens, error kinds
with example ids). Its numbers are the manifest's, shown, never recounted differently.

The files live in `_report/` because parquet readers (pyarrow datasets, Ray Data) skip names that start
with `_`: a reader of the output prefix never trips over HTML or PNG files. The HTML is self-contained
(inline CSS, charts as base64 data URIs, no script), so it can be mailed or opened from S3 as is.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from . import records as R
from .config import PipelineConfig
from .engine import fixed_or_range, gpus_per_replica, workers_per_replica
from .storage import join, make_filesystem, write_bytes

logger = logging.getLogger(__name__)

REPORT_DIR = "_report"
REPORT_HTML = "report.html"
CHARTS = ("throughput", "latency", "tokens", "errors")

_COLUMNS = (R.ID, R.SOURCE, R.ERROR, R.ERROR_KIND, R.ERROR_STAGE, R.PROMPT_TOKENS, R.COMPLETION_TOKENS,
            R.FINISHED_AT, R.ENGINE_LATENCY_S)


@dataclass
class RunReport:
    """Everything the HTML shows: figures (name -> value), error examples, charts (name -> PNG)."""

    manifest: dict[str, Any]
    figures: dict[str, Any]
    cost: dict[str, Any]
    errors: list[dict[str, Any]]
    charts: dict[str, bytes] = field(default_factory=dict)


def report_uri(output_uri: str) -> str:
    return join(join(output_uri, REPORT_DIR), REPORT_HTML)


def load_output_columns(config: PipelineConfig, output_uri: str) -> pa.Table:
    """The columns the report needs from the written output (those present: older runs lack timings)."""
    fs, path = make_filesystem(config.storage, output_uri)
    dataset = pads.dataset(path, filesystem=fs, format="parquet")
    return dataset.to_table(columns=[c for c in _COLUMNS if c in dataset.schema.names])


def cost_estimate(config: PipelineConfig, manifest: dict[str, Any]) -> dict[str, Any]:
    """$ per 1M images = wall_s x billed GPUs x $/GPU-hour / 3600 / rows x 1e6, with its assumptions."""
    on_gpu = config.engine.device == "gpu"
    per_replica = gpus_per_replica(config) if on_gpu else workers_per_replica(config)
    max_replicas = fixed_or_range(config.batch.engine_replicas)[1]
    gpus = config.report.billed_gpus or max_replicas * per_replica
    unit = "GPU" if on_gpu else "engine worker"
    wall_s = float(manifest["wall_s"])
    rows, ok = manifest["counts"]["rows_out"], manifest["counts"]["ok"]
    gpu_hours = wall_s * gpus / 3600.0
    basis = (f"{config.report.billed_gpus} billed {unit}s (report.billed_gpus)" if config.report.billed_gpus
             else f"{max_replicas} engine replica(s) x {per_replica:g} {unit}(s) each "
                  "(the largest engine_replicas x tensor_parallel_size x pipeline_parallel_size"
                  + (" x engine.gpu_share)" if on_gpu else ")"))
    assumptions = [
        f"{gpus:g} {unit}(s) held for the whole wall time of {wall_s:,.1f} s: {basis}.",
        "Wall time runs from the job's start to its last write, so it includes the model load and the "
        "engine start-up; on a short run these dominate and the estimate is high.",
        "Only accelerator time is priced: CPU workers for image preparation, storage and transfer are not.",
        f"Rows are every output row ({rows:,}), error rows included; per successful caption uses {ok:,}.",
    ]
    price = config.report.gpu_hourly_usd
    result: dict[str, Any] = {"unit": unit, "billed": gpus, "hours": round(gpu_hours, 6), "hourly_usd": price,
                              "assumptions": assumptions}
    if price is None:
        result["assumptions"].append("No price: set report.gpu_hourly_usd to get a $ estimate.")
        return result
    if config.engine.device == "cpu":
        result["assumptions"].append("engine.device is cpu: report.gpu_hourly_usd prices one engine worker hour.")
    cost = gpu_hours * price
    result["usd"] = round(cost, 6)
    result["usd_per_1m_images"] = round(cost / rows * 1e6, 2) if rows else None
    result["usd_per_1m_ok"] = round(cost / ok * 1e6, 2) if ok else None
    return result


def error_examples(table: pa.Table, per_kind: int) -> list[dict[str, Any]]:
    """One entry per error kind, largest first: count, stages, example ids (or sources) and a message."""
    failed = table.filter(pc.is_valid(table[R.ERROR_KIND]))
    entries = []
    for kind in set(failed[R.ERROR_KIND].to_pylist()):
        rows = failed.filter(pc.equal(failed[R.ERROR_KIND], kind))
        examples = rows.slice(0, per_kind).select([R.ID, R.SOURCE, R.ERROR]).to_pylist()
        entries.append({"kind": kind, "count": rows.num_rows,
                        "stages": sorted(set(s for s in rows[R.ERROR_STAGE].to_pylist() if s)),
                        "examples": examples})
    return sorted(entries, key=lambda e: (-e["count"], e["kind"]))


def _percentiles(values: list[float]) -> dict[str, Optional[float]]:
    import numpy as np

    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    array = np.asarray(values, dtype=float)
    return {"p50": round(float(np.percentile(array, 50)), 4), "p90": round(float(np.percentile(array, 90)), 4),
            "p99": round(float(np.percentile(array, 99)), 4), "max": round(float(array.max()), 4)}


def build_report(config: PipelineConfig, manifest: dict[str, Any], table: pa.Table,
                 charts: bool = True) -> RunReport:
    """The report's content from the manifest and the output's columns (no I/O)."""
    from . import report_charts

    counts, tokens, speed = manifest["counts"], manifest["tokens"], manifest["throughput"]
    if table.num_rows != counts["rows_out"]:
        logger.warning("output holds %d rows but the manifest counts %d; the report shows the manifest's",
                       table.num_rows, counts["rows_out"])
    answered = table.filter(pc.is_null(table[R.ERROR_KIND]))
    latencies = ([v for v in answered[R.ENGINE_LATENCY_S].to_pylist() if v is not None]
                 if R.ENGINE_LATENCY_S in table.column_names else [])
    latency = _percentiles(latencies)
    ok_completion = [v for v in answered[R.COMPLETION_TOKENS].to_pylist() if v is not None]
    figures = {
        "status": manifest["status"], "rows_in": counts["rows_in"], "rows_out": counts["rows_out"],
        "ok": counts["ok"], "errors": counts["errors"], "wall_s": manifest["wall_s"],
        "rows_per_s": speed["rows_per_s"], "completion_tokens_per_s": speed["completion_tokens_per_s"],
        "total_tokens_per_s": speed["total_tokens_per_s"], "prompt_tokens": tokens["prompt"],
        "completion_tokens": tokens["completion"], "latency_rows": len(latencies),
        **{f"latency_{k}_s": v for k, v in latency.items()},
        "mean_completion_tokens": round(sum(ok_completion) / len(ok_completion), 2) if ok_completion else None,
    }
    report = RunReport(manifest, figures, cost_estimate(config, manifest),
                       error_examples(table, config.report.example_ids_per_error_kind))
    if charts:
        started = datetime.fromisoformat(manifest["started"]).timestamp()
        if R.FINISHED_AT in table.column_names:
            timed = table.filter(pc.is_valid(table[R.FINISHED_AT]))
            epoch_ms = pc.cast(timed[R.FINISHED_AT], pa.timestamp("ms", tz="UTC"), safe=False).cast(pa.int64())
            finished_s = [ms / 1000.0 - started for ms in epoch_ms.to_pylist()]
            generated = [v or 0 for v in timed[R.COMPLETION_TOKENS].to_pylist()]
        else:
            finished_s, generated = [], []
        report.charts = {
            "throughput": report_charts.throughput_chart(finished_s, generated, float(manifest["wall_s"])),
            "latency": report_charts.latency_chart(latencies),
            "tokens": report_charts.tokens_chart(
                [v for v in answered[R.PROMPT_TOKENS].to_pylist() if v is not None], ok_completion),
            "errors": report_charts.errors_chart(counts["errors_by_kind"]),
        }
    return report


def write_report(config: PipelineConfig, output_uri: str, manifest: dict[str, Any]) -> str:
    """Build and write `_report/report.html` and `_report/<chart>.png`; returns the HTML's URI."""
    from .report_html import render_html

    report = build_report(config, manifest, load_output_columns(config, output_uri))
    directory = join(output_uri, REPORT_DIR)
    for name, png in report.charts.items():
        write_bytes(config.storage, join(directory, f"{name}.png"), png)
    uri = report_uri(output_uri)
    write_bytes(config.storage, uri, render_html(report).encode())
    return uri


def write_run_report(config: PipelineConfig, output_uri: str, manifest: dict[str, Any]) -> Optional[str]:
    """`write_report` for the end of a run: the output is already written, so a report that fails is
    logged and the run still succeeds."""
    if not config.report.enabled:
        return None
    try:
        uri = write_report(config, output_uri, manifest)
    except Exception:
        logger.exception("could not write the run report under %s; the output and manifest are complete",
                         output_uri)
        return None
    logger.info("report: %s", uri)
    return uri
