"""Batch captioning on Ray Data: parquet records in, one output row per record out.

    read parquet -> PrepareRecords (CPU pool: validate, fetch, decode, resize)
                 -> ray.data.llm processor (chat template, tokenize, vLLM engine replicas)
                 -> FinalizeRows (one explicit schema) -> sharded parquet + manifest

With tools (config tools.builtins, or an input `tools` column) the processor's chat-template and engine
stages get the tool UDFs of pipeline.stages.tools: tools rendered per record, calls read and checked,
built-in tools run between rounds, all in the same engine replicas.

`build_caption_dataset` returns the lazy dataset; `run_caption` runs it through the batch skeleton
(pipeline.batch.skeleton: lease, resume, crash isolation, status line, manifest, report) with
`CaptionFormat`, this format's adapter, and returns the manifest.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from pipeline.io import records as R
from pipeline.batch.skeleton import (DRIVER_ID_SCAN_MAX_FILES, InputError, InputUri, ModelPlan, count_ids, count_ids_on_ray,
                             plan_model, prepare_on_cpu_pool, run_batch)
from pipeline.config import ConfigError, PipelineConfig
from pipeline.engine.args import engine_kwargs, fixed_or_range, placement_group, runtime_env
from pipeline.stages.engine_rows import FinalizeRows, OutputBuilder, RequestBuilder
from pipeline.stages.crash_isolation import EngineGuardSettings
from pipeline.batch.manifest import build_manifest
from pipeline.batch.output_lease import OutputInUseError
from pipeline.stages.prepare import PrepareRecords
from pipeline.report.build import write_run_report
from pipeline.batch.resume import (MANIFEST_NAME, OutputExistsError, OutputState, check_exactly_once, count_committed_rows,
                     enable_checkpointing)
from pipeline.io.storage import make_filesystem, read_text

logger = logging.getLogger(__name__)

__all__ = ["MANIFEST_NAME", "CaptionFormat", "InputError", "ModelPlan", "OutputExistsError", "OutputInUseError",
           "build_caption_dataset", "plan_model", "run_caption"]


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


# Inputs up to this many rows (and pipeline.batch.skeleton's file count) have their ids counted in the
# driver, from the id column alone: a few MB. Larger inputs, or many files (each needs its footer read),
# go to Ray's CPU workers.
DRIVER_ID_SCAN_MAX_ROWS = 1_000_000


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
        # vLLM's engine metrics on Ray's Prometheus endpoint, beside ours (pipeline/batch/metrics.py).
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
    from pipeline.tools.builtins import build_registry

    try:
        build_registry(config)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"tools.tables: {exc}") from None


def _stage_overrides(config: PipelineConfig, with_tools: bool, guard: Optional[EngineGuardSettings]):
    """The processor's `override_stage_config_fn`: prompts tokenized once (pipeline.stages.rendered_prompts), tool
    UDFs (pipeline.stages.tools) and the engine's crash isolation (pipeline.stages.crash_isolation)."""
    from pipeline.stages.rendered_prompts import install

    override = None
    if with_tools:
        from pipeline.stages.tools import ToolChainSettings, stage_overrides
        from pipeline.tools.template import load_tool_template

        override = stage_overrides(ToolChainSettings(config=config, template=load_tool_template(config.tools)))
    if guard is not None:
        from pipeline.stages.guarded import engine_stage_overrides

        override = engine_stage_overrides(guard, then=override)

    def with_rendered_prompts(name, stage, then=override):
        install(stage)
        if then is not None:
            then(name, stage)

    return with_rendered_prompts


# What turns request rows into engine output rows: (config, preprocess, postprocess, stage overrides) -> a
# callable from dataset to dataset. `ray.data.llm`'s processor in every job; the data-plane scale bench
# passes pipeline.testing.standin_engine's instead, to measure everything around the engine without one.
EngineProcessorFactory = Callable[[PipelineConfig, Any, Any, Callable], Callable[[Any], Any]]


def llm_processor(config: PipelineConfig, preprocess, postprocess, stage_overrides: Callable):
    """Ray's `ray.data.llm` processor: chat template, tokenizer, the vLLM engine stage, detokenizer."""
    from ray.data.llm import build_processor

    return build_processor(processor_config(config), preprocess=preprocess, postprocess=postprocess,
                           builder_kwargs={"override_stage_config_fn": stage_overrides})


