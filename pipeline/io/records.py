"""Record contract: input columns, output schema, and the errors a record can carry.

Input: `id` (string, unique), one of `image` (bytes) or `image_uri` (string), optional `prompt` and
`system`; other columns pass through. Output: exactly one row per input row, with the fields of
`OUTPUT_FIELDS` plus the passed-through columns. A bad record never raises out of a stage: it becomes
an output row whose `error` says what was wrong (`"<kind>: <message>"`), `error_kind` names the cause
in a word that can be counted, and `error_stage` the stage that found it.
"""
from __future__ import annotations

import enum
from typing import Any, Iterable, Optional

import pyarrow as pa

# Input columns.
ID = "id"
IMAGE = "image"
IMAGE_URI = "image_uri"
PROMPT = "prompt"
SYSTEM = "system"
# Optional, for tool calling: a JSON list of OpenAI tool definitions, and "auto" | "none" | "required" |
# a tool name.
TOOLS = "tools"
TOOL_CHOICE = "tool_choice"
INPUT_COLUMNS = (ID, IMAGE, IMAGE_URI, PROMPT, SYSTEM, TOOLS, TOOL_CHOICE)

# Output columns.
TEXT = "text"
FINISH_REASON = "finish_reason"
PROMPT_TOKENS = "prompt_tokens"
COMPLETION_TOKENS = "completion_tokens"
MODEL = "model"
ERROR = "error"
ERROR_KIND = "error_kind"
ERROR_STAGE = "error_stage"
# The position of the record in the input (file and row), so that a record without a usable id can
# still be found. Stable across reruns over the same input.
SOURCE = "source"
# The record's key for resume: Ray's `row_hash` (read_parquet(include_row_hash=True)), a uint64 hash of the
# input file's path and the row's position in it. Unlike `id` it exists for every row and is unique even
# where ids are missing or repeated, and Ray's reader makes it before anything else runs, which is where
# its checkpoint filter needs it (pipeline.batch.resume). Stable across reruns over the same input files; an
# input column of this name is replaced.
ROW_HASH = "row_hash"
# When the row left the engine (or, for a row that never reached it, when it was finalised), and the
# seconds its request spent in Ray's engine stage, from submission (its wait for an engine slot
# included) to the last token (Ray's `time_taken_llm`); null for rows the engine did not answer. They
# feed the run report's throughput-over-time and latency charts (pipeline/report/build.py).
FINISHED_AT = "finished_at"
ENGINE_LATENCY_S = "engine_latency_s"

OUTPUT_FIELDS = [
    pa.field(ID, pa.string()),
    pa.field(TEXT, pa.string()),
    pa.field(FINISH_REASON, pa.string()),
    pa.field(PROMPT_TOKENS, pa.int64()),
    pa.field(COMPLETION_TOKENS, pa.int64()),
    pa.field(MODEL, pa.string()),
    pa.field(ERROR, pa.string()),
    pa.field(ERROR_KIND, pa.string()),
    pa.field(ERROR_STAGE, pa.string()),
    pa.field(SOURCE, pa.string()),
    pa.field(ROW_HASH, pa.uint64()),
    pa.field(FINISHED_AT, pa.timestamp("ms", tz="UTC")),
    pa.field(ENGINE_LATENCY_S, pa.float64()),
]
# Written only by jobs that offer tools (config tools.builtins, or an input `tools` column); null on rows
# without tools. Both hold JSON: the calls of the model's last turn that the pipeline did not run, as
# [{"name", "arguments"}], and the whole conversation in OpenAI message format.
TOOL_CALLS = "tool_calls"
TRANSCRIPT = "transcript"
TOOL_FIELDS = [pa.field(TOOL_CALLS, pa.string()), pa.field(TRANSCRIPT, pa.string())]
OUTPUT_NAMES = frozenset(f.name for f in OUTPUT_FIELDS + TOOL_FIELDS)
# A small JPEG of the image as the model saw it, for the run report's gallery; null on all but a sample.
# Storage: a thumbnail on every row would add ~4 KB x rows (4 GB for a million-row job) that nobody
# looks at, so the prepare stage makes one only for rows whose seeded hash of `row_hash` is among the
# smallest it has seen (pipeline/report/gallery.py): a few hundred thumbnails per CPU worker whatever the job's
# size, which always include the report's sample; all other rows hold a null, which parquet stores as
# one bit. It travels from the prepare stage to the writer as a pass-through value, which is why it is
# not in OUTPUT_NAMES; an input column of this name is replaced, never passed through, so a record
# cannot put its own picture into the report.
THUMBNAIL = "thumbnail"
THUMBNAIL_FIELD = pa.field(THUMBNAIL, pa.binary())

# Working columns carried between our stages (never written).
PIXELS = "_pixels"          # raw RGB bytes of the prepared image
PIXELS_SIZE = "_pixels_size"  # [width, height]
ROW_ERROR = "_error"
ROW_ERROR_KIND = "_error_kind"
ROW_ERROR_STAGE = "_error_stage"
IMAGE_INFO = "_image_info"      # JSON: the original image's size, format and EXIF (image_metadata tool)
TOOL_REQUEST = "_tool_request"  # JSON: the tools and tool choice of this record (pipeline.tools.request)
TOOL_OUTCOME = "_tool_outcome"  # JSON: the record's tool chain, from the engine stage (pipeline.tools.chain)


class Stage(str, enum.Enum):
    VALIDATE = "validate"
    FETCH = "fetch"
    IMAGE = "image"
    ENGINE = "engine"
    TOOLS = "tools"


