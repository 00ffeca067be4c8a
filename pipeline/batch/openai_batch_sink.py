"""Write OpenAI Batch output and error files: sharded JSONL under the output prefix.

Ray's `write_json` writes every column of a row as a JSON object, under its own file names; an OpenAI
output line is one prebuilt JSON object, and a run writes two kinds of files (requests that ran,
requests that failed) from one execution of the dataset. So each write task writes the `line` column
itself, to `output-<attempt>-<task>-<part>.jsonl` or `errors-<attempt>-<task>-<part>.jsonl`, starting a
new part every `rows_per_file` lines (pipeline.openai.batch_written names them). Names depend only on the
run's attempt and the task index: a retried task overwrites its own files rather than adding duplicates,
and a rerun never overwrites what a killed attempt committed. Each file appears whole (S3: when its upload
completes; a local disk: a hidden partial file renamed once closed), so a rerun can trust every file it
finds. Each task returns what it wrote, which the driver logs.
"""
from __future__ import annotations

import collections
import logging
from typing import Any, Iterable, Optional

import pyarrow.fs as pafs
from ray.data.block import Block, BlockAccessor
from ray.data.datasource.datasink import Datasink, WriteResult

from pipeline.config import StorageSection
from pipeline.stages.openai_batch import LINE_COLUMN
from pipeline.openai.batch_written import ERRORS_PREFIX, OUTPUT_PREFIX, PARTIAL_SUFFIX, line_file_name
from pipeline.io.storage import join, make_filesystem

logger = logging.getLogger(__name__)


class _RollingFile:
    """Lines into `<prefix>-<task>-<part>.jsonl`, a new part every `rows_per_file` lines; opened lazily,
    so a task without errors writes no error file."""

    def __init__(self, filesystem: pafs.FileSystem, path: str, uri: str, prefix: str, attempt: int, task: int,
                 rows_per_file: int):
        self.filesystem, self.path, self.uri = filesystem, path, uri
        self.prefix, self.attempt, self.task, self.rows_per_file = prefix, attempt, task, rows_per_file
        # S3 shows an object only once its upload completes; a local file is visible while it grows.
        self.rename = isinstance(filesystem, pafs.LocalFileSystem)
        self.name = ""
        self.stream: Optional[Any] = None
        self.part = 0
        self.rows_in_part = 0
        self.files: list[str] = []

    def write(self, line: str) -> None:
        if self.stream is not None and self.rows_in_part >= self.rows_per_file:
            self.close()
            self.part += 1
        if self.stream is None:
            self.name = line_file_name(self.prefix, self.attempt, self.task, self.part)
            self.stream = self.filesystem.open_output_stream(self._written_path())
            self.rows_in_part = 0
        self.stream.write(line.encode() + b"\n")
        self.rows_in_part += 1

    def _written_path(self) -> str:
        return f"{self.path}/.{self.name}{PARTIAL_SUFFIX}" if self.rename else f"{self.path}/{self.name}"

    def close(self) -> None:
        """Close the part: only now does it carry its name (committed)."""
        if self.stream is not None:
            self.stream.close()
            self.stream = None
            if self.rename:
                self.filesystem.move(self._written_path(), f"{self.path}/{self.name}")
            self.files.append(join(self.uri, self.name))


class OpenAIBatchSink(Datasink[dict]):
    """Writes FinalizeLines' rows: `failed` rows to error files, the others to output files."""

    def __init__(self, storage: StorageSection, output_uri: str, rows_per_file: int, attempt: int = 1):
        self.storage = storage
        self.attempt = attempt
        self.output_uri = output_uri.rstrip("/")
        self.rows_per_file = rows_per_file
        self.result: Optional[dict[str, Any]] = None

    def on_write_start(self, schema: Any = None) -> None:
        filesystem, path = make_filesystem(self.storage, self.output_uri)
        if isinstance(filesystem, pafs.LocalFileSystem):
            filesystem.create_dir(path, recursive=True)

    def write(self, blocks: Iterable[Block], ctx: Any) -> dict[str, Any]:
        filesystem, path = make_filesystem(self.storage, self.output_uri)
        files = {kind: _RollingFile(filesystem, path, self.output_uri, kind, self.attempt, ctx.task_idx,
                                   self.rows_per_file)
                 for kind in (OUTPUT_PREFIX, ERRORS_PREFIX)}
        tally = _Tally()
        for block in blocks:
            table = BlockAccessor.for_block(block).to_arrow()
            for row in table.to_pylist():
                files[ERRORS_PREFIX if row["failed"] else OUTPUT_PREFIX].write(row[LINE_COLUMN])
                tally.add(row)
        # Only a task that got through its blocks renames its last local parts: one that raised leaves them
        # hidden, and its retry (same attempt and task, so the same names) writes them again.
        for file in files.values():
            file.close()
        return {**tally.as_dict(), "files": files[OUTPUT_PREFIX].files + files[ERRORS_PREFIX].files}

    def on_write_complete(self, write_result: WriteResult[dict]) -> None:
        """Runs on the driver: the totals over all write tasks."""
        total = _Tally()
        files: list[str] = []
        for returned in write_result.write_returns:
            total.merge(returned)
            files += returned["files"]
        self.result = {**total.as_dict(), "files": sorted(files)}
        logger.info("wrote %d lines (%d errors) in %d files under %s", total.ok + total.errors, total.errors,
                    len(files), self.output_uri)


class _Tally:
    def __init__(self) -> None:
        self.ok = self.errors = self.prompt_tokens = self.completion_tokens = 0
        self.by_code: collections.Counter[str] = collections.Counter()
        self.by_stage: collections.Counter[str] = collections.Counter()

    def add(self, row: dict[str, Any]) -> None:
        if row["failed"]:
            self.errors += 1
            self.by_code[row["code"]] += 1
            self.by_stage[row["stage"]] += 1
        else:
            self.ok += 1
            self.prompt_tokens += row["prompt_tokens"] or 0
            self.completion_tokens += row["completion_tokens"] or 0

    def merge(self, other: dict[str, Any]) -> None:
        self.ok += other["ok"]
        self.errors += other["errors"]
        self.prompt_tokens += other["prompt_tokens"]
        self.completion_tokens += other["completion_tokens"]
        self.by_code.update(other["errors_by_kind"])
        self.by_stage.update(other["errors_by_stage"])

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "errors": self.errors, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "errors_by_kind": dict(sorted(self.by_code.items())),
                "errors_by_stage": dict(sorted(self.by_stage.items()))}
