"""The one mapping from PipelineConfig to vLLM engine arguments and Ray placement.

Batch (`ray.data.llm`) and online (`ray.serve.llm`) both call `engine_kwargs` and `placement_group`,
so context length, quantization, image limits and parallelism cannot drift apart between them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.engine.checkpoint import GEMMA3_ARCHITECTURE  # noqa: F401  (re-exported: callers import it from here)
from pipeline.config import PipelineConfig
from pipeline.engine.plugin import GEMMA3_FAST_IMAGES


def engine_kwargs(config: PipelineConfig) -> dict[str, Any]:
    """vLLM engine arguments, all set explicitly: Ray's batch defaults are small (docs/notes.md: Ray Data)."""
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
    if engine.kv_cache_dtype != "auto":
        kwargs["kv_cache_dtype"] = engine.kv_cache_dtype
    if engine.normalize_images_on_device:
        # Registered by our vLLM plugin (entry point in pyproject.toml) in every vLLM process.
        kwargs["hf_overrides"] = {"architectures": [GEMMA3_FAST_IMAGES]}
    if config.tools.compact_json:
        # Guided JSON (forced tool calls) without optional whitespace; only xgrammar and guidance honour it.
        kwargs["structured_outputs_config"] = {"backend": "xgrammar", "disable_any_whitespace": True}
    kwargs.update(engine.extra_engine_kwargs)
    return kwargs


def tool_serving_kwargs(config: PipelineConfig) -> dict[str, Any]:
    """vLLM server arguments for tool calling with the Gemma 3 parser and template (online only).

    These are OpenAI-server (frontend) arguments, not engine arguments: the batch engine never takes
    them (its tool calls are read by pipeline.tools in the engine stage). `tool_parser_plugin` serves
    `vllm serve`; Ray Serve replicas find the parser through this package's vLLM plugin entry point.
    """
    from pipeline.tools.template import tool_template_path

    plugin = Path(__file__).resolve().parent / "tool_parser.py"
    return {
        "enable_auto_tool_choice": True,
        "tool_call_parser": config.tools.parser,
        "tool_parser_plugin": str(plugin),
        "chat_template": str(tool_template_path(config.tools).resolve()),
    }


def workers_per_replica(config: PipelineConfig) -> int:
    return config.engine.tensor_parallel_size * config.engine.pipeline_parallel_size


def gpus_per_replica(config: PipelineConfig) -> float:
    """GPUs one engine replica holds: its workers x engine.gpu_share (0 on CPU)."""
    if config.engine.device != "gpu":
        return 0
    return workers_per_replica(config) * config.engine.gpu_share


def placement_group(config: PipelineConfig) -> dict[str, Any]:
    """One bundle per engine worker. STRICT_PACK keeps a TP group on one node (NVLink, not the network)."""
    count = workers_per_replica(config)
    # engine.ray_resources pins replicas to nodes that offer them (with TP=1 Ray Data asks them of the
    # engine actor itself, as it does the bundle's CPU/GPU).
    extra = dict(config.engine.ray_resources)
    if config.engine.device == "cpu":
        # Without explicit CPU bundles the engine asks Ray for a GPU and never schedules (docs/notes.md: vLLM on a CPU).
        return {"bundles": [{"CPU": 1, **extra} for _ in range(count)], "strategy": "STRICT_PACK"}
    # A fractional GPU (engine.gpu_share) lets Ray place several one-GPU replicas on each GPU.
    return {"bundles": [{"GPU": config.engine.gpu_share, "CPU": 1, **extra} for _ in range(count)],
            "strategy": "STRICT_PACK"}


def runtime_env(config: PipelineConfig) -> dict[str, Any] | None:
    env_vars = config.runtime.process_env_vars()
    return {"env_vars": env_vars} if env_vars else None


def fixed_or_range(value: int | tuple[int, int]) -> tuple[int, int]:
    """Ray's LLM stages read an int n as "autoscale 1..n"; our config means a fixed pool of n."""
    return (value, value) if isinstance(value, int) else value


# A reserved name (RFC 2606) that never resolves: vLLM treats an empty allow-list as "any domain", so
# this is how the engine is told to fetch nothing itself.
NO_MEDIA_DOMAIN = "media-fetching-disabled.invalid"


def serving_engine_kwargs(config: PipelineConfig) -> dict[str, Any]:
    """`engine_kwargs` plus what only the online endpoint needs: tool calling, chat template, caps.

    - Tool calls: the Gemma 3 parser and template (`tool_serving_kwargs`, config.tools), the same ones
      the batch job reads its calls with, so batch and online agree. Guided JSON is compact for both
      (config.tools.compact_json, set in `engine_kwargs`).
    - `engine.chat_template`, when set, replaces the tool template for every request.
    - `override_generation_config.max_new_tokens` makes serve.max_tokens_cap a server-wide limit, so a
      request that sets no max_tokens is capped too (vLLM takes the minimum).
    - `allowed_media_domains`: the ingress fetches allow-listed images itself and passes them on as
      data: URLs, so the engine is told to fetch from no domain at all (defence in depth).
    """
    serve = config.serve
    kwargs = engine_kwargs(config)
    kwargs.update(tool_serving_kwargs(config))
    if config.engine.chat_template:
        kwargs["chat_template"] = config.engine.chat_template
    generation = dict(kwargs.get("override_generation_config") or {})
    generation["max_new_tokens"] = min(generation.get("max_new_tokens", serve.max_tokens_cap), serve.max_tokens_cap)
    kwargs["override_generation_config"] = generation
    kwargs.setdefault("allowed_media_domains", [NO_MEDIA_DOMAIN])
    return kwargs
