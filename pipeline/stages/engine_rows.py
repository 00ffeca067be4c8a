"""The two ends of the `ray.data.llm` processor: record -> chat request, engine output -> output row.

Rows that failed before the engine carry Ray's `__inference_error__` marker from `RequestBuilder` on:
Ray's stages let such rows through untouched and its postprocess wrapper returns them as they are, so
`OutputBuilder` turns both kinds (engine outputs, and rows that never reached the engine) into rows of
the one output schema.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, Iterable, Optional

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline.io import records as R
from pipeline.config import PipelineConfig
from pipeline.tools.builtins import builtin_definitions
from pipeline.tools.request import ToolRequestError, build_tool_request

# Ray's per-row error marker (ray.llm._internal.batch.stages.base); a non-empty value makes every
# later stage of the processor skip the row.
INFERENCE_ERROR = "__inference_error__"
# Ray's stages write their own keys into the row (`prompt` becomes the rendered chat template,
# `messages`, `metrics`, `params`...), so a user column of the same name would be overwritten. The
# pass-through values travel under this one key instead, which no Ray stage uses.
PASSTHROUGH = "_passthrough"


class RequestBuilder:
    """Processor preprocess: a prepared record -> OpenAI-style messages and sampling parameters.

    In a job with tools (the output schema has the tool columns) it also resolves the record's tools
    and tool choice into R.TOOL_REQUEST, or makes the record an `invalid_tools` error row.
    """

    def __init__(self, config: PipelineConfig, image_side_px: int, schema: pa.Schema):
        self.default_prompt = config.batch.default_prompt
        self.default_system = config.batch.default_system
        self.sampling = config.sampling.to_vllm()
        self.image_side_px = image_side_px
        self.passthrough = [n for n in schema.names if n not in R.OUTPUT_NAMES]
        self.tools_enabled = R.TOOL_CALLS in schema.names
        self.builtin_tools = builtin_definitions(config.tools)
        self.default_tool_choice = config.tools.tool_choice

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        prompt = row.get(R.PROMPT) or self.default_prompt
        kept = {name: row.get(name) for name in self.passthrough}
        if R.PROMPT in kept:
            kept[R.PROMPT] = prompt
        if row.get(R.ROW_ERROR):
            return {INFERENCE_ERROR: row[R.ROW_ERROR], PASSTHROUGH: kept}
        tools: dict[str, Any] = {}
        if self.tools_enabled:
            try:
                request = build_tool_request(row.get(R.TOOLS), row.get(R.TOOL_CHOICE), self.builtin_tools,
                                             self.default_tool_choice)
            except ToolRequestError as exc:
                error = R.RecordError(R.ErrorKind.INVALID_TOOLS, str(exc), R.Stage.VALIDATE).as_columns()
                return {INFERENCE_ERROR: error[R.ROW_ERROR], **error, R.PIXELS: None, PASSTHROUGH: kept}
            tools[R.TOOL_REQUEST] = request.to_json() if request is not None else None
        side = self.image_side_px
        image = Image.frombuffer("RGB", (side, side), row[R.PIXELS], "raw", "RGB", 0, 1)
        messages = chat_messages(image, prompt, row.get(R.SYSTEM) or self.default_system)
        # The pixels now live in the PIL image; drop the bytes so later stages do not carry them twice.
        return {"messages": messages, "sampling_params": dict(self.sampling), R.PIXELS: None, PASSTHROUGH: kept,
                **tools}


def chat_messages(image: Image.Image, prompt: str, system: Optional[str]) -> list[dict[str, Any]]:
    """One record's chat: an optional system turn, then the image and the prompt in one user turn."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": [
        {"type": "image_pil", "image_pil": image},
        {"type": "text", "text": prompt},
    ]})
    return messages


