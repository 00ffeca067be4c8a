"""gemma3-fp8-pipeline: Gemma-3-12b-it (FP8-dynamic) over image datasets on Ray Data, and online.

The facade is lazy: importing it loads the config model only; vLLM, torch and Ray's LLM stack load
inside the functions that need them. Batch: `build_caption_dataset`, `run_caption`, `run_batch_job` (either
input format), `run_openai_batch` (OpenAI Batch files); online: `build_app`
(the Ray Serve application), `run_serve`.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

from pipeline.config import ConfigError, PipelineConfig

__all__ = ["PipelineConfig", "ConfigError", "build_caption_dataset", "run_caption", "output_schema", "build_app",
           "run_serve", "run_quantize", "run_batch_job", "run_openai_batch"]

_LAZY = {
    "build_caption_dataset": "pipeline.batch.caption",
    "run_caption": "pipeline.batch.caption",
    "output_schema": "pipeline.io.records",
    "build_app": "pipeline.serve.app",
    "run_serve": "pipeline.serve.app",
    "run_quantize": "pipeline.quantize.make",  # needs the quantize environment (llm-compressor) to run
    "run_batch_job": "pipeline.batch.job",  # parquet records or OpenAI Batch files, by input format
    "run_openai_batch": "pipeline.batch.openai_batch",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
