"""The Ray Data stages of an OpenAI Batch job, around the same `ray.data.llm` processor as parquet records.

    request files -> read_request_lines (one task per file: numbered lines)
                  -> mark_lines (a resumed run drops the lines already written; row keys)
                  -> PrepareRequests (CPU pool: parse and check each line, fetch, decode and resize images)
                  -> processor: RequestBuilder -> Ray's multimodal stage -> OpenAIChatTemplateUDF
                     -> tokenize -> engine (pipeline.tools' ToolChainEngineUDF) -> LineBuilder
                     (the UDFs installed by pipeline.stages.openai_batch_template.stage_overrides)
                  -> FinalizeLines (one explicit schema) -> OpenAIBatchSink

A line that cannot run never raises out of a stage: it carries its LineError (as JSON) and Ray's
`__inference_error__` marker, which makes every processor stage pass it through untouched, until
LineBuilder writes it as an error line.

Why the conversation travels as JSON: Ray Data holds all rows of a block in one Arrow type, so the
messages of different requests would be merged into one struct (a tool call's arguments padded with the
keys of every other request's calls, rendered as `None`). The chat-template stage renders the exact
conversation from `_conversation`; the `messages` column only carries the images to Ray's multimodal
stage, which turns them into the engine's `multimodal_data`.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any, Iterator, Optional

import pyarrow as pa
from PIL import Image

from pipeline.io import records as R
from pipeline.config import PipelineConfig, StorageSection
from pipeline.stages.engine_rows import INFERENCE_ERROR, finish_reason
from pipeline.io.fetch import Fetcher
from pipeline.io.images import ImageTarget, prepare_image
from pipeline.openai.batch_requests import LineError, RequestLimits, custom_id_of, parse_request_line, read_envelope
from pipeline.openai.batch_output import (
    LineIds,
    completion_body,
    engine_error,
    error_line,
    invalid_tool_call,
    success_line,
    tool_finish_reason,
)
from pipeline.openai.batch_written import line_row_hash
from pipeline.io.storage import make_filesystem
from pipeline.tools.request import ToolRequest

logger = logging.getLogger(__name__)

# Working columns (never written as such).
URI = "uri"                      # one input file
SOURCE = "_source"               # the line's file
LINE = "_line"                   # the line's number in its file, from 1 (blank lines count)
TEXT = "_text"                   # the line's bytes
CUSTOM_ID = "_custom_id"
CONVERSATION = "_conversation"   # JSON: ParsedRequest.conversation
SAMPLING = "_sampling"           # JSON: ParsedRequest.sampling
TOOL_TEMPLATE = "_tool_template"
IMAGES = "_images"               # the prepared images' RGB bytes, in placeholder order
MAX_TOKENS = "_max_tokens"
LINE_ERROR = "_line_error"       # JSON: LineError

LINES_SCHEMA = pa.schema([(SOURCE, pa.string()), (LINE, pa.int64()), (TEXT, pa.large_binary())])
# What FinalizeLines hands the sink: the line itself, which file it goes to, and what the manifest counts.
LINE_COLUMN = "line"
OUTPUT_SCHEMA = pa.schema([(LINE_COLUMN, pa.large_string()), ("custom_id", pa.string()), ("failed", pa.bool_()),
                           ("code", pa.string()), ("stage", pa.string()), ("prompt_tokens", pa.int64()),
                           ("completion_tokens", pa.int64())])
_READ_CHUNK = 8 * 2**20
# Ray's stages skip a row when `row.get("__inference_error__", "") != ""`, so a row whose marker is None
# counts as failed. Ray Data stores a block's rows as one Arrow struct when they convert (rows without
# images do; rows with PIL images fall back to pickled objects), and a key that only some rows carry is
# filled with None in the others: a request without the marker, in a block with a refused line, would be
# skipped by every stage. Every row therefore carries the marker, "" when it is fine.
NO_ERROR = ""


# ----------------------------------------------------------------------------------------------- read
def read_request_lines(batch: pa.Table, storage: StorageSection, max_line_bytes: int,
                       rows_per_block: int = 512) -> Iterator[pa.Table]:
    """map_batches generator over input files: each file's non-blank lines with their numbers.

    Read as bytes, in chunks (gzip and other compressions detected from the extension by pyarrow), so a
    line that is not UTF-8 or not JSON becomes an error line rather than failing the read. A line over
    `max_line_bytes` is kept cut to one byte over, enough for the size check to refuse it.
    """
    for uri in batch.column(URI).to_pylist():
        filesystem, path = make_filesystem(storage, uri)
        sources, numbers, texts = [], [], []
        with filesystem.open_input_stream(path, compression="detect") as stream:
            for number, text in _numbered_lines(stream, max_line_bytes + 1):
                sources.append(uri)
                numbers.append(number)
                texts.append(text)
                if len(texts) >= rows_per_block:
                    yield pa.table([sources, numbers, texts], schema=LINES_SCHEMA)
                    sources, numbers, texts = [], [], []
        if texts:
            yield pa.table([sources, numbers, texts], schema=LINES_SCHEMA)


def _numbered_lines(stream: Any, keep_bytes: int) -> Iterator[tuple[int, bytes]]:
    number, parts, size = 0, [], 0
    while True:
        chunk = stream.read(_READ_CHUNK)
        if not chunk:
            break
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            piece = chunk[start:] if end < 0 else chunk[start:end]
            if size < keep_bytes:
                parts.append(piece[: keep_bytes - size])
            size += len(piece)
            if end < 0:
                break
            number += 1
            line = b"".join(parts).rstrip(b"\r")
            if line.strip():
                yield number, line
            parts, size, start = [], 0, end + 1
    line = b"".join(parts).rstrip(b"\r")
    if line.strip():
        yield number + 1, line


def custom_ids(batch: pa.Table, max_line_bytes: int) -> pa.Table:
    """map_batches: each line's usable custom_id (or null), for finding duplicates before the run."""
    values = []
    for text in batch[TEXT].to_pylist():
        try:
            values.append(custom_id_of(read_envelope(text, max_line_bytes)))
        except LineError:
            values.append(None)
    return pa.table({CUSTOM_ID: pa.array(values, type=pa.string())})


