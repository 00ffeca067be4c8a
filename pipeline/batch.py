"""Batch captioning on Ray Data: parquet records in, one output row per record out.

    read parquet -> PrepareRecords (CPU pool: validate, fetch, decode, resize)
                 -> ray.data.llm processor (chat template, tokenize, vLLM engine replicas)
                 -> FinalizeRows (one explicit schema) -> sharded parquet + manifest

With tools (config tools.builtins, or an input `tools` column) the processor's chat-template and engine
stages get the tool UDFs of pipeline.tool_stages: tools rendered per record, calls read and checked,
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
from .checkpoint import (CheckpointError, CheckpointInfo, check_checkpoint, check_loadable, inspect_checkpoint,
                         read_checkpoint_file)
from .config import ConfigError, PipelineConfig
from .engine import GEMMA3_ARCHITECTURE, engine_kwargs, fixed_or_range, placement_group, runtime_env
from .engine_rows import FinalizeRows, OutputBuilder, RequestBuilder
from .images import ImageTarget, image_target
from .faults import EngineGuardSettings, start_row_ledger, stop_row_ledger
from .manifest import build_manifest
from .prepare import PrepareRecords
from .progress import RunProgress
from .report import write_run_report
from .output_lease import OutputInUseError, OutputLease, interrupt_driver
from .resume import (MANIFEST_NAME, OutputExistsError, begin_attempt, check_exactly_once, check_output_apart,
                     enable_checkpointing, end_attempt, fail_attempt, finish_manifest, finish_output, prepare_output)
from .runtime import init_ray
from .storage import join, make_filesystem, read_text, write_json

logger = logging.getLogger(__name__)

__all__ = ["MANIFEST_NAME", "InputError", "OutputExistsError", "OutputInUseError", "build_caption_dataset",
           "run_caption"]


# One parquet file or prefix, or an explicit list of parquet files (all local or all s3://).
InputUri = Union[str, list[str]]


class InputError(ValueError):
    """The input as a whole cannot be processed (missing contract columns, no files)."""


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
    check_loadable(info, config.storage, maps_transformers_siglip=config.engine.normalize_images_on_device)
    preprocessor = read_checkpoint_file(source, "preprocessor_config.json", config.storage)
    target = image_target(json.loads(preprocessor) if preprocessor else None, config.images.target_size_px)
    generation = read_checkpoint_file(source, "generation_config.json", config.storage)
    eos = json.loads(generation).get("eos_token_id") if generation else None
    stop_ids = [eos] if isinstance(eos, int) else list(eos or [])
    logger.info("model %s: scheme %s, images %dpx, stop tokens %s", source, info.scheme, target.size_px, stop_ids)
    return ModelPlan(info, target, stop_ids)


# Inputs up to this size have their ids counted in the driver, from the id column alone: a few MB and
# well under a second, where Ray Data's distributed groupby spends 10-20 s on scheduling even for a
# handful of rows. Larger inputs, or many files (each needs its footer read), go to Ray's CPU workers.
DRIVER_ID_SCAN_MAX_ROWS = 1_000_000
DRIVER_ID_SCAN_MAX_FILES = 64


def plan_input(config: PipelineConfig, input_uri: InputUri,
               driver_scan_max_rows: int = DRIVER_ID_SCAN_MAX_ROWS) -> InputPlan:
    """Check the input's schema and find duplicate ids with one pass over the id column."""
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
    small = len(dataset.files) <= DRIVER_ID_SCAN_MAX_FILES and dataset.count_rows() <= driver_scan_max_rows
    num_rows, duplicates, missing = (_count_ids_here(dataset) if small else
                                     _count_ids_on_ray(fs, path, schema, len(dataset.files)))
    logger.info("input %s: %d rows in %d files, %d duplicated ids, %d rows without id (counted %s)",
                label, num_rows, len(dataset.files), len(duplicates), missing,
                "in the driver" if small else "on Ray's workers")
    return InputPlan(input_uri, fs, path, schema, num_rows, duplicates, missing)