def build_caption_dataset(config: PipelineConfig, plan: InputPlan, model: ModelPlan,
                          guard: Optional[EngineGuardSettings] = None,
                          engine_processor: EngineProcessorFactory = llm_processor):
    """The lazy dataset of output rows (nothing runs until it is written or iterated).

    With `guard` (run_caption always passes one) the engine stage isolates records that crash it
    (pipeline.stages.crash_isolation)."""
    import ray

    with_tools = tools_enabled(config, plan.schema)
    schema = R.output_schema(plan.schema, config.batch.passthrough_columns, tools=with_tools)
    # row_hash: the per-row key of resume (pipeline.batch.resume); blocks of at most batch.rows_per_block rows
    # make the unit of resume small, since a block's output rows are committed together.
    dataset = ray.data.read_parquet(plan.path, filesystem=plan.filesystem, include_paths=True,
                                    include_row_hash=True)
    dataset = dataset.repartition(target_num_rows_per_block=config.batch.rows_per_block)
    dataset = dataset.rename_columns({"path": R.SOURCE}) if "path" not in plan.schema.names else dataset
    if not pa.types.is_string(plan.schema.field(R.ID).type):
        dataset = dataset.map_batches(_ids_as_strings, batch_format="pyarrow")
    dataset = prepare_on_cpu_pool(dataset, PrepareRecords, config, model.image_target, plan.duplicate_ids)
    outputs = OutputBuilder(config, schema, model.stop_token_ids)
    processor = engine_processor(config, RequestBuilder(config, model.image_target.size_px, schema), outputs,
                                 _stage_overrides(config, with_tools, guard))
    dataset = processor(dataset)
    return dataset.map_batches(FinalizeRows(outputs), batch_format="pyarrow"), schema


def run_caption(config: PipelineConfig, input_uri: InputUri, output_uri: str, *, overwrite: bool = False) -> dict[str, Any]:
    """Caption every record of `input_uri` (a file, a prefix or a list of files) into `output_uri`; returns
    the manifest it wrote. The run, its resume and its report are pipeline.batch.skeleton's."""
    return run_batch(config, CaptionFormat(input_uri), output_uri, overwrite=overwrite)


@dataclass
class CaptionFormat:
    """The parquet adapter of pipeline.batch.skeleton: records in, one output row per record out, resumed
    through Ray Data's checkpoint keyed on R.ROW_HASH (pipeline.batch.resume)."""

    inputs: InputUri
    name: str = "caption"
    error_columns: tuple[str, str] = (R.ERROR_KIND, R.ERROR_STAGE)
    engine_processor: EngineProcessorFactory = llm_processor

    def check(self, config: PipelineConfig) -> None:
        check_tools(config)

    def committed_rows(self, output: OutputState) -> int:
        return count_committed_rows(output)

    def plan(self, config: PipelineConfig) -> InputPlan:
        return plan_input(config, self.inputs)

    def build(self, config: PipelineConfig, plan: InputPlan, model: ModelPlan, guard: EngineGuardSettings,
              output: OutputState):
        return build_caption_dataset(config, plan, model, guard, self.engine_processor)[0]

    def write(self, config: PipelineConfig, dataset, output: OutputState, attempt: dict[str, Any]) -> None:
        enable_checkpointing(dataset, output)  # on the dataset that is written
        dataset.write_parquet(output.path, filesystem=output.filesystem, max_rows_per_file=config.batch.rows_per_file)

    def manifest(self, config: PipelineConfig, plan: InputPlan, model: ModelPlan, output: OutputState,
                 started: float, finished: float) -> tuple[dict[str, Any], dict[str, Any]]:
        written = pads.dataset(output.path, filesystem=output.filesystem, format="parquet")
        manifest = build_manifest(config=config, input_uri=self.inputs, output_uri=output.uri, rows_in=plan.num_rows,
                                  output=written, checkpoint=model.checkpoint.as_dict(), started=started,
                                  finished=finished)
        return manifest, check_exactly_once(written, plan.num_rows)

    def report(self, config: PipelineConfig, output_uri: str, manifest: dict[str, Any]) -> Optional[str]:
        return write_run_report(config, output_uri, manifest)