def mark_lines(batch: pa.Table, written_ids: frozenset[str]) -> pa.Table:
    """map_batches after the read: drop the lines a resumed output already holds (their `id`, derived from
    file and line, is in `written_ids`), and give the others their row key (R.ROW_HASH), by which the
    engine's crash isolation (pipeline.stages.crash_isolation) counts a line's attempts."""
    ids = [LineIds.of(source, line).batch_request
           for source, line in zip(batch[SOURCE].to_pylist(), batch[LINE].to_pylist())]
    keep = [i not in written_ids for i in ids]
    hashes = pa.array([line_row_hash(i) for i, k in zip(ids, keep) if k], type=pa.uint64())
    return batch.filter(pa.array(keep, type=pa.bool_())).append_column(R.ROW_HASH, hashes)


# ------------------------------------------------------------------------------------------- prepare
class PrepareRequests:
    """Ray Data callable class (CPU pool): parse and check each line, then fetch, decode and resize its
    images with the same guarded Fetcher and limits as parquet records."""

    def __init__(self, config: PipelineConfig, target: ImageTarget, duplicate_ids: frozenset[str]):
        self.limits = RequestLimits.from_config(config)
        self.images = config.images
        self.target = target
        self.duplicate_ids = duplicate_ids
        self.fetcher = Fetcher(config.fetch, config.storage, max_bytes=config.images.max_bytes)

    def __call__(self, batch: pa.Table) -> pa.Table:
        started = time.perf_counter()
        columns: dict[str, list[Any]] = {name: [] for name in (CUSTOM_ID, CONVERSATION, SAMPLING, TOOL_TEMPLATE,
                                                                R.TOOL_REQUEST, IMAGES, LINE_ERROR)}
        for text in batch[TEXT].to_pylist():
            custom_id, request, images, error = None, None, None, None
            try:
                request = parse_request_line(text, self.limits, self.duplicate_ids)
                custom_id = request.custom_id
                images = [self.prepare_image(param, url) for param, url in request.images]
            except LineError as exc:
                error = exc
                custom_id = custom_id if custom_id is not None else _custom_id_or_none(text, self.limits)
            columns[CUSTOM_ID].append(custom_id)
            columns[LINE_ERROR].append(error.to_json() if error else None)
            ok = error is None and request is not None
            columns[CONVERSATION].append(json.dumps(request.conversation, ensure_ascii=False) if ok else None)
            columns[SAMPLING].append(json.dumps(request.sampling) if ok else None)
            columns[TOOL_TEMPLATE].append(request.tool_template if ok else None)
            columns[R.TOOL_REQUEST].append(request.tool_request.to_json() if ok and request.tool_request else None)
            columns[IMAGES].append(images if ok else None)
        types = {IMAGES: pa.list_(pa.large_binary()), TOOL_TEMPLATE: pa.bool_()}
        batch = batch.drop_columns([TEXT])
        for name, values in columns.items():
            batch = batch.append_column(name, pa.array(values, type=types.get(name, pa.large_string())))
        failed = sum(v is not None for v in columns[LINE_ERROR])
        logger.info("prepared %d request lines (%d refused) in %.2fs", batch.num_rows, failed,
                    time.perf_counter() - started)
        return batch

    def prepare_image(self, param: str, url: str) -> bytes:
        try:
            data = self.fetcher.fetch(url)
            return prepare_image(data, self.images, self.target).tobytes()
        except R.RecordError as exc:
            raise LineError(exc.kind.value, f"{param}: {exc.message}", param=param, stage=exc.stage) from None


def _custom_id_or_none(text: bytes, limits: RequestLimits) -> Optional[str]:
    try:
        return custom_id_of(read_envelope(text, limits.max_request_bytes))
    except LineError:
        return None