def _count_ids_here(dataset: pads.Dataset) -> tuple[int, frozenset[str], int]:
    ids = dataset.to_table(columns=[R.ID]).column(R.ID)
    return count_ids(ids if pa.types.is_string(ids.type) else ids.cast(pa.string()))


def _count_ids_on_ray(fs: pafs.FileSystem, path, schema: pa.Schema, n_files: int) -> tuple[int, frozenset[str], int]:
    import ray

    ids = ray.data.read_parquet(path, filesystem=fs, columns=[R.ID])
    if not pa.types.is_string(schema.field(R.ID).type):
        ids = ids.map_batches(_ids_as_strings, batch_format="pyarrow")
    return count_ids_on_ray(ids, R.ID, n_files)


def count_ids(ids: pa.ChunkedArray) -> tuple[int, frozenset[str], int]:
    """(values, values seen more than once, nulls) of a string column held here."""
    import pyarrow.compute as pc

    counts = pc.value_counts(pc.drop_null(ids))
    duplicates = frozenset(v.as_py() for v, n in zip(counts.field("values"), counts.field("counts")) if n.as_py() > 1)
    return len(ids), duplicates, ids.null_count


def count_ids_on_ray(ids, column: str, n_files: int) -> tuple[int, frozenset[str], int]:
    """The same as `count_ids`, for a Ray dataset's string column, by a distributed groupby."""
    # Ray's default of 200 shuffle partitions is meant for big data; one per input file is plenty here
    # and keeps small inputs from spawning hundreds of tasks.
    counts = ids.groupby(column, num_partitions=max(1, min(200, n_files))).count().take_all()
    duplicates = frozenset(r[column] for r in counts if r[column] is not None and r["count()"] > 1)
    missing = sum(r["count()"] for r in counts if r[column] is None)
    return sum(r["count()"] for r in counts), duplicates, missing


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
        # placeholder and vLLM then finds 0 image tokens (docs/notes.md: vLLM on a CPU).
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


def _stage_overrides(config: PipelineConfig, with_tools: bool, guard: Optional[EngineGuardSettings]):
    """The processor's `override_stage_config_fn`: prompts tokenized once (pipeline.rendered_prompts), tool
    UDFs (pipeline.tool_stages) and the engine's crash isolation (pipeline.faults)."""
    from .rendered_prompts import install

    override = None
    if with_tools:
        from .tool_stages import ToolChainSettings, stage_overrides
        from .tools.template import load_tool_template

        override = stage_overrides(ToolChainSettings(config=config, template=load_tool_template(config.tools)))
    if guard is not None:
        from .guarded_stages import engine_stage_overrides

        override = engine_stage_overrides(guard, then=override)

    def with_rendered_prompts(name, stage, then=override):
        install(stage)
        if then is not None:
            then(name, stage)

    return with_rendered_prompts


def build_caption_dataset(config: PipelineConfig, plan: InputPlan, model: ModelPlan,
                          guard: Optional[EngineGuardSettings] = None):
    """The lazy dataset of output rows (nothing runs until it is written or iterated).

    With `guard` (run_caption always passes one) the engine stage isolates records that crash it
    (pipeline.faults)."""
    import ray
    from ray.data.llm import build_processor

    with_tools = tools_enabled(config, plan.schema)
    schema = R.output_schema(plan.schema, config.batch.passthrough_columns, tools=with_tools)
    # row_hash: the per-row key of resume (pipeline.resume); blocks of at most batch.rows_per_block rows
    # make the unit of resume small, since a block's output rows are committed together.
    dataset = ray.data.read_parquet(plan.path, filesystem=plan.filesystem, include_paths=True,
                                    include_row_hash=True)
    dataset = dataset.repartition(target_num_rows_per_block=config.batch.rows_per_block)
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
        builder_kwargs={"override_stage_config_fn": _stage_overrides(config, with_tools, guard)},
    )
    dataset = processor(dataset)
    return dataset.map_batches(FinalizeRows(outputs), batch_format="pyarrow"), schema


