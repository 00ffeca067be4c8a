"""The run report: `_report/report.html` and PNG charts under the output prefix, after each run.

An operator of a million-image job wants to know, without reading logs, whether it went well, how fast,
at what cost, and which records failed and why. The report answers from two sources only, so it can be
rebuilt at any time (`python -m jobs.report OUTPUT`): the manifest (counts, throughput, config,
versions) and the output rows themselves (per-row finish times, engine latencies, tokens, error kinds
with example ids). Its numbers are the manifest's, shown, never recounted differently.

Its gallery shows a fixed-seed sample of answered rows (thumbnail, prompt, text, finish reason, tokens,
tool calls) and a few rows of each error kind. The thumbnails are the `thumbnail` column, which the prepare
stage fills for a small hash-picked sample of rows only (pipeline/report/gallery.py says why that sample always
holds the gallery's rows); the gallery's rows are read back with a filter on their row hashes, so a
million-row output is never read whole for it. A row refused before its image decoded shows its error
message and nothing else.

The files live in `_report/` because parquet readers (pyarrow datasets, Ray Data) skip names that start
with `_`: a reader of the output prefix never trips over HTML or PNG files. The HTML is self-contained
(inline CSS, charts as base64 data URIs, no script), so it can be mailed or opened from S3 as is.
"""
from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Any, Callable, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipeline.io import records as R
from pipeline.config import PipelineConfig
from pipeline.engine.args import fixed_or_range, gpus_per_replica, workers_per_replica
from pipeline.report.model import RunReport
from pipeline.io.storage import join, make_filesystem, write_bytes

logger = logging.getLogger(__name__)

REPORT_DIR = "_report"
REPORT_HTML = "report.html"
CHARTS = ("throughput", "latency", "tokens", "errors")

_COLUMNS = (R.ID, R.SOURCE, R.ERROR, R.ERROR_KIND, R.ERROR_STAGE, R.PROMPT_TOKENS, R.COMPLETION_TOKENS,
            R.FINISHED_AT, R.ENGINE_LATENCY_S, R.ROW_HASH)
# What a gallery entry shows; read only for the sampled rows (`load_rows`), never for the whole output.
GALLERY_COLUMNS = (R.ID, R.SOURCE, R.ROW_HASH, R.PROMPT, R.TEXT, R.FINISH_REASON, R.PROMPT_TOKENS,
                   R.COMPLETION_TOKENS, R.TOOL_CALLS, R.ERROR, R.ERROR_KIND, R.ERROR_STAGE, R.THUMBNAIL)
# Stages after the image decoded: an error row of these may have a thumbnail. Rows refused before (validate,
# fetch, image) never do: the report shows their error message and nothing else of the record.
DECODED_STAGES = frozenset({R.Stage.ENGINE.value, R.Stage.TOOLS.value})
_JPEG_MAGIC = b"\xff\xd8\xff"


def report_uri(output_uri: str) -> str:
    return join(join(output_uri, REPORT_DIR), REPORT_HTML)


def sample_stride(rows: int, max_rows: int) -> int:
    """1, or the smallest power of two that brings `rows` down to at most `max_rows`."""
    stride = 1
    while rows > max_rows * stride:
        stride *= 2
    return stride


def _one_in(stride: int, dataset: pads.Dataset) -> Optional[pc.Expression]:
    """Rows whose row key's low bits are all zero: a uniform 1-in-`stride` sample (row keys are hashes).
    None (every row) for a stride of 1, or an output without row keys (written by direct library calls)."""
    if stride <= 1 or R.ROW_HASH not in dataset.schema.names:
        return None
    mask = pa.scalar(stride - 1, pa.uint64())
    return pc.equal(pc.bit_wise_and(pc.field(R.ROW_HASH), mask), pa.scalar(0, pa.uint64()))


def load_output_columns(config: PipelineConfig, output_uri: str, stride: int = 1) -> pa.Table:
    """The columns the report needs from the written output (those present: older runs lack timings); with
    `stride` > 1 only a 1-in-`stride` sample of the rows, picked by row key as the rows are decoded."""
    dataset = _output_dataset(config, output_uri)
    return dataset.to_table(columns=_report_columns(dataset), filter=_one_in(stride, dataset))