class ErrorKind(str, enum.Enum):
    MISSING_ID = "missing_id"
    DUPLICATE_ID = "duplicate_id"
    MISSING_IMAGE = "missing_image"
    INVALID_RECORD = "invalid_record"
    EMPTY_IMAGE = "empty_image"
    IMAGE_TOO_LARGE = "image_too_large"          # encoded bytes over images.max_bytes
    TOO_MANY_PIXELS = "too_many_pixels"          # decoded size over images.max_pixels
    NOT_AN_IMAGE = "not_an_image"                # bytes Pillow does not recognise
    UNSUPPORTED_FORMAT = "unsupported_format"    # an image, but not an allowed format
    CORRUPT_IMAGE = "corrupt_image"              # truncated or damaged image data
    URI_NOT_ALLOWED = "uri_not_allowed"          # scheme, local path or address refused by policy
    NOT_FOUND = "not_found"                      # the URI names nothing (404, NoSuchKey, ENOENT)
    UNREACHABLE = "unreachable"                  # DNS failure, refused connection, timeout, 5xx
    ENGINE_ERROR = "engine_error"                # the engine refused or failed this request
    POISON_RECORD = "poison_record"              # the engine crashed on each of its batch.max_engine_attempts
    INVALID_TOOLS = "invalid_tools"              # the record's tools or tool_choice cannot be used
    INVALID_TOOL_CALL = "invalid_tool_call"      # the model's call is unreadable, unknown or mistyped


class RecordError(Exception):
    """A problem with one record. Raised inside a stage, caught there, and written as an error row."""

    def __init__(self, kind: ErrorKind, message: str, stage: Stage):
        super().__init__(message)
        self.kind = kind
        self.stage = stage
        self.message = message

    def as_columns(self) -> dict[str, str]:
        return {
            ROW_ERROR: f"{self.kind.value}: {self.message}",
            ROW_ERROR_KIND: self.kind.value,
            ROW_ERROR_STAGE: self.stage.value,
        }


def output_schema(input_schema: pa.Schema, passthrough: Optional[Iterable[str]] = None,
                  tools: bool = False) -> pa.Schema:
    """The output schema: our fields (with the tool fields when `tools`), then the passed-through input
    columns with their own types.

    Passed-through columns keep their input types so that a reader of the input can read the output
    the same way. `image` bytes never pass through: writing every image back would double storage.
    """
    names = list(passthrough) if passthrough is not None else [
        n for n in input_schema.names if n not in (ID, IMAGE)
    ]
    fields = list(OUTPUT_FIELDS) + [THUMBNAIL_FIELD] + (list(TOOL_FIELDS) if tools else [])
    for name in names:
        if name in OUTPUT_NAMES or name in (IMAGE, THUMBNAIL) or name.startswith("_"):
            continue
        if name not in input_schema.names:
            raise ValueError(f"batch.passthrough_columns names {name!r}, which the input does not have")
        fields.append(input_schema.field(name))
    return pa.schema(fields)


def check_input_schema(schema: pa.Schema) -> list[str]:
    """Problems that doom the whole input (not single rows): missing or mistyped contract columns."""
    problems = []
    if ID not in schema.names:
        problems.append(f"input has no {ID!r} column (columns: {', '.join(schema.names)})")
    if IMAGE not in schema.names and IMAGE_URI not in schema.names:
        problems.append(f"input has neither an {IMAGE!r} (binary) nor an {IMAGE_URI!r} (string) column")
    expected = {IMAGE: (pa.types.is_binary, pa.types.is_large_binary),
                IMAGE_URI: (pa.types.is_string, pa.types.is_large_string),
                PROMPT: (pa.types.is_string, pa.types.is_large_string),
                SYSTEM: (pa.types.is_string, pa.types.is_large_string),
                TOOLS: (pa.types.is_string, pa.types.is_large_string),
                TOOL_CHOICE: (pa.types.is_string, pa.types.is_large_string)}
    for name, checks in expected.items():
        if name in schema.names and not any(check(schema.field(name).type) for check in checks) \
                and not pa.types.is_null(schema.field(name).type):
            problems.append(f"column {name!r} has type {schema.field(name).type}, expected "
                            f"{'binary' if name == IMAGE else 'string'}")
    return problems


def validate_record(row: dict[str, Any], duplicate_ids: frozenset[str]) -> None:
    """Check one record's contract fields; raise RecordError naming the first problem."""
    record_id = row.get(ID)
    if record_id is None or (isinstance(record_id, str) and not record_id.strip()):
        raise RecordError(ErrorKind.MISSING_ID, "record has no id", Stage.VALIDATE)
    if record_id in duplicate_ids:
        raise RecordError(ErrorKind.DUPLICATE_ID,
                          f"id {record_id!r} appears more than once in the input; every occurrence is "
                          "refused, since which one is meant cannot be told", Stage.VALIDATE)
    image, uri = row.get(IMAGE), row.get(IMAGE_URI)
    if image is not None and uri is not None:
        raise RecordError(ErrorKind.INVALID_RECORD,
                          f"record has both {IMAGE!r} and {IMAGE_URI!r}; give exactly one", Stage.VALIDATE)
    if image is None and (uri is None or not str(uri).strip()):
        raise RecordError(ErrorKind.MISSING_IMAGE, f"record has neither {IMAGE!r} nor {IMAGE_URI!r}",
                          Stage.VALIDATE)
    for name in (PROMPT, SYSTEM, TOOLS, TOOL_CHOICE):
        value = row.get(name)
        if value is not None and not isinstance(value, str):
            raise RecordError(ErrorKind.INVALID_RECORD, f"{name!r} must be a string", Stage.VALIDATE)
