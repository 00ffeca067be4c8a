"""Batch captioning on Ray Data: parquet records in, one output row per record out.

    read parquet -> PrepareRecords (CPU pool: validate, fetch, decode, resize)
                 -> ray.data.llm processor (chat template, tokenize, vLLM engine replicas)
                 -> FinalizeRows (one explicit schema) -> sharded parquet + manifest

With tools (config tools.builtins, or an input `tools` column) the processor's chat-template and engine
stages get the tool UDFs of pipeline.tools.ray_stages: tools rendered per record, calls read and checked,
built-in tools run between rounds, all in the same engine replicas.

`build_caption_dataset` returns the lazy dataset; `run_caption` executes it, writes the output and the
manifest, and returns the manifest.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Optional, Union

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from . import records as R
from .checkpoint import CheckpointError, CheckpointInfo, check_checkpoint, inspect_checkpoint, read_checkpoint_file
from .config import ConfigError, PipelineConfig
from .engine import GEMMA3_ARCHITECTURE, engine_kwargs, fixed_or_range, placement_group, runtime_env
from .engine_rows import FinalizeRows, OutputBuilder, RequestBuilder
from .images import ImageTarget, image_target
from .manifest import build_manifest
from .prepare import PrepareRecords
from .progress import RunProgress
from .report import write_run_report
from .runtime import init_ray
from .storage import join, make_filesystem, read_json, read_text, write_json

logger = logging.getLogger(__name__)

MANIFEST_NAME = "_manifest.json"


# One parquet file or prefix, or an explicit list of parquet files (all local or all s3://).
InputUri = Union[str, list[str]]


class InputError(ValueError):
    """The input as a whole cannot be processed (missing contract columns, no files)."""


class OutputExistsError(FileExistsError):
    """The output prefix already holds a finished run."""


@dataclass
class InputPlan:
    """What the driver learns about the input before any row is processed."""

    uri: InputUri
    filesystem: pafs.FileSystem
    path: str | list[str]
    schema: pa.Schema
    num_rows: int
    duplicate_ids: frozenset[str]
    missing_ids: int


@dataclass
class ModelPlan:
    checkpoint: CheckpointInfo
    image_target: ImageTarget
    stop_token_ids: list[int]


def plan_model(config: PipelineConfig) -> ModelPlan:
    """Inspect the checkpoint on the driver: scheme check, image size, stop tokens. No GPU is taken."""
    source = config.model.source
    info = inspect_checkpoint(source, config.storage)
    check_checkpoint(info, config.model.quantization)
    if config.engine.normalize_images_on_device and info.architecture != GEMMA3_ARCHITECTURE:
        raise CheckpointError(f"{source} is a {info.architecture}, but engine.normalize_images_on_device "
                              f"only applies to {GEMMA3_ARCHITECTURE}; set it to false")
    preprocessor = read_checkpoint_file(source, "preprocessor_config.json", config.storage)
    target = image_target(json.loads(preprocessor) if preprocessor else None, config.images.target_size_px)
    generation = read_checkpoint_file(source, "generation_config.json", config.storage)
    eos = json.loads(generation).get("eos_token_id") if generation else None
    stop_ids = [eos] if isinstance(eos, int) else list(eos or [])
    logger.info("model %s: scheme %s, images %dpx, stop tokens %s", source, info.scheme, target.size_px, stop_ids)
    return ModelPlan(info, target, stop_ids)


def plan_input(config: PipelineConfig, input_uri: InputUri) -> InputPlan:
    """Check the input's schema and find duplicate ids with one pass over the id column."""
    import ray

    fs, path = _input_location(config, input_uri)
    label = input_uri if isinstance(input_uri, str) else f"{len(input_uri)} listed files"
    try:
        dataset = pads.dataset(path, filesystem=fs, format="parquet")
    except (FileNotFoundError, OSError) as exc:
        raise InputError(f"cannot read parquet input {label}: {exc}") from None
    if not dataset.files:
        raise InputError(f"no parquet files under {label}")
    schema = dataset.schema
    problems = R.check_input_schema(schema)
    if problems:
        raise InputError(f"{label}: " + "; ".join(problems))
    ids = ray.data.read_parquet(path, filesystem=fs, columns=[R.ID])
    if not pa.types.is_string(schema.field(R.ID).type):
        ids = ids.map_batches(_ids_as_strings, batch_format="pyarrow")
    # Ray's default of 200 shuffle partitions is meant for big data; one per input file is plenty here
    # and keeps small inputs from spawning hundreds of tasks.
    partitions = max(1, min(200, len(dataset.files)))
    counts = ids.groupby(R.ID, num_partitions=partitions).count().take_all()
    duplicates = frozenset(r[R.ID] for r in counts if r[R.ID] is not None and r["count()"] > 1)
    missing = sum(r["count()"] for r in counts if r[R.ID] is None)
    num_rows = sum(r["count()"] for r in counts)
    logger.info("input %s: %d rows in %d files, %d duplicated ids, %d rows without id",
                label, num_rows, len(dataset.files), len(duplicates), missing)
    return InputPlan(input_uri, fs, path, schema, num_rows, duplicates, missing)