def load_gallery_candidates(config: PipelineConfig, output_uri: str, error_stride: int) -> pa.Table:
    """For a sampled report: the rows the gallery and the error examples can show. Every row with a
    thumbnail (the prepare stage's hash-picked sample holds the gallery's answered rows: gallery.py) and
    every error row, or a 1-in-`error_stride` sample of them when they are too many to read whole."""
    dataset = _output_dataset(config, output_uri)
    errors = pc.field(R.ERROR_KIND).is_valid()
    sample = _one_in(error_stride, dataset)
    if sample is not None:
        errors = errors & sample
    wanted = errors | pc.field(R.THUMBNAIL).is_valid() if R.THUMBNAIL in dataset.schema.names else errors
    return dataset.to_table(columns=_report_columns(dataset), filter=wanted)


def _output_dataset(config: PipelineConfig, output_uri: str) -> pads.Dataset:
    fs, path = make_filesystem(config.storage, output_uri)
    return pads.dataset(path, filesystem=fs, format="parquet")


def _report_columns(dataset: pads.Dataset) -> list[str]:
    """The report's columns that the output has (older runs lack timings)."""
    return [c for c in _COLUMNS if c in dataset.schema.names]


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


def error_examples(table: pa.Table, per_kind: int, counts: Optional[dict[str, int]] = None) -> list[dict[str, Any]]:
    """One entry per error kind, largest first: count, stages, example ids (or sources) and a message.
    `counts` (the manifest's) replace the table's when the table holds only a sample of the errors."""
    failed = table.filter(pc.is_valid(table[R.ERROR_KIND]))
    entries = []
    for kind in set(failed[R.ERROR_KIND].to_pylist()):
        rows = failed.filter(pc.equal(failed[R.ERROR_KIND], kind))
        examples = rows.slice(0, per_kind).select([R.ID, R.SOURCE, R.ERROR]).to_pylist()
        entries.append({"kind": kind, "count": counts.get(kind, rows.num_rows) if counts else rows.num_rows,
                        "stages": sorted(set(s for s in rows[R.ERROR_STAGE].to_pylist() if s)),
                        "examples": examples})
    return sorted(entries, key=lambda e: (-e["count"], e["kind"]))


def gallery_picks(table: pa.Table, size: int, per_kind: int, seed: int) -> tuple[list[int], dict[str, list[int]]]:
    """Positions in `table` of the gallery's rows: the `size` answered rows with the smallest sample keys,
    and for each error kind its `per_kind` error rows with the smallest keys (pipeline/report/gallery.py)."""
    from pipeline.report.gallery import sample_keys

    if table.num_rows == 0 or (size <= 0 and per_kind <= 0):
        return [], {}
    hashes = table[R.ROW_HASH].to_pylist() if R.ROW_HASH in table.column_names else [None] * table.num_rows
    keys = sample_keys(hashes, table[R.ID].to_pylist(), seed)
    kinds = table[R.ERROR_KIND].to_pylist()
    by_kind: dict[Optional[str], list[int]] = {}
    for position, (key, kind) in enumerate(zip(keys, kinds)):
        if key is not None:
            by_kind.setdefault(kind, []).append(position)
    ordered = {kind: sorted(positions, key=keys.__getitem__) for kind, positions in by_kind.items()}
    answered = ordered.pop(None, [])[: max(size, 0)]
    return answered, {kind: positions[:per_kind] for kind, positions in sorted(ordered.items()) if per_kind > 0}


def _row_key(row: dict[str, Any]) -> tuple:
    return ("hash", row[R.ROW_HASH]) if row.get(R.ROW_HASH) is not None else ("id", row.get(R.ID))


