"""One typed configuration for batch and online.

Every knob lives here, with a description that states its trade-off. A YAML file fills it
(`PipelineConfig.from_yaml`), and `--set section.field=value` overrides any field from the command line
(`apply_overrides`). Unknown keys fail loudly (`extra="forbid"`), so a misspelled knob is an error, not a
silent default. Environment variables are read here and nowhere else (storage endpoint, API keys).
"""

from __future__ import annotations

# The sections live in modules by consumer; this package exports every name it always has.
from pipeline.config.base import Concurrency
from pipeline.config.batch import BatchSection, InputFormat, OpenAIBatchSection, ReportSection
from pipeline.config.engine import ModelSection, EngineSection, SamplingSection
from pipeline.config.errors import ConfigError
from pipeline.config.io import ImageSection, FetchSection, StorageSection
from pipeline.config.loader import default_max_tokens_cap, PipelineConfig
from pipeline.config.runtime import RuntimeSection
from pipeline.config.serve import RateLimit, ServeSection, read_api_keys
from pipeline.config.tools import BuiltinTool, TableSection, ToolsSection

__all__ = ["BatchSection", "BuiltinTool", "Concurrency", "ConfigError", "EngineSection", "FetchSection",
           "ImageSection", "InputFormat", "ModelSection", "OpenAIBatchSection", "PipelineConfig",
           "RateLimit", "ReportSection", "RuntimeSection", "SamplingSection", "ServeSection",
           "StorageSection", "TableSection", "ToolsSection", "default_max_tokens_cap", "read_api_keys"]
