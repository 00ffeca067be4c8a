"""The processor stages an OpenAI Batch job swaps in: each request's own conversation in the chat template.

Ray's chat-template stage renders the `messages` column, one template for the whole dataset, and a
template error fails the whole batch. Requests from a file need their own conversation rendered exactly
(see pipeline.stages.openai_batch on why it travels as JSON), with the tool template when they have tools
or tool turns, and a conversation the template refuses (roles that do not alternate, a system message
that is not first) must become that request's error line. `stage_overrides` installs the UDF below, and
pipeline.tools' engine UDF, through `build_processor(..., builder_kwargs={"override_stage_config_fn": ...})`.
Imported only where the processor is built (it loads Ray's LLM stages).
"""
from __future__ import annotations

import json
from typing import Any, AsyncIterator, Callable

from jinja2 import TemplateError
from ray.llm._internal.batch.stages.base import StatefulStage
from ray.llm._internal.batch.stages.chat_template_stage import ChatTemplateStage, ChatTemplateUDF

from pipeline.io import records as R
from pipeline.config import PipelineConfig
from pipeline.stages.engine_rows import INFERENCE_ERROR
from pipeline.openai.batch_requests import LineError
from pipeline.stages.openai_batch import CONVERSATION, LINE_ERROR, NO_ERROR, TOOL_TEMPLATE
from pipeline.stages.rendered_prompts import install as install_rendered_prompts
from pipeline.stages.patch import replace_stage_udf
from pipeline.stages.tools import ToolChainSettings
from pipeline.stages.tools import stage_overrides as tool_stage_overrides
from pipeline.tools.request import ToolRequest
from pipeline.tools.template import load_tool_template, render_prompt


class OpenAIChatTemplateUDF(ChatTemplateUDF):
    """Ray's chat-template stage, rendering `_conversation` per request; refusals become error lines."""

    def __init__(self, *args: Any, tool_chat_template: str, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.tool_chat_template = tool_chat_template

    async def udf(self, batch: list[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
        for row in batch:
            index = row[self.IDX_IN_BATCH_COLUMN]
            request = ToolRequest.from_json(row.get(R.TOOL_REQUEST))
            template = self.tool_chat_template if row.get(TOOL_TEMPLATE) else self.chat_template
            try:
                prompt = render_prompt(self.processor, template, json.loads(row[CONVERSATION]),
                                       request.tools if request else None, **(self.chat_template_kwargs or {}))
            except TemplateError as exc:  # the template's raise_exception(...)
                error = LineError("invalid_messages", f"the chat template refused the conversation: {exc}",
                                  param="messages")
                yield {self.IDX_IN_BATCH_COLUMN: index, "prompt": "", INFERENCE_ERROR: error.message,
                       LINE_ERROR: error.to_json()}
                continue
            yield {self.IDX_IN_BATCH_COLUMN: index, "prompt": prompt, INFERENCE_ERROR: NO_ERROR, LINE_ERROR: None}


def stage_overrides(config: PipelineConfig) -> Callable[[str, StatefulStage], None]:
    """An `override_stage_config_fn`: our chat-template UDF, prompts tokenized once
    (pipeline.stages.rendered_prompts), and the tool chain's engine UDF.

    Requests bring their own tools; the pipeline's built-ins and extra rounds are for parquet records, so
    the tool chain runs with neither and returns the calls, as the OpenAI API does.
    """
    template = load_tool_template(config.tools)
    tools = config.tools.model_copy(update={"builtins": [], "tables": {}, "max_rounds": 1})
    engine_override = tool_stage_overrides(
        ToolChainSettings(config=config.model_copy(update={"tools": tools}), template=template))

    def override(name: str, stage: StatefulStage) -> None:
        install_rendered_prompts(stage)
        if isinstance(stage, ChatTemplateStage):
            replace_stage_udf(stage, OpenAIChatTemplateUDF, tool_chat_template=template)
        else:
            engine_override(name, stage)

    return override
