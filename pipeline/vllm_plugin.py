"""vLLM general plugin (entry point `vllm.general_plugins`): registers our model variants by name, and
applies our one vLLM patch (`pipeline.vllm_patches`: image ranges computed once per request).

vLLM calls `register()` in every process it starts (front-end, engine core, workers), so a variant chosen
through `hf_overrides={"architectures": [...]}` resolves everywhere. Registration is lazy (a
"module:Class" string): nothing of vLLM's model code is imported until a variant is actually used.
"""

GEMMA3_FAST_IMAGES = "Gemma3FastImagesForConditionalGeneration"


def register() -> None:
    from vllm import ModelRegistry

    from pipeline.vllm_patches import cache_embeds_ranges

    cache_embeds_ranges()

    if GEMMA3_FAST_IMAGES not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(GEMMA3_FAST_IMAGES, f"pipeline.vllm_gemma3:{GEMMA3_FAST_IMAGES}")
