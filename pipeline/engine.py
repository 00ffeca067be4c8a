"""The one mapping from PipelineConfig to vLLM engine arguments and Ray placement.

Batch (`ray.data.llm`) and online (`ray.serve.llm`) both call `engine_kwargs` and `placement_group`,
so context length, quantization, image limits and parallelism cannot drift apart between them.
"""
from __future__ import annotations

from typing import Any

from .config import PipelineConfig
from .vllm_plugin import GEMMA3_FAST_IMAGES

GEMMA3_ARCHITECTURE = "Gemma3ForConditionalGeneration"


def engine_kwargs(config: PipelineConfig) -> dict[str, Any]:
    """vLLM engine arguments, all set explicitly: Ray's batch defaults are small (NOTES §6)."""
    engine = config.engine
    kwargs: dict[str, Any] = {
        "tensor_parallel_size": engine.tensor_parallel_size,
        "pipeline_parallel_size": engine.pipeline_parallel_size,
        "max_model_len": engine.max_model_len,
        "max_num_seqs": engine.max_num_seqs,
        "dtype": engine.dtype,
        "enforce_eager": engine.enforce_eager,
        "limit_mm_per_prompt": {"image": engine.max_images_per_prompt},
        "enable_prefix_caching": engine.enable_prefix_caching,
        "seed": engine.seed,
        "trust_remote_code": False,
    }
    if engine.max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = engine.max_num_batched_tokens
    if engine.device == "gpu":
        kwargs["gpu_memory_utilization"] = engine.gpu_memory_utilization
    if engine.kv_cache_memory_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = engine.kv_cache_memory_bytes
    if engine.normalize_images_on_device:
        # Registered by our vLLM plugin (entry point in pyproject.toml) in every vLLM process.
        kwargs["hf_overrides"] = {"architectures": [GEMMA3_FAST_IMAGES]}
    kwargs.update(engine.extra_engine_kwargs)
    return kwargs


def workers_per_replica(config: PipelineConfig) -> int:
    return config.engine.tensor_parallel_size * config.engine.pipeline_parallel_size


def placement_group(config: PipelineConfig) -> dict[str, Any]:
    """One bundle per engine worker. STRICT_PACK keeps a TP group on one node (NVLink, not the network)."""
    count = workers_per_replica(config)
    if config.engine.device == "cpu":
        # Without explicit CPU bundles the engine asks Ray for a GPU and never schedules (NOTES §2).
        return {"bundles": [{"CPU": 1}] * count, "strategy": "STRICT_PACK"}
    return {"bundles": [{"GPU": 1, "CPU": 1}] * count, "strategy": "STRICT_PACK"}


def runtime_env(config: PipelineConfig) -> dict[str, Any] | None:
    return {"env_vars": dict(config.runtime.env_vars)} if config.runtime.env_vars else None


def fixed_or_range(value: int | tuple[int, int]) -> tuple[int, int]:
    """Ray's LLM stages read an int n as "autoscale 1..n"; our config means a fixed pool of n."""
    return (value, value) if isinstance(value, int) else value


# A reserved name (RFC 2606) that never resolves: vLLM treats an empty allow-list as "any domain", so
# this is how the engine is told to fetch nothing itself.
NO_MEDIA_DOMAIN = "media-fetching-disabled.invalid"


def serving_engine_kwargs(config: PipelineConfig) -> dict[str, Any]:
    """`engine_kwargs` plus what only the online endpoint needs: tool calling, chat template, caps.

    - Tool calls: vLLM's `enable_auto_tool_choice` + `tool_call_parser` (serve.tool_call_parser; the
      Gemma 3 parser plugin can replace `pythonic` through serve.tool_parser_plugin).
    - `override_generation_config.max_new_tokens` makes serve.max_tokens_cap a server-wide limit, so a
      request that sets no max_tokens is capped too (vLLM takes the minimum).
    - `structured_outputs_config`: compact guided JSON (serve.compact_guided_json), so tool arguments
      cannot drown in whitespace.
    - `allowed_media_domains`: the ingress fetches allow-listed images itself and passes them on as
      data: URLs, so the engine is told to fetch from no domain at all (defence in depth).
    """
    serve = config.serve
    kwargs = engine_kwargs(config)
    if serve.tool_call_parser:
        kwargs["enable_auto_tool_choice"] = True
        kwargs["tool_call_parser"] = serve.tool_call_parser
    if serve.tool_parser_plugin:
        kwargs["tool_parser_plugin"] = serve.tool_parser_plugin
    if config.engine.chat_template:
        kwargs["chat_template"] = config.engine.chat_template
    generation = dict(kwargs.get("override_generation_config") or {})
    generation["max_new_tokens"] = min(generation.get("max_new_tokens", serve.max_tokens_cap), serve.max_tokens_cap)
    kwargs["override_generation_config"] = generation
    if serve.compact_guided_json:
        kwargs.setdefault("structured_outputs_config", {"backend": "xgrammar", "disable_any_whitespace": True})
    kwargs.setdefault("allowed_media_domains", [NO_MEDIA_DOMAIN])
    return kwargs
