"""What an OpenAI Batch output prefix holds: its committed output and error lines, read back.

One reader for three uses: a rerun's resume (the lines already written are not run again), the manifest
(counted over every attempt's files, as a reader of the prefix will find them) and the report.

A line is known by its `id` (`batch_req_...`), which pipeline.openai.batch_output derives from the
request's file and line number: the same request line always gets the same id, so the ids already in
the output are exactly the request lines a rerun must skip (pipeline.stages.openai_batch.mark_lines).

Commit: the sink (pipeline.batch.openai_batch_sink) writes each file whole. On S3 an object appears when its
upload completes (a killed writer leaves an unfinished multipart upload, which the rerun aborts); on a
local disk the sink writes a hidden `.<name>.partial` file and renames it when complete, so a file with
the sink's name is always whole, and a rerun deletes the partial ones (`delete_partial_files`).
"""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.io import records as R

OUTPUT_PREFIX = "output"
ERRORS_PREFIX = "errors"
PARTIAL_SUFFIX = ".partial"

WRITTEN_SCHEMA = pa.schema([
    ("file", pa.string()), ("id", pa.string()), ("custom_id", pa.string()), ("failed", pa.bool_()),
    ("code", pa.string()), ("message", pa.string()), ("text", pa.large_string()), ("finish_reason", pa.string()),
    ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()), ("created", pa.int64())])


def line_file_name(kind: str, attempt: int, task: int, part: int) -> str:
    """`<kind>-<attempt>-<task>-<part>.jsonl`: the attempt keeps a rerun's files apart from the killed
    run's (task numbers start again at 0); a retried task rewrites its own names."""
    return f"{kind}-{attempt:03d}-{task:05d}-{part:03d}.jsonl"


def is_line_file(name: str) -> bool:
    return name.startswith((OUTPUT_PREFIX + "-", ERRORS_PREFIX + "-")) and name.endswith(".jsonl")


def line_files(filesystem: pafs.FileSystem, path: str) -> list[str]:
    """The committed output and error files directly under the prefix (paths), sorted."""
    selector = pafs.FileSelector(path, allow_not_found=True, recursive=False)
    return sorted(info.path for info in filesystem.get_file_info(selector)
                  if info.type == pafs.FileType.File and is_line_file(info.base_name))


def delete_partial_files(filesystem: pafs.FileSystem, path: str) -> int:
    """Delete the hidden partial files a killed local writer left; returns how many."""
    selector = pafs.FileSelector(path, allow_not_found=True, recursive=False)
    partial = [info.path for info in filesystem.get_file_info(selector)
               if info.type == pafs.FileType.File and info.base_name.startswith(".")
               and info.base_name.endswith(PARTIAL_SUFFIX)]
    for file in partial:
        filesystem.delete_file(file)
    return len(partial)


def read_written(filesystem: pafs.FileSystem, path: str) -> pa.Table:
    """Every committed line, one row each (WRITTEN_SCHEMA). Held in the driver: a few hundred bytes a line."""
    rows = [row for file in line_files(filesystem, path) for row in _rows(filesystem, file)]
    return pa.Table.from_pylist(rows, schema=WRITTEN_SCHEMA)


def _rows(filesystem: pafs.FileSystem, file: str) -> Iterator[dict[str, Any]]:
    name = file.rsplit("/", 1)[-1]
    with filesystem.open_input_stream(file) as stream:
        data = stream.read()
    for text in data.splitlines():
        if text.strip():
            yield _row(name, json.loads(text))


def _row(name: str, line: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"file": name, "id": line.get("id"), "custom_id": line.get("custom_id"), "failed": True,
                           "code": None, "message": None, "text": None, "finish_reason": None,
                           "prompt_tokens": None, "completion_tokens": None, "created": None}
    response = line.get("response")
    if response is None:  # a line that is no request: the file-level error object
        error = line.get("error") or {}
        return {**row, "code": error.get("code"), "message": error.get("message")}
    body = response.get("body") or {}
    if "error" in body:  # a request the API would refuse, or a failed generation
        return {**row, "code": body["error"].get("code"), "message": body["error"].get("message")}
    choice = (body.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    usage = body.get("usage") or {}
    text = message.get("content")
    if message.get("tool_calls"):
        text = json.dumps([call["function"] for call in message["tool_calls"]], ensure_ascii=False)
    return {**row, "failed": False, "text": text, "finish_reason": choice.get("finish_reason"),
            "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens"),
            "created": body.get("created")}


def line_row_hash(batch_request_id: str) -> int:
    """A line's 64-bit row key (the crash ledger's and the report's R.ROW_HASH), from its output id."""
    return int.from_bytes(hashlib.blake2b(batch_request_id.encode(), digest_size=8).digest(), "big")


def report_table(written: pa.Table) -> pa.Table:
    """The written lines as the report reads output rows (pipeline.report.build's column names)."""
    created = [datetime.fromtimestamp(t, tz=timezone.utc) if t is not None else None
               for t in written["created"].to_pylist()]
    failed = written["failed"].to_pylist()
    return pa.table({
        R.ID: written["custom_id"], R.SOURCE: written["file"],
        R.ROW_HASH: pa.array([line_row_hash(i) if i else None for i in written["id"].to_pylist()], pa.uint64()),
        R.PROMPT: pa.nulls(written.num_rows, pa.string()),
        R.TEXT: written["text"], R.FINISH_REASON: written["finish_reason"],
        R.PROMPT_TOKENS: written["prompt_tokens"], R.COMPLETION_TOKENS: written["completion_tokens"],
        R.ERROR: pa.array([f"{c}: {m}" if f else None for f, c, m in
                           zip(failed, written["code"].to_pylist(), written["message"].to_pylist())], pa.string()),
        R.ERROR_KIND: pa.array([c if f else None for f, c in zip(failed, written["code"].to_pylist())], pa.string()),
        R.ERROR_STAGE: pa.nulls(written.num_rows, pa.string()),
        R.FINISHED_AT: pa.array(created, pa.timestamp("us", tz="UTC")),
    })
