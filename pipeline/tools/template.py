"""The Gemma 3 tool-calling chat template shipped with the package, and rendering with it.

One template serves batch and online: the batch job renders records with tools through it (first round
in Ray's chat-template stage, later rounds inside the engine replica), and the endpoint is given the same
file as its chat template. Without tools it renders exactly what Gemma 3's own template renders.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from pipeline.config import ToolsSection

PACKAGED_TEMPLATE = Path(__file__).resolve().parent.parent / "templates" / "gemma3_tools.jinja"


def tool_template_path(tools: Optional[ToolsSection] = None) -> Path:
    """The configured template (tools.chat_template), else the packaged gemma3_tools.jinja."""
    return Path(tools.chat_template) if tools is not None and tools.chat_template else PACKAGED_TEMPLATE


def load_tool_template(tools: Optional[ToolsSection] = None) -> str:
    return tool_template_path(tools).read_text()


def render_prompt(processor: Any, template: str, messages: Sequence[Mapping[str, Any]],
                  tools: Optional[Sequence[Mapping[str, Any]]], **template_kwargs: Any) -> str:
    """The prompt text of a conversation that the model continues (a model turn is opened).

    `processor` is the checkpoint's Hugging Face processor or tokenizer (its apply_chat_template), as
    in Ray's chat-template stage and vLLM's server, so bos and special tokens come from the checkpoint.
    """
    return processor.apply_chat_template(list(messages), tokenize=False, chat_template=template,
                                         add_generation_prompt=True, tools=list(tools) if tools else None,
                                         **template_kwargs)
