"""vLLM general plugins (entry points `vllm.general_plugins`): `register` registers our model variants by
name, and applies our one vLLM patch (`pipeline.engine.patches`: image ranges computed once per request). With
PIPELINE_STACK_SAMPLES set, it also starts the host-time sampler (`pipeline.engine.stack_sampler`) in the process.

vLLM calls `register()` in every process it starts (front-end, engine core, workers), so a variant chosen
through `hf_overrides={"architectures": [...]}` resolves everywhere. Registration is lazy (a
"module:Class" string): nothing of vLLM's model code is imported until a variant is actually used.

`register_tool_parser` makes the `gemma3` tool parser (pipeline.engine.tool_parser) known the same lazy way.
"""

GEMMA3_FAST_IMAGES = "Gemma3FastImagesForConditionalGeneration"
TOOL_PARSER_NAME = "gemma3"
TOOL_PARSER_MODULE = "pipeline.engine.tool_parser"


def register() -> None:
    from vllm import ModelRegistry

    from pipeline.engine.patches import cache_embeds_ranges

    from pipeline.engine.stack_sampler import start_from_env

    cache_embeds_ranges()
    start_from_env()

    if GEMMA3_FAST_IMAGES not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(GEMMA3_FAST_IMAGES, f"pipeline.engine.gemma3:{GEMMA3_FAST_IMAGES}")


def register_tool_parser() -> None:
    """Make the `gemma3` tool parser known in this process; its module is imported only when a server
    first asks for the parser by name."""
    from vllm.tool_parsers.abstract_tool_parser import ToolParserManager

    ToolParserManager.register_lazy_module(TOOL_PARSER_NAME, TOOL_PARSER_MODULE, "Gemma3ToolParser")
