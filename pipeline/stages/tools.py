"""Tools in Ray's batch LLM processor: per-record tools in the chat template, rounds in the engine stage.

Ray 2.60's `ray.data.llm` has no tool support (ray-project/ray#58091): its chat-template stage takes one
set of template kwargs for the whole dataset, and its engine stage makes one generation per row. Both are
extended here, and only here, by subclassing their UDFs; `stage_overrides` installs them through
`build_processor(..., builder_kwargs={"override_stage_config_fn": ...})`. Rows without tools go through
the parent classes' code unchanged. Remove when ray.data.llm supports per-row tools and multi-turn
generation (watch #58091). Outside `pipeline.tools` so that package (the tool logic itself) needs no Ray.

Why rounds loop inside the engine stage: a Ray Data pipeline is a DAG, so N rounds as N chained
processors would mean N engine actor pools, each holding its GPUs (N x TP GPUs for a 12B model) while
mostly waiting on the others. Looping inside the one engine replica keeps one pool; the record's image
(already decoded in `multimodal_data`) is reused, and the prefix cache makes each later prefill cheap
since the conversation only grows. The cost: a record with tools holds its slot in the replica for all
its rounds, tools run in the replica's process (in threads, bounded by tools.tool_timeout_s), and
rendering + tokenizing later rounds happens there too (milliseconds per round).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Optional

from ray.llm._internal.batch.stages.base import StatefulStage
from ray.llm._internal.batch.stages.chat_template_stage import ChatTemplateStage, ChatTemplateUDF
from ray.llm._internal.batch.stages.vllm_engine_stage import vLLMEngineStage, vLLMEngineStageUDF

from pipeline.io import records as R
from pipeline.config import PipelineConfig
from pipeline.stages.rendered_prompts import encode_rendered
from pipeline.stages.patch import replace_stage_udf
from pipeline.tools.builtins import build_registry
from pipeline.tools.chain import Generation, run_tool_chain
from pipeline.tools.registry import ToolContext
from pipeline.tools.request import ToolRequest
from pipeline.tools.template import render_prompt

logger = logging.getLogger(__name__)

# Row keys the engine stage reads besides the prompt; carried into every round of a record.
_MULTIMODAL_KEYS = ("multimodal_data", "multimodal_uuids", "mm_processor_kwargs")


@dataclass(frozen=True)
class ToolChainSettings:
    config: PipelineConfig   # tools (registry, rounds, timeouts) and storage (lookup tables)
    template: str            # the tool chat template's text


def stage_overrides(settings: ToolChainSettings) -> Callable[[str, StatefulStage], None]:
    """An `override_stage_config_fn` for Ray's ProcessorBuilder that installs the tool UDFs."""

    def override(name: str, stage: StatefulStage) -> None:
        if isinstance(stage, ChatTemplateStage):
            replace_stage_udf(stage, ToolChatTemplateUDF, tool_chat_template=settings.template)
        elif isinstance(stage, vLLMEngineStage):
            replace_stage_udf(stage, ToolChainEngineUDF, tool_chain=settings)

    return override


def structured_outputs(request: ToolRequest) -> Optional[dict[str, Any]]:
    """vLLM structured_outputs forcing the call, exactly as vLLM's server derives it; None unless forced.

    Uses vLLM's own `get_json_schema_from_tools` (the schema of the forced tool's parameters, or the
    array of {"name", "parameters"} for 'required'), passed as a JSON string: Ray Data carries strings
    between stages, while nested schemas of different shapes per row would not fit one Arrow type.
    """
    if request.tool_choice in ("auto", "none"):
        return None
    from vllm.entrypoints.openai.chat_completion.protocol import (
        ChatCompletionNamedToolChoiceParam,
        ChatCompletionToolsParam,
    )
    from vllm.tool_parsers.utils import get_json_schema_from_tools

    tools = [ChatCompletionToolsParam.model_validate(t) for t in request.tools]
    choice = request.tool_choice if isinstance(request.tool_choice, str) else \
        ChatCompletionNamedToolChoiceParam.model_validate(request.tool_choice)
    schema = get_json_schema_from_tools(tool_choice=choice, tools=tools)
    if schema is None:  # a forced tool without parameters: its arguments are an empty object
        schema = {"type": "object", "properties": {}}
    return {"json": json.dumps(schema, ensure_ascii=False)}