def _input_location(config: PipelineConfig, input_uri: InputUri) -> tuple[pafs.FileSystem, str | list[str]]:
    """The filesystem and path(s) of the input: one file or prefix, or a list of files on one filesystem
    (a scheduled tick captions exactly the files it claimed; pyarrow and Ray Data read lists as they are)."""
    if isinstance(input_uri, str):
        return make_filesystem(config.storage, input_uri)
    if not input_uri:
        raise InputError("the input list is empty")
    located = [make_filesystem(config.storage, uri) for uri in input_uri]
    if len({type(fs) for fs, _ in located}) > 1:
        raise InputError("the input list mixes local paths and s3:// URIs; give one kind per run")
    return located[0][0], [path for _, path in located]


def load_input_list(config: PipelineConfig, list_uri: str) -> list[str]:
    """The input URIs listed in a text file (local or s3://): one per line; blank lines and # comments skipped."""
    text = read_text(config.storage, list_uri)
    if text is None:
        raise InputError(f"input list {list_uri} does not exist")
    uris = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not uris:
        raise InputError(f"input list {list_uri} names no file")
    return uris


def _ids_as_strings(batch: pa.Table) -> pa.Table:
    return batch.set_column(batch.schema.get_field_index(R.ID), R.ID, batch[R.ID].cast(pa.string()))


def processor_config(config: PipelineConfig):
    from ray.data.llm import vLLMEngineProcessorConfig

    cpu_stage = {"concurrency": fixed_or_range(config.batch.prepare_replicas)}
    return vLLMEngineProcessorConfig(
        model_source=config.model.source,
        engine_kwargs=engine_kwargs(config),
        batch_size=config.batch.engine_batch_size,
        concurrency=fixed_or_range(config.batch.engine_replicas),
        max_concurrent_batches=config.batch.max_concurrent_batches,
        placement_group_config=placement_group(config),
        accelerator_type=config.engine.accelerator_type,
        runtime_env=runtime_env(config),
        # A request the engine refuses (too long, bad image) becomes an error row, not a failed job.
        # A dead engine is still fatal to its actor, which Ray restarts.
        should_continue_on_error=True,
        # "openai" keeps the image part in the message content; the default "string" drops its
        # placeholder and vLLM then finds 0 image tokens (NOTES §2).
        prepare_multimodal_stage={"enabled": True, "chat_template_content_format": "openai", **cpu_stage},
        chat_template_stage={"enabled": True, "chat_template": _chat_template(config), **cpu_stage},
        tokenize_stage={"enabled": True, **cpu_stage},
        # The engine already detokenizes (SamplingParams.detokenize); a second pass would only cost CPU.
        detokenize_stage=False,
        # vLLM's engine metrics on Ray's Prometheus endpoint, beside ours (pipeline/metrics.py).
        log_engine_metrics=config.runtime.engine_metrics,
    )


def _chat_template(config: PipelineConfig) -> Optional[str]:
    if config.engine.chat_template is None:
        return None
    from pathlib import Path

    return Path(config.engine.chat_template).read_text()


def tools_enabled(config: PipelineConfig, input_schema: pa.Schema) -> bool:
    """Whether the job offers tools: built-ins configured, or records that bring their own."""
    return bool(config.tools.builtins) or R.TOOLS in input_schema.names


def check_tools(config: PipelineConfig) -> None:
    """Fail before any GPU is taken when a lookup table cannot be read (it would fail every record)."""
    if "lookup" not in config.tools.builtins:
        return
    from .tools.builtins import build_registry

    try:
        build_registry(config)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"tools.tables: {exc}") from None


