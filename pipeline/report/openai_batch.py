"""The run report of an OpenAI Batch output: the parquet job's `_report/report.html` and charts, from lines.

pipeline.report.build builds the report from the manifest and the output's rows; here the rows are the written
output and error lines (pipeline.openai.batch_written.report_table), so the figures, the error kinds
with example custom_ids, the charts and the gallery of answers are the same page as a parquet run's.
What a line does not carry is left out: no thumbnails (requests bring their own images), no engine
latencies, no error stages.
"""
from __future__ import annotations

from typing import Any, Optional

import pyarrow as pa

from pipeline.config import PipelineConfig
from pipeline.openai.batch_written import read_written, report_table
from pipeline.report.build import build_report, write_report_files, write_run_report
from pipeline.io.storage import make_filesystem


def write_openai_batch_report(config: PipelineConfig, output_uri: str, manifest: dict[str, Any],
                              written: Optional[pa.Table] = None) -> Optional[str]:
    """Write `_report/report.html` and the charts; `written` saves reading the lines again. A report that
    fails is logged, never raised (`write_run_report`): the output and the manifest are already complete."""
    def write(config: PipelineConfig, output_uri: str, manifest: dict[str, Any]) -> str:
        table = written if written is not None else read_written(*make_filesystem(config.storage, output_uri))
        return write_report_files(config, output_uri, build_report(config, manifest, report_table(table)))

    return write_run_report(config, output_uri, manifest, write=write)
