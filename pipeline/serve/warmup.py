"""Engine replicas that warm up before Serve sends them traffic.

A new replica's first requests pay one-time costs that vLLM's start-up does not: the vision encoder and
attention kernels JIT-compiled for the shapes a real image brings, the multimodal processor's first
call, and for tool calls the structured-output grammar compiler's tokenizer tables. On an H200 the model
card's `vllm serve` answered its first request after ready 3.1x slower than a warm one (docs/performance.md).
Serve routes to a replica only once its constructor has returned, and `LLMServer`'s constructor awaits
`start()`, so requests run at the end of `start()` keep those costs off users, for the first replica and
for every one the autoscaler adds under load.

`WarmLLMServer` is Ray's `LLMServer` plus that warm-up, set as the engine deployment's class through
`LLMConfig.server_cls` (a documented field). The requests go through the server's own `chat` path, the
one users take (chat template, multimodal processor, tool parser), with a generated 896 px image (the
Gemma 3 encoder's input size) and a few tokens out. A warm-up that fails is logged and the replica still
starts: its engine is up, and a real request will show the same error to its caller.
"""
from __future__ import annotations

import asyncio
import base64
import io
import logging
import time

from ray.serve.llm import LLMServer

# Serve's replica logger: its lines reach the replica's log file and the driver's console.
logger = logging.getLogger("ray.serve")

WARMUP_TIMEOUT_S = 300.0
IMAGE_SIDE_PX = 896
WARMUP_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def warmup_image_url(side: int = IMAGE_SIDE_PX) -> str:
    """A smooth gradient PNG as a data: URL (no file, no network)."""
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, side, dtype=np.float32)
    pixels = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (side, 1)), np.tile(ramp[:, None], (1, side))],
                      axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def warmup_requests(model_id: str, with_tools: bool) -> list[tuple[str, dict]]:
    """(name, ChatCompletionRequest fields): an image request, then, when the server parses tool calls,
    one with a required tool (guided decoding compiles its grammar on first use)."""
    requests = [
        ("image", {"model": model_id, "max_tokens": 4, "temperature": 0.0, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": warmup_image_url()}},
            {"type": "text", "text": "Describe this image."}]}]}),
        ("tool call", {"model": model_id, "max_tokens": 16, "temperature": 0.0, "tools": [WARMUP_TOOL],
                       "tool_choice": "required",
                       "messages": [{"role": "user", "content": "What is the weather in Paris?"}]}),
    ]
    return requests if with_tools else requests[:1]


class PluginLLMServer(LLMServer):
    """Ray's engine server, with vLLM's general plugins loaded in the replica before its start, and a
    one-GPU engine run in vLLM's engine-core process when the config asks (pipeline/serve/in_process.py)."""

    async def start(self):
        # vLLM loads its general plugins (our `gemma3` tool parser among them) when it builds an engine.
        # With vLLM 0.26, Ray's server looks the tool parser up by name before that, in this process, and
        # the replica failed its start on an H200 (2026-12-03): load them first (idempotent).
        from vllm.plugins import load_general_plugins

        from pipeline.serve import in_process

        load_general_plugins()
        if in_process.wanted(self._llm_config.experimental_configs):
            self._engine_cls = in_process.in_process_engine_class()
        await super().start()


class WarmLLMServer(PluginLLMServer):
    """The engine server whose start ends with the warm-up requests (see the module docstring)."""

    async def start(self):
        await super().start()
        await self.warm_up()

    async def warm_up(self) -> list[str]:
        """Run each warm-up request to completion; returns one line per request (also logged)."""
        from ray.llm._internal.serve.core.configs.openai_api_models import ChatCompletionRequest, ErrorResponse

        lines = []
        with_tools = bool(self._llm_config.engine_kwargs.get("enable_auto_tool_choice"))
        for name, fields in warmup_requests(self._llm_config.model_id, with_tools):
            started = time.perf_counter()
            try:
                async with asyncio.timeout(WARMUP_TIMEOUT_S):
                    outcome = "ok"
                    async for item in await self.chat(ChatCompletionRequest(**fields)):
                        if isinstance(item, ErrorResponse):
                            outcome = f"error: {item.error.message}"[:300]
            except Exception as exc:  # noqa: BLE001 - a failed warm-up must not stop a started engine
                outcome = f"failed: {type(exc).__name__}: {exc}"[:300]
            line = f"warm-up {name}: {outcome} in {time.perf_counter() - started:.2f}s"
            (logger.info if outcome == "ok" else logger.warning)(line)
            lines.append(line)
        return lines