def _pool_size(value: int | tuple[int, int]) -> dict[str, int]:
    low, high = fixed_or_range(value)
    return {"min_size": low, "max_size": high}


def run_caption(config: PipelineConfig, input_uri: InputUri, output_uri: str, *, overwrite: bool = False) -> dict[str, Any]:
    """Caption every record of `input_uri` (a file, a prefix or a list of files) into `output_uri`; returns
    the manifest it wrote.

    Rerunning after a crash resumes: only rows without output are processed, each input row ends with
    exactly one output row; a complete output is left as it is (its manifest is returned) unless
    `overwrite` (pipeline.resume). The job holds the output prefix's writer lease from before it looks at
    the prefix until after the manifest; another live job's lease refuses this one (OutputInUseError)
    before anything is changed (pipeline.output_lease).
    """
    started = time.time()
    config = config.with_absolute_paths()
    check_output_apart(input_uri, output_uri)
    lease = OutputLease.for_output(config.storage, output_uri, ttl_s=config.batch.output_lease_ttl_s,
                                   on_lost=interrupt_driver())
    with lease:  # first: a job refused here has read nothing else and changed nothing
        try:
            return _run_holding_lease(config, input_uri, output_uri, overwrite, lease, started)
        except KeyboardInterrupt:
            if lease.lost:  # the heartbeat interrupted this run: another job took the prefix over
                lease.check_held()
            raise


def _run_holding_lease(config: PipelineConfig, input_uri: InputUri, output_uri: str, overwrite: bool,
                       lease: OutputLease, started: float) -> dict[str, Any]:
    model = plan_model(config)
    check_tools(config)
    output = prepare_output(config, input_uri, output_uri, overwrite=overwrite)
    if output.complete:
        return output.manifest
    init_ray(config)
    plan = plan_input(config, input_uri)
    # ---- one attempt: recorded in _attempts.json (pipeline.resume), engine crashes counted (pipeline.faults)
    attempt = begin_attempt(config, output, input_uri)
    ledger, ledger_name = start_row_ledger("caption")
    try:
        guard = EngineGuardSettings(ledger_name=ledger_name, max_engine_attempts=config.batch.max_engine_attempts)
        dataset, schema = build_caption_dataset(config, plan, model, guard)
        # Status line + counters (pipeline/progress.py), over the rows this attempt still has to do.
        with RunProgress(config, plan.num_rows - output.rows_done) as progress:
            dataset = progress.observe(dataset)
            enable_checkpointing(dataset, output)  # on the dataset that is written
            dataset.write_parquet(output.path, filesystem=output.filesystem,
                                  max_rows_per_file=config.batch.rows_per_file)
    except BaseException as exc:
        engine = stop_row_ledger(ledger)
        if not lease.lost:  # a job that lost the prefix leaves its new owner's _attempts.json alone
            fail_attempt(config, output, input_uri, attempt, exc, **engine)
        raise
    engine = stop_row_ledger(ledger)
    lease.check_held()
    finished = time.time()
    written = pads.dataset(output.path, filesystem=output.filesystem, format="parquet")
    manifest = build_manifest(
        config=config, input_uri=input_uri, output_uri=output_uri, rows_in=plan.num_rows,
        output=written, checkpoint=model.checkpoint.as_dict(), started=started, finished=finished)
    exactly_once = check_exactly_once(written, plan.num_rows)
    end_attempt(config, output, input_uri, attempt, "complete" if exactly_once["exactly_once"] else "incomplete",
                rows_written=exactly_once["rows_out"] - output.rows_done, **engine)
    manifest = finish_manifest(manifest, output, exactly_once)
    write_json(config.storage, join(output_uri, MANIFEST_NAME), manifest)
    finish_output(config, output, manifest)
    write_run_report(config, output_uri, manifest)  # _report/report.html + charts; logs, never raises
    # ----
    logger.info("wrote %d rows (%d errors) to %s in %.1fs", manifest["counts"]["rows_out"],
                manifest["counts"]["errors"], output_uri, finished - started)
    return manifest