# ------------------------------------------------------------------------------------------ processor
class RequestBuilder:
    """Processor preprocess: the images as the `messages` Ray's multimodal stage reads, and the sampling
    parameters. Refused lines get Ray's error marker, so every stage lets them through."""

    def __init__(self, image_side_px: int):
        self.side = image_side_px

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        if row.get(LINE_ERROR):
            return {INFERENCE_ERROR: "refused before the engine", IMAGES: None}
        stored = row.get(IMAGES)
        images = [Image.frombuffer("RGB", (self.side, self.side), data, "raw", "RGB", 0, 1)
                  for data in (stored if stored is not None else [])]
        content: list[dict[str, Any]] = [{"type": "image_pil", "image_pil": image} for image in images]
        content.append({"type": "text", "text": ""})
        sampling = json.loads(row[SAMPLING])
        # The pixels now live in the PIL images; drop the bytes so later stages do not carry them twice.
        # The empty error marker is explicit: see `NO_ERROR`.
        return {"messages": [{"role": "user", "content": content}], "sampling_params": sampling, IMAGES: None,
                MAX_TOKENS: sampling["max_tokens"], INFERENCE_ERROR: NO_ERROR}


class LineBuilder:
    """Processor postprocess (and the fix-up of rows Ray passed through): any row -> one output line."""

    def __init__(self, model_name: str, stop_token_ids: frozenset[int]):
        self.model_name = model_name
        self.stop_token_ids = stop_token_ids

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        number = int(data[LINE])
        ids = LineIds.of(str(data[SOURCE]), number)
        custom_id = data.get(CUSTOM_ID)
        try:
            body, tokens = self.completion(ids, data)
        except LineError as error:
            return {LINE_COLUMN: json.dumps(error_line(ids, custom_id, error, number), ensure_ascii=False),
                    "custom_id": custom_id, "failed": True, "code": error.code, "stage": error.stage.value,
                    "prompt_tokens": None, "completion_tokens": None}
        return {LINE_COLUMN: json.dumps(success_line(ids, custom_id, body), ensure_ascii=False),
                "custom_id": custom_id, "failed": False, "code": None, "stage": None,
                "prompt_tokens": tokens[0], "completion_tokens": tokens[1]}

    def completion(self, ids: LineIds, data: dict[str, Any]) -> tuple[dict[str, Any], tuple[int, int]]:
        if data.get(LINE_ERROR):
            raise LineError.from_json(data[LINE_ERROR])
        if data.get(R.ROW_ERROR_KIND) == R.ErrorKind.POISON_RECORD.value:  # crash isolation (pipeline.stages.crash_isolation)
            raise LineError(R.ErrorKind.POISON_RECORD.value, str(data.get(R.ROW_ERROR) or "")[:2000], status=500,
                            type="server_error", stage=R.Stage.ENGINE)
        if data.get(INFERENCE_ERROR):
            raise engine_error(str(data[INFERENCE_ERROR]))
        if data.get("num_input_tokens") is None:
            # Never a fake success: a row that skipped the engine without saying why (see NO_ERROR).
            raise LineError("engine_error", "the request did not reach the engine", status=500, type="server_error",
                            stage=R.Stage.ENGINE)
        outcome = json.loads(data[R.TOOL_OUTCOME]) if data.get(R.TOOL_OUTCOME) else None
        if outcome is not None and outcome["error"]:
            raise invalid_tool_call(outcome["rounds"], outcome["error"])
        generated = data.get("generated_tokens")
        tokens = [int(t) for t in (generated if generated is not None else [])]
        reason = finish_reason(tokens, int(data[MAX_TOKENS]), self.stop_token_ids)
        content, calls = data.get("generated_text") or "", []
        if outcome is not None:
            content, calls = outcome["content"], outcome["tool_calls"]
            choice = ToolRequest.from_json(data[R.TOOL_REQUEST]).tool_choice
            reason = tool_finish_reason(choice, bool(calls), reason)
        prompt_tokens = int(data.get("num_input_tokens") or 0)
        completion_tokens = int(data.get("num_generated_tokens") or len(tokens))
        body = completion_body(ids, model=self.model_name, created=int(time.time()), content=content,
                               tool_calls=calls, finish_reason=reason, prompt_tokens=prompt_tokens,
                               completion_tokens=completion_tokens)
        return body, (prompt_tokens, completion_tokens)


class FinalizeLines:
    """Last map before the write: rows Ray passed through become lines; one explicit schema."""

    KEEP = frozenset({SOURCE, LINE, CUSTOM_ID, LINE_ERROR, INFERENCE_ERROR, R.TOOL_OUTCOME, R.TOOL_REQUEST,
                      R.ROW_ERROR, R.ROW_ERROR_KIND,
                      MAX_TOKENS, "generated_tokens", "generated_text", "num_input_tokens", "num_generated_tokens",
                      *OUTPUT_SCHEMA.names})

    def __init__(self, builder: LineBuilder):
        self.builder = builder

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.select([c for c in batch.column_names if c in self.KEEP]).to_pylist()
        lines = [row if row.get(LINE_COLUMN) is not None else self.builder(row) for row in rows]
        return pa.Table.from_pylist([{name: line.get(name) for name in OUTPUT_SCHEMA.names} for line in lines],
                                    schema=OUTPUT_SCHEMA)