class ToolChatTemplateUDF(ChatTemplateUDF):
    """Ray's chat-template stage, plus: a row with tools is rendered with them, by the tool template."""

    def __init__(self, *args: Any, tool_chat_template: str, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.tool_chat_template = tool_chat_template

    async def udf(self, batch: list[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
        plain = [row for row in batch if not row.get(R.TOOL_REQUEST)]
        if plain:
            async for output in super().udf(plain):
                yield output
        for row in batch:
            request = ToolRequest.from_json(row.get(R.TOOL_REQUEST))
            if request is None:
                continue
            prompt = render_prompt(self.processor, self.tool_chat_template, _as_list(row["messages"]),
                                   request.tools, **(self.chat_template_kwargs or {}))
            yield {self.IDX_IN_BATCH_COLUMN: row[self.IDX_IN_BATCH_COLUMN], "prompt": prompt}


class ToolChainEngineUDF(vLLMEngineStageUDF):
    """Ray's vLLM engine stage, plus: a row with tools runs its tool chain (pipeline.tools.chain).

    Each round is one call of the parent's per-row generation (its error handling, semaphore and
    fatal-error exit included). The row's output is the last round's, with token counts summed over
    the rounds and the chain's outcome under R.TOOL_OUTCOME.
    """

    def __init__(self, *args: Any, tool_chain: ToolChainSettings, **kwargs: Any):
        super().__init__(*args, **kwargs)
        from ray.llm._internal.common.utils.download_utils import NodeModelDownloadable, download_model_files
        from transformers import AutoProcessor

        self.tool_chain = tool_chain
        self.registry = build_registry(tool_chain.config)
        model_path = download_model_files(model_id=self.model, mirror_config=None,
                                          download_model=NodeModelDownloadable.TOKENIZER_ONLY,
                                          download_extra_files=False)
        self.processor = AutoProcessor.from_pretrained(model_path)

    async def _generate_with_error_handling(self, row: dict[str, Any], batch_uuid: Any) -> dict[str, Any]:
        request = ToolRequest.from_json(row.get(R.TOOL_REQUEST))
        if request is None:
            return await super()._generate_with_error_handling(row, batch_uuid)
        generate_once = super()._generate_with_error_handling
        index = row[self.IDX_IN_BATCH_COLUMN]
        carried = {key: row[key] for key in _MULTIMODAL_KEYS if row.get(key) is not None}
        sampling = dict(row["sampling_params"])
        first_prompt = {key: row[key] for key in ("prompt", "tokenized_prompt") if row.get(key) is not None}

        async def generate(round_index: int, messages: list[dict[str, Any]], current: ToolRequest) -> Generation:
            structured = structured_outputs(current)
            if round_index == 0:
                prompt = first_prompt
            else:
                text = render_prompt(self.processor, self.tool_chain.template, messages, request.tools)
                prompt = {"prompt": text, "tokenized_prompt": encode_rendered(self.processor.tokenizer, [text])[0]}
            params = {**sampling, **({"structured_outputs": structured} if structured else {})}
            output = await generate_once({self.IDX_IN_BATCH_COLUMN: index, **carried, **prompt,
                                          "sampling_params": params}, batch_uuid)
            return Generation(text=output.get("generated_text") or "",
                              prompt_tokens=output.get("num_input_tokens") or 0,
                              completion_tokens=output.get("num_generated_tokens") or 0,
                              error=output.get("__inference_error__") or None, raw=output)

        info = row.get(R.IMAGE_INFO)
        context = ToolContext(record_id=row.get(R.ID), image_info=json.loads(info) if info else None)
        tools = self.tool_chain.config.tools
        outcome = await run_tool_chain(_as_list(row["messages"]), request, self.registry, context, generate,
                                       max_rounds=tools.max_rounds, tool_timeout_s=tools.tool_timeout_s)
        result = dict(outcome.last.raw)
        result.update({"num_input_tokens": outcome.prompt_tokens, "num_generated_tokens": outcome.completion_tokens,
                       R.TOOL_OUTCOME: outcome.to_json()})
        return result


def _as_list(messages: Any) -> list[dict[str, Any]]:
    """Plain lists and dicts: Ray Data hands nested values back as numpy arrays when Arrow held them."""
    return _plain(messages)


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value
