"""vLLM general plugin (entry point `vllm.general_plugins`): registers our model variants by name, and
applies our one vLLM patch (`pipeline.vllm_patches`: image ranges computed once per request). With
PIPELINE_STACK_SAMPLES set, it also starts the host-time sampler (`pipeline.stack_sampler`) in the process.

vLLM calls `register()` in every process it starts (front-end, engine core, workers), so a variant chosen
through `hf_overrides={"architectures": [...]}` resolves everywhere. Registration is lazy (a
"module:Class" string): nothing of vLLM's model code is imported until a variant is actually used.
"""

GEMMA3_FAST_IMAGES = "Gemma3FastImagesForConditionalGeneration"


def register() -> None:
    from vllm import ModelRegistry

    from pipeline.vllm_patches import cache_embeds_ranges

    from pipeline.stack_sampler import start_from_env

    cache_embeds_ranges()
    start_from_env()

    if GEMMA3_FAST_IMAGES not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(GEMMA3_FAST_IMAGES, f"pipeline.vllm_gemma3:{GEMMA3_FAST_IMAGES}")