def _tool_builder_kwargs(config: PipelineConfig) -> dict[str, Any]:
    from .tools.ray_stages import ToolChainSettings, stage_overrides
    from .tools.template import load_tool_template

    settings = ToolChainSettings(config=config, template=load_tool_template(config.tools))
    return {"override_stage_config_fn": stage_overrides(settings)}


def build_caption_dataset(config: PipelineConfig, plan: InputPlan, model: ModelPlan):
    """The lazy dataset of output rows (nothing runs until it is written or iterated)."""
    import ray
    from ray.data.llm import build_processor

    with_tools = tools_enabled(config, plan.schema)
    schema = R.output_schema(plan.schema, config.batch.passthrough_columns, tools=with_tools)
    dataset = ray.data.read_parquet(plan.path, filesystem=plan.filesystem, include_paths=True)
    dataset = dataset.rename_columns({"path": R.SOURCE}) if "path" not in plan.schema.names else dataset
    if not pa.types.is_string(plan.schema.field(R.ID).type):
        dataset = dataset.map_batches(_ids_as_strings, batch_format="pyarrow")
    dataset = dataset.map_batches(
        PrepareRecords,
        fn_constructor_kwargs={"config": config, "target": model.image_target, "duplicate_ids": plan.duplicate_ids},
        batch_size=config.batch.prepare_batch_size,
        batch_format="pyarrow",
        num_cpus=config.batch.prepare_num_cpus,
        compute=ray.data.ActorPoolStrategy(**_pool_size(config.batch.prepare_replicas)),
    )
    outputs = OutputBuilder(config, schema, model.stop_token_ids)
    processor = build_processor(
        processor_config(config),
        preprocess=RequestBuilder(config, model.image_target.size_px, schema),
        postprocess=outputs,
        builder_kwargs=_tool_builder_kwargs(config) if with_tools else None,
    )
    dataset = processor(dataset)
    return dataset.map_batches(FinalizeRows(outputs), batch_format="pyarrow"), schema


def _pool_size(value: int | tuple[int, int]) -> dict[str, int]:
    low, high = fixed_or_range(value)
    return {"min_size": low, "max_size": high}


def run_caption(config: PipelineConfig, input_uri: InputUri, output_uri: str, *, overwrite: bool = False) -> dict[str, Any]:
    """Caption every record of `input_uri` (a file, a prefix or a list of files) into `output_uri`; returns
    the manifest it wrote."""
    started = time.time()
    config = config.with_absolute_paths()
    model = plan_model(config)
    check_tools(config)
    out_fs, out_path = make_filesystem(config.storage, output_uri)
    _prepare_output(config, out_fs, out_path, output_uri, overwrite)
    init_ray(config)
    plan = plan_input(config, input_uri)
    dataset, schema = build_caption_dataset(config, plan, model)
    with RunProgress(config, plan.num_rows) as progress:  # status line + counters (pipeline/progress.py)
        progress.observe(dataset).write_parquet(out_path, filesystem=out_fs,
                                                max_rows_per_file=config.batch.rows_per_file)
    finished = time.time()
    written = pads.dataset(out_path, filesystem=out_fs, format="parquet")
    manifest = build_manifest(
        config=config, input_uri=input_uri, output_uri=output_uri, rows_in=plan.num_rows,
        output=written, checkpoint=model.checkpoint.as_dict(), started=started, finished=finished)
    write_json(config.storage, join(output_uri, MANIFEST_NAME), manifest)
    write_run_report(config, output_uri, manifest)  # _report/report.html + charts; logs, never raises
    logger.info("wrote %d rows (%d errors) to %s in %.1fs", manifest["counts"]["rows_out"],
                manifest["counts"]["errors"], output_uri, finished - started)
    return manifest


def _prepare_output(config: PipelineConfig, fs: pafs.FileSystem, path: str, uri: str, overwrite: bool) -> None:
    info = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    if not info:
        return
    if not overwrite:
        previous = read_json(config.storage, join(uri, MANIFEST_NAME))
        state = "a finished run" if previous else "files from an earlier run"
        raise OutputExistsError(f"{uri} already holds {state}; pass --overwrite to replace it")
    logger.warning("overwriting %s (%d entries)", uri, len(info))
    fs.delete_dir_contents(path, missing_dir_ok=True)