def load_rows(config: PipelineConfig, output_uri: str, table: pa.Table, positions: list[int]) -> pa.Table:
    """The gallery columns of the rows of `table` at `positions`, read with a filter on their row hashes
    (or ids), so only the row groups that hold them are decoded."""
    dataset = _output_dataset(config, output_uri)
    picked = table.take(positions) if positions else table.slice(0, 0)
    wanted = [_row_key(row) for row in picked.select([c for c in (R.ROW_HASH, R.ID) if c in picked.column_names]).to_pylist()]
    hashes = [value for tag, value in wanted if tag == "hash"]
    ids = [value for tag, value in wanted if tag == "id" and value is not None]
    names = dataset.schema.names
    condition = None
    if hashes and R.ROW_HASH in names:
        condition = pc.field(R.ROW_HASH).isin(pa.array(hashes, type=dataset.schema.field(R.ROW_HASH).type))
    if ids:
        by_id = pc.field(R.ID).isin(pa.array(ids, type=pa.string()))
        condition = by_id if condition is None else (condition | by_id)
    columns = [c for c in GALLERY_COLUMNS if c in names]
    if condition is None:
        return dataset.schema.empty_table().select(columns)
    return dataset.to_table(columns=columns, filter=condition)


def gallery_entry(row: dict[str, Any], default_prompt: Optional[str]) -> dict[str, Any]:
    """One row as the gallery shows it. A thumbnail only for a row whose image decoded in the job (answered,
    or failed in the engine or tools) and only if it is a JPEG; the prompt is the row's, or the run's
    default when the output has no prompt column."""
    decoded = row.get(R.ERROR_KIND) is None or row.get(R.ERROR_STAGE) in DECODED_STAGES
    thumbnail = row.get(R.THUMBNAIL) if decoded else None
    if thumbnail is not None and not bytes(thumbnail).startswith(_JPEG_MAGIC):
        thumbnail = None
    tool_calls = row.get(R.TOOL_CALLS)
    if tool_calls:
        try:
            tool_calls = json.loads(tool_calls)
        except ValueError:
            pass
    prompt = row.get(R.PROMPT) if R.PROMPT in row else default_prompt
    return {"id": row.get(R.ID), "source": row.get(R.SOURCE), "row_hash": row.get(R.ROW_HASH),
            "prompt": prompt, "prompt_is_default": R.PROMPT not in row, "text": row.get(R.TEXT),
            "finish_reason": row.get(R.FINISH_REASON), "prompt_tokens": row.get(R.PROMPT_TOKENS),
            "completion_tokens": row.get(R.COMPLETION_TOKENS), "tool_calls": tool_calls or None,
            "error": row.get(R.ERROR), "error_kind": row.get(R.ERROR_KIND), "error_stage": row.get(R.ERROR_STAGE),
            "decoded": decoded, "thumbnail": bytes(thumbnail) if thumbnail is not None else None}


def gallery_entries(details: pa.Table, table: pa.Table, positions: list[int],
                    default_prompt: Optional[str]) -> list[dict[str, Any]]:
    """`gallery_entry` for the rows of `table` at `positions`, in that order, from `details` (the same rows
    with the gallery columns)."""
    found = {_row_key(row): row for row in details.to_pylist()}
    keys = table.select([c for c in (R.ROW_HASH, R.ID) if c in table.column_names]).take(positions).to_pylist() \
        if positions else []
    return [gallery_entry(found[_row_key(k)], default_prompt) for k in keys if _row_key(k) in found]


def run_default_prompt(config: PipelineConfig, manifest: dict[str, Any]) -> Optional[str]:
    return ((manifest.get("config") or {}).get("batch") or {}).get("default_prompt", config.batch.default_prompt)


def _percentiles(values: list[float]) -> dict[str, Optional[float]]:
    import numpy as np

    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    array = np.asarray(values, dtype=float)
    return {"p50": round(float(np.percentile(array, 50)), 4), "p90": round(float(np.percentile(array, 90)), 4),
            "p99": round(float(np.percentile(array, 99)), 4), "max": round(float(array.max()), 4)}