class OutputBuilder:
    """Processor postprocess (and the fix-up of rows Ray passed through): any row -> an output row."""

    def __init__(self, config: PipelineConfig, schema: pa.Schema, stop_token_ids: Iterable[int]):
        self.model_name = config.model.served_name
        self.max_tokens = config.sampling.max_tokens
        self.stop_token_ids = frozenset(stop_token_ids)
        self.schema = schema
        self.passthrough = [n for n in schema.names if n not in R.OUTPUT_NAMES]
        self.tools_enabled = R.TOOL_CALLS in schema.names

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        kept = data.get(PASSTHROUGH) or {}
        row = {name: kept.get(name) for name in self.passthrough}
        row.update({R.ID: _as_id(data.get(R.ID)), R.SOURCE: data.get(R.SOURCE),
                    R.ROW_HASH: _as_row_hash(data.get(R.ROW_HASH)), R.MODEL: self.model_name,
                    R.TEXT: None, R.FINISH_REASON: None, R.PROMPT_TOKENS: None, R.COMPLETION_TOKENS: None,
                    R.ERROR: None, R.ERROR_KIND: None, R.ERROR_STAGE: None,
                    R.FINISHED_AT: datetime.now(timezone.utc), R.ENGINE_LATENCY_S: None})
        outcome = json.loads(data[R.TOOL_OUTCOME]) if data.get(R.TOOL_OUTCOME) else None
        if self.tools_enabled:
            row.update({R.TOOL_CALLS: None,
                        R.TRANSCRIPT: json.dumps(outcome["messages"], ensure_ascii=False) if outcome else None})
        if data.get(R.ROW_ERROR):
            row.update({R.ERROR: data[R.ROW_ERROR], R.ERROR_KIND: data.get(R.ROW_ERROR_KIND),
                        R.ERROR_STAGE: data.get(R.ROW_ERROR_STAGE)})
        elif data.get(INFERENCE_ERROR):
            row.update({R.ERROR: f"{R.ErrorKind.ENGINE_ERROR.value}: {data[INFERENCE_ERROR]}"[:2000],
                        R.ERROR_KIND: R.ErrorKind.ENGINE_ERROR.value, R.ERROR_STAGE: R.Stage.ENGINE.value})
        elif outcome is not None and outcome["error"]:
            kind = R.ErrorKind.INVALID_TOOL_CALL.value
            row.update({R.ERROR: f"{kind}: round {outcome['rounds']}: {outcome['error']}"[:2000],
                        R.ERROR_KIND: kind, R.ERROR_STAGE: R.Stage.TOOLS.value})
        else:
            tokens = list(data.get("generated_tokens") or [])
            row.update({R.TEXT: data.get("generated_text", ""),
                        R.PROMPT_TOKENS: data.get("num_input_tokens"),
                        R.COMPLETION_TOKENS: data.get("num_generated_tokens", len(tokens)),
                        R.FINISH_REASON: self.finish_reason(tokens),
                        R.ENGINE_LATENCY_S: _latency_s(data.get("time_taken_llm"))})
            if outcome is not None:
                # The text around the calls (None when the turn was only calls), as the endpoint's
                # message.content; the finish reason of a turn that ends in calls, as OpenAI's.
                row.update({R.TEXT: outcome["content"],
                            R.TOOL_CALLS: json.dumps(outcome["tool_calls"], ensure_ascii=False)})
                if outcome["tool_calls"]:
                    row[R.FINISH_REASON] = "tool_calls"
        return row

    def finish_reason(self, tokens: list[int]) -> str:
        """OpenAI's finish_reason, derived from the tokens.

        Ray's engine stage keeps vLLM's generated tokens but not its finish_reason: a sequence that ends
        on a stop token, or before max_tokens (a stop string), stopped; one that reached max_tokens
        without a stop token was cut at the length limit.
        """
        return finish_reason(tokens, self.max_tokens, self.stop_token_ids)


def finish_reason(tokens: list[int], max_tokens: int, stop_token_ids: frozenset[int]) -> str:
    """OpenAI's finish_reason from the generated tokens, for both batch formats (see OutputBuilder's)."""
    if tokens and tokens[-1] in stop_token_ids:
        return "stop"
    return "length" if len(tokens) >= max_tokens else "stop"


class FinalizeRows:
    """Last map before the write: rows Ray passed through become output rows; one explicit schema."""

    def __init__(self, builder: OutputBuilder):
        self.builder = builder
        self.keep = set(builder.schema.names) | {
            INFERENCE_ERROR, PASSTHROUGH, R.ROW_ERROR, R.ROW_ERROR_KIND, R.ROW_ERROR_STAGE, R.TOOL_OUTCOME}

    def __call__(self, batch: pa.Table) -> pa.Table:
        columns = [c for c in batch.column_names if c in self.keep]
        rows = batch.select(columns).to_pylist()
        finished = [self.builder(row) if row.get(INFERENCE_ERROR) else row for row in rows]
        return pa.Table.from_pylist(finished, schema=self.builder.schema)


def _latency_s(value: Any) -> Optional[float]:
    """Ray's `time_taken_llm` in seconds; it writes -1 for a request the engine failed."""
    return float(value) if isinstance(value, (int, float)) and value >= 0 else None


def _as_id(value: Any) -> Optional[str]:
    return None if value is None else str(value)


def _as_row_hash(value: Any) -> Optional[np.uint64]:
    """A numpy uint64: half of all hashes exceed int64, and Ray infers int64 from Python ints (then falls
    back to pickling the whole column)."""
    return None if value is None else np.uint64(value)
