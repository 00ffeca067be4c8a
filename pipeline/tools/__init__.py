"""Tool calling for Gemma 3, in batch and online.

Modules: `parser` (find, read and check the pythonic calls in a model turn), `request` (a record's or
request's tools and tool choice; forced calls as vLLM forces them), `registry` and `builtins` (the tools
the pipeline runs: exact arithmetic, table lookup, image metadata), `chain` (the rounds of one record),
`template` (the packaged Gemma 3 tool chat template), `ray_stages` (the batch processor's tool UDFs) and
`vllm_plugin` (the `gemma3` vLLM tool parser for the endpoint). Only this package's root is imported by
vLLM's plugin loader; it stays light.
"""
from __future__ import annotations

VLLM_PARSER_NAME = "gemma3"
VLLM_PARSER_MODULE = "pipeline.tools.vllm_plugin"


def register_vllm_tool_parser() -> None:
    """vLLM `general_plugins` entry point: make the `gemma3` tool parser known in this process.

    Lazy: the parser module is imported only when a server first asks for the parser by name.
    """
    from vllm.tool_parsers.abstract_tool_parser import ToolParserManager

    ToolParserManager.register_lazy_module(VLLM_PARSER_NAME, VLLM_PARSER_MODULE, "Gemma3ToolParser")
