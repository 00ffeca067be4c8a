"""The whole configuration: its sections, the checks across them, and loading it: defaults <- YAML <- `--set
section.field=value` overrides <- environment defaults.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import Field, ValidationError, model_validator

from pipeline.config.base import _Section
from pipeline.config.batch import BatchSection, OpenAIBatchSection, ReportSection
from pipeline.config.engine import EngineSection, ModelSection, SamplingSection
from pipeline.config.errors import ConfigError, _describe
from pipeline.config.io import FetchSection, ImageSection, StorageSection
from pipeline.config.runtime import RuntimeSection
from pipeline.config.serve import ServeSection
from pipeline.config.tools import ToolsSection


def default_max_tokens_cap(max_model_len: int) -> int:
    """The one default of serve.max_tokens_cap and openai_batch.max_tokens_cap: half the context, leaving
    the other half to the prompt."""
    return max_model_len // 2


class PipelineConfig(_Section):
    """The whole configuration. Sections: model, engine, sampling, images, fetch, storage, batch, serve,
    tools, runtime, report, openai_batch."""

    model: ModelSection = Field(default_factory=ModelSection)
    engine: EngineSection = Field(default_factory=EngineSection)
    sampling: SamplingSection = Field(default_factory=SamplingSection)
    images: ImageSection = Field(default_factory=ImageSection)
    fetch: FetchSection = Field(default_factory=FetchSection)
    storage: StorageSection = Field(default_factory=StorageSection)
    batch: BatchSection = Field(default_factory=BatchSection)
    serve: ServeSection = Field(default_factory=ServeSection)
    tools: ToolsSection = Field(default_factory=ToolsSection)
    runtime: RuntimeSection = Field(default_factory=RuntimeSection)
    openai_batch: OpenAIBatchSection = Field(default_factory=OpenAIBatchSection)
    report: ReportSection = Field(default_factory=ReportSection)

    @model_validator(mode="after")
    def _cross_checks(self) -> "PipelineConfig":
        if self.sampling.max_tokens >= self.engine.max_model_len:
            raise ValueError(
                f"sampling.max_tokens ({self.sampling.max_tokens}) must be below engine.max_model_len "
                f"({self.engine.max_model_len}) to leave room for the prompt"
            )
        serve = self.serve
        if serve.max_tokens_cap is None:
            serve.max_tokens_cap = default_max_tokens_cap(self.engine.max_model_len)
        if serve.max_tokens_cap >= self.engine.max_model_len:
            raise ValueError(
                f"serve.max_tokens_cap ({serve.max_tokens_cap}) must be below engine.max_model_len "
                f"({self.engine.max_model_len}) to leave room for the prompt"
            )
        if serve.max_images_per_request > self.engine.max_images_per_prompt:
            raise ValueError(
                f"serve.max_images_per_request ({serve.max_images_per_request}) exceeds "
                f"engine.max_images_per_prompt ({self.engine.max_images_per_prompt}): the engine would "
                "refuse what the endpoint accepts"
            )
        if not serve.min_replicas <= serve.max_replicas:
            raise ValueError(f"serve.min_replicas ({serve.min_replicas}) exceeds serve.max_replicas "
                             f"({serve.max_replicas})")
        if not serve.ingress_min_replicas <= serve.ingress_max_replicas:
            raise ValueError(f"serve.ingress_min_replicas ({serve.ingress_min_replicas}) exceeds "
                             f"serve.ingress_max_replicas ({serve.ingress_max_replicas})")
        if serve.target_ongoing_requests > serve.max_ongoing_requests:
            raise ValueError(
                f"serve.target_ongoing_requests ({serve.target_ongoing_requests}) exceeds "
                f"serve.max_ongoing_requests ({serve.max_ongoing_requests}): replicas would never look "
                "busy enough to scale up"
            )
        openai_batch = self.openai_batch
        if openai_batch.max_tokens_cap is None:
            # Lines without max_tokens get sampling.max_tokens: the cap never refuses the default.
            openai_batch.max_tokens_cap = max(self.sampling.max_tokens,
                                              default_max_tokens_cap(self.engine.max_model_len))
        if openai_batch.max_tokens_cap >= self.engine.max_model_len:
            raise ValueError(
                f"openai_batch.max_tokens_cap ({openai_batch.max_tokens_cap}) must be below engine.max_model_len "
                f"({self.engine.max_model_len}) to leave room for the prompt"
            )
        engine = self.engine
        if engine.device == "gpu" and engine.gpu_share < 1:
            if engine.tensor_parallel_size * engine.pipeline_parallel_size != 1:
                raise ValueError(
                    f"engine.gpu_share ({engine.gpu_share}) below 1 needs one GPU worker per replica "
                    f"(tensor_parallel_size x pipeline_parallel_size is "
                    f"{engine.tensor_parallel_size * engine.pipeline_parallel_size}): a TP group shares no GPU"
                )
            if engine.gpu_memory_utilization > engine.gpu_share:
                raise ValueError(
                    f"engine.gpu_memory_utilization ({engine.gpu_memory_utilization}) exceeds engine.gpu_share "
                    f"({engine.gpu_share}): the replicas sharing a GPU would ask for more than all of it"
                )
            if engine.kv_cache_memory_bytes is None:
                raise ValueError(
                    "engine.kv_cache_memory_bytes is required with engine.gpu_share below 1: vLLM sizes the "
                    "KV cache from free memory, which the other replica on the GPU is changing"
                )
        if self.engine.device == "cpu" and self.engine.kv_cache_memory_bytes is None:
            raise ValueError(
                "engine.kv_cache_memory_bytes is required with engine.device=cpu "
                "(vLLM would otherwise take most of the machine's RAM), e.g. 1073741824"
            )
        return self

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: Optional[str | Path] = None, overrides: Optional[list[str]] = None,
             environ: Optional[dict[str, str]] = None) -> "PipelineConfig":
        """Load defaults <- YAML file <- `section.field=value` overrides <- environment defaults."""
        data: dict[str, Any] = {}
        if path is not None:
            text = Path(path).read_text()
            loaded = yaml.safe_load(text) or {}
            if not isinstance(loaded, dict):
                raise ConfigError(f"{path}: expected a mapping at the top level, got {type(loaded).__name__}")
            data = loaded
        for override in overrides or []:
            _apply_override(data, override)
        environ = os.environ if environ is None else environ
        for section, field, variables in _ENV_DEFAULTS:
            node = data.setdefault(section, {})
            if isinstance(node, dict) and node.get(field) is None:
                value = next((environ[v] for v in variables if environ.get(v)), None)
                if value is not None:
                    node[field] = value
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(_describe(exc, source=str(path) if path else "config", root=cls)) from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> "PipelineConfig":
        return cls.load(path)

    def with_absolute_paths(self) -> "PipelineConfig":
        """Local paths made absolute, so Ray workers (whose working directory may differ) find them."""
        model, engine = self.model, self.engine
        if Path(model.source).exists():
            model = model.model_copy(update={"source": str(Path(model.source).resolve())})
        if engine.chat_template and Path(engine.chat_template).exists():
            engine = engine.model_copy(update={"chat_template": str(Path(engine.chat_template).resolve())})
        tools = self.tools
        if tools.chat_template and Path(tools.chat_template).exists():
            tools = tools.model_copy(update={"chat_template": str(Path(tools.chat_template).resolve())})
        tables = {name: table.model_copy(update={"path": str(Path(table.path).resolve())})
                  if Path(table.path).exists() else table for name, table in tools.tables.items()}
        tools = tools.model_copy(update={"tables": tables})
        return self.model_copy(update={"model": model, "engine": engine, "tools": tools})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

# Fields whose default comes from the environment, read only here: (section, field, variables).
_ENV_DEFAULTS = [
    ("storage", "endpoint_url", ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")),
    ("storage", "region", ("AWS_REGION", "AWS_DEFAULT_REGION")),
    ("runtime", "ray_address", ("RAY_ADDRESS",)),
]


def _apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one `a.b.c=value` override; the value is parsed as YAML (numbers, lists, null)."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r}: expected section.field=value")
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
        node = child
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(value, list) and parts[-1] in ("engine_replicas", "prepare_replicas"):
        value = tuple(value)
    node[parts[-1]] = value
