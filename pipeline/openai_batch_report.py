"""The run report of an OpenAI Batch output: the parquet job's `_report/report.html` and charts, from lines.

pipeline.report builds the report from the manifest and the output's rows; here the rows are the written
output and error lines (pipeline.openai_batch_written.report_table), so the figures, the error kinds
with example custom_ids, the charts and the gallery of answers are the same page as a parquet run's.
What a line does not carry is left out: no thumbnails (requests bring their own images), no engine
latencies, no error stages.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import pyarrow as pa

from .config import PipelineConfig
from .openai_batch_written import read_written, report_table
from .report import REPORT_DIR, build_report, report_uri
from .storage import join, make_filesystem, write_bytes

logger = logging.getLogger(__name__)


def write_openai_batch_report(config: PipelineConfig, output_uri: str, manifest: dict[str, Any],
                              written: Optional[pa.Table] = None) -> Optional[str]:
    """Write `_report/report.html` and the charts; `written` saves reading the lines again. A report that
    fails is logged, never raised: the output and the manifest are already complete."""
    if not config.report.enabled:
        return None
    from .report_html import render_html

    try:
        if written is None:
            filesystem, path = make_filesystem(config.storage, output_uri)
            written = read_written(filesystem, path)
        report = build_report(config, manifest, report_table(written))
        for name, png in report.charts.items():
            write_bytes(config.storage, join(join(output_uri, REPORT_DIR), f"{name}.png"), png)
        uri = report_uri(output_uri)
        write_bytes(config.storage, uri, render_html(report).encode())
    except Exception:
        logger.exception("could not write the run report under %s; the output and manifest are complete",
                         output_uri)
        return None
    logger.info("report: %s", uri)
    return uri