def build_report(config: PipelineConfig, manifest: dict[str, Any], table: pa.Table,
                 charts: bool = True, gallery_rows: Optional[pa.Table] = None, shown: Optional[pa.Table] = None,
                 sampled_1_in: int = 1) -> RunReport:
    """The report's content from the manifest and the output's columns (no I/O). The gallery's rows come
    from `gallery_rows` (`load_rows` of the sample), or from `table` itself when it has their columns.

    With `sampled_1_in` > 1, `table` is a 1-in-N sample of the output (charts and latencies are read from
    it, rates scaled by N) and `shown` holds the rows the gallery and error examples pick from."""
    from pipeline.report import charts as report_charts

    counts, tokens, speed = manifest["counts"], manifest["tokens"], manifest["throughput"]
    shown = table if shown is None else shown
    if sampled_1_in > 1:
        logger.info("report: %d output rows read as a 1-in-%d sample (%d rows) for charts and latencies",
                    counts["rows_out"], sampled_1_in, table.num_rows)
    elif table.num_rows != counts["rows_out"]:
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
        "sampled_1_in": sampled_1_in,
    }
    report = RunReport(manifest, figures, cost_estimate(config, manifest),
                       error_examples(shown, config.report.example_ids_per_error_kind,
                                      counts["errors_by_kind"] if sampled_1_in > 1 else None))
    if config.report.gallery_size > 0:
        sampled, sampled_errors = gallery_picks(shown, config.report.gallery_size,
                                                config.report.gallery_errors_per_kind, config.report.gallery_seed)
        details = gallery_rows if gallery_rows is not None else shown
        prompt = run_default_prompt(config, manifest)
        report.gallery = gallery_entries(details, shown, sampled, prompt)
        report.gallery_errors = {kind: gallery_entries(details, shown, positions, prompt)
                                 for kind, positions in sampled_errors.items()}
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
            "throughput": report_charts.throughput_chart(finished_s, generated, float(manifest["wall_s"]),
                                                         weight=sampled_1_in),
            "latency": report_charts.latency_chart(latencies),
            "tokens": report_charts.tokens_chart(
                [v for v in answered[R.PROMPT_TOKENS].to_pylist() if v is not None], ok_completion),
            "errors": report_charts.errors_chart(counts["errors_by_kind"]),
        }
    return report


def write_report(config: PipelineConfig, output_uri: str, manifest: dict[str, Any]) -> str:
    """Build and write `_report/report.html` and `_report/<chart>.png`; returns the HTML's URI.

    An output of more than report.max_rows_read rows is read as a sample for the charts and latencies
    (`sample_stride`), and for the gallery and error examples as the rows that can appear there
    (`load_gallery_candidates`): the driver's memory stays bounded however large the job."""
    counts, limit = manifest["counts"], config.report.max_rows_read
    stride = sample_stride(counts["rows_out"], limit)
    table = load_output_columns(config, output_uri, stride)
    shown = table if stride == 1 else load_gallery_candidates(config, output_uri, sample_stride(counts["errors"], limit))
    details = None
    if config.report.gallery_size > 0:
        answered, errors = gallery_picks(shown, config.report.gallery_size, config.report.gallery_errors_per_kind,
                                         config.report.gallery_seed)
        details = load_rows(config, output_uri, shown, answered + [p for ps in errors.values() for p in ps])
    report = build_report(config, manifest, table, gallery_rows=details, shown=shown, sampled_1_in=stride)
    return write_report_files(config, output_uri, report)


def write_report_files(config: PipelineConfig, output_uri: str, report) -> str:
    """Write a built report's charts and HTML under `_report/`; returns the HTML's URI."""
    from pipeline.report.html import render_html

    directory = join(output_uri, REPORT_DIR)
    for name, png in report.charts.items():
        write_bytes(config.storage, join(directory, f"{name}.png"), png)
    uri = report_uri(output_uri)
    write_bytes(config.storage, uri, render_html(report).encode())
    return uri


def write_run_report(config: PipelineConfig, output_uri: str, manifest: dict[str, Any],
                     write: Optional[Callable[[PipelineConfig, str, dict[str, Any]], str]] = None) -> Optional[str]:
    """`write` (default `write_report`; the OpenAI Batch job passes its own) for the end of a run: the
    output is already written, so a report that fails is logged and the run still succeeds."""
    if not config.report.enabled:
        return None
    try:
        uri = (write or write_report)(config, output_uri, manifest)
    except Exception:
        logger.exception("could not write the run report under %s; the output and manifest are complete",
                         output_uri)
        return None
    logger.info("report: %s", uri)
    return uri
