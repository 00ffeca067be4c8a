"""Run an OpenAI Batch job: request files in, output and error files out, on the batch pipeline's engine.

`plan_requests` lists the input files and finds duplicate custom_ids with one pass over the lines;
`build_openai_batch_dataset` returns the lazy dataset of output lines (pipeline.stages.openai_batch);
`run_openai_batch` runs it through the batch skeleton (pipeline.batch.skeleton: lease, resume, crash
isolation, status line, metrics, manifest, report) with `OpenAIBatchFormat`, this format's adapter.
The processor configuration and the engine are the parquet job's (pipeline.batch.caption).

Resume: the lines already in the output (pipeline.openai.batch_written) are dropped right after the read
(`mark_lines`), by their ids, which the request's file and line decide; a rerun writes its files under its
own attempt number, so the killed run's files stay as they are and every request line ends up in exactly
one output or error line.
"""
from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.batch.caption import processor_config
from pipeline.batch.skeleton import (DRIVER_ID_SCAN_MAX_FILES, InputError, ModelPlan, count_ids, count_ids_on_ray,
                             prepare_on_cpu_pool, run_batch)
from pipeline.config import PipelineConfig
from pipeline.stages.crash_isolation import EngineGuardSettings
from pipeline.batch.manifest import assemble_manifest
from pipeline.stages.openai_batch import (
    CUSTOM_ID,
    URI,
    FinalizeLines,
    LineBuilder,
    PrepareRequests,
    RequestBuilder,
    custom_ids,
    mark_lines,
    read_request_lines,
)
from pipeline.openai.batch_written import ERRORS_PREFIX, OUTPUT_PREFIX, delete_partial_files, read_written
from pipeline.batch.resume import OutputState
from pipeline.io.storage import join, make_filesystem

logger = logging.getLogger(__name__)

REQUEST_FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.bz2", ".jsonl.zst")


@dataclass
class RequestFilesPlan:
    """What the driver learns about the request files before any line runs."""

    inputs: list[str]
    files: list[str]
    num_lines: int
    duplicate_ids: frozenset[str]

    @property
    def num_rows(self) -> int:  # the skeleton's name for the total (pipeline.batch.skeleton)
        return self.num_lines


def is_request_file(name: str) -> bool:
    return name.lower().endswith(REQUEST_FILE_SUFFIXES)


def list_request_files(config: PipelineConfig, inputs: Sequence[str]) -> list[str]:
    """Every input that is a file, and the request files (*.jsonl[.gz|.bz2|.zst]) under every prefix."""
    files: list[str] = []
    for uri in inputs:
        filesystem, path = make_filesystem(config.storage, uri)
        info = filesystem.get_file_info(path)
        if info.type == pafs.FileType.File:
            files.append(uri)
        elif info.type == pafs.FileType.Directory:
            found = sorted(entry.path for entry in filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
                           if entry.type == pafs.FileType.File and is_request_file(entry.base_name))
            if not found:
                raise InputError(f"no request files ({', '.join(REQUEST_FILE_SUFFIXES)}) under {uri}")
            files += [join(uri, entry[len(path.rstrip('/')) + 1:]) for entry in found]
        else:
            raise InputError(f"cannot read OpenAI Batch input {uri}: no such file or prefix")
    return files


def read_lines_dataset(config: PipelineConfig, files: Sequence[str]):
    """The numbered lines of every file: one read task per file, so files are read in parallel."""
    import ray

    return ray.data.from_items([{URI: uri} for uri in files], override_num_blocks=len(files)).map_batches(
        read_request_lines, batch_size=1, batch_format="pyarrow",
        fn_kwargs={"storage": config.storage, "max_line_bytes": config.openai_batch.max_request_bytes})


# As for parquet inputs (pipeline.batch.caption.plan_input): a few small uncompressed files are scanned in the
# driver, where Ray Data's groupby would spend 10-20 s on scheduling; anything larger, or compressed
# (whose size on storage says little of its lines), is read by one Ray task per file.
DRIVER_SCAN_MAX_BYTES = 64 * 1024**2


def plan_requests(config: PipelineConfig, inputs: Sequence[str],
                  driver_scan_max_bytes: int = DRIVER_SCAN_MAX_BYTES) -> RequestFilesPlan:
    """List the files, count the lines and find duplicate custom_ids before any engine starts."""
    files = list_request_files(config, inputs)
    here = (len(files) <= DRIVER_ID_SCAN_MAX_FILES and all(f.lower().endswith(".jsonl") for f in files)
            and _total_bytes(config, files) <= driver_scan_max_bytes)
    num_lines, duplicates = _count_ids_here(config, files) if here else _count_ids_on_ray(config, files)
    logger.info("input %s: %d request lines in %d files, %d duplicated custom_ids (counted %s)",
                ", ".join(inputs), num_lines, len(files), len(duplicates),
                "in the driver" if here else "on Ray's workers")
    return RequestFilesPlan(list(inputs), files, num_lines, duplicates)


def _total_bytes(config: PipelineConfig, files: Sequence[str]) -> int:
    total = 0
    for uri in files:
        filesystem, path = make_filesystem(config.storage, uri)
        total += filesystem.get_file_info(path).size or 0
    return total


def _count_ids_here(config: PipelineConfig, files: Sequence[str]) -> tuple[int, frozenset[str]]:
    limit = config.openai_batch.max_request_bytes
    chunks = [custom_ids(block, limit).column(CUSTOM_ID)
              for uri in files
              for block in read_request_lines(pa.table({URI: [uri]}), storage=config.storage, max_line_bytes=limit)]
    num_lines, duplicates, _ = count_ids(pa.chunked_array([c for chunk in chunks for c in chunk.chunks], type=pa.string()))
    return num_lines, duplicates


def _count_ids_on_ray(config: PipelineConfig, files: Sequence[str]) -> tuple[int, frozenset[str]]:
    ids = read_lines_dataset(config, files).map_batches(
        custom_ids, batch_format="pyarrow", fn_kwargs={"max_line_bytes": config.openai_batch.max_request_bytes})
    num_lines, duplicates, _ = count_ids_on_ray(ids, CUSTOM_ID, len(files))
    return num_lines, duplicates


def build_openai_batch_dataset(config: PipelineConfig, plan: RequestFilesPlan, model: ModelPlan,
                               guard: Optional[EngineGuardSettings] = None,
                               written_ids: frozenset[str] = frozenset()):
    """The lazy dataset of output lines (nothing runs until it is written), less the lines whose ids are in
    `written_ids` (a resumed output's); with `guard` the engine stage isolates lines that crash it."""
    from ray.data.llm import build_processor

    from pipeline.stages.openai_batch_template import stage_overrides

    dataset = read_lines_dataset(config, plan.files).map_batches(
        mark_lines, batch_format="pyarrow", fn_kwargs={"written_ids": written_ids})
    # As for parquet records: blocks of at most batch.rows_per_block lines are the unit of commit, so a
    # killed run loses little and its rerun skips the rest (a file's lines are otherwise one block).
    dataset = dataset.repartition(target_num_rows_per_block=config.batch.rows_per_block)
    dataset = prepare_on_cpu_pool(dataset, PrepareRequests, config, model.image_target, plan.duplicate_ids)
    lines = LineBuilder(config.model.served_name, frozenset(model.stop_token_ids))
    override = stage_overrides(config)
    if guard is not None:
        from pipeline.stages.guarded import engine_stage_overrides

        override = engine_stage_overrides(guard, then=override)
    processor = build_processor(
        processor_config(config),
        preprocess=RequestBuilder(model.image_target.size_px),
        postprocess=lines,
        builder_kwargs={"override_stage_config_fn": override},
    )
    return processor(dataset).map_batches(FinalizeLines(lines), batch_format="pyarrow")


def run_openai_batch(config: PipelineConfig, inputs: Sequence[str], output_uri: str, *,
                     overwrite: bool = False) -> dict[str, Any]:
    """Run every request line of `inputs` into output and error files under `output_uri`; returns the
    manifest it wrote. A rerun after a crash resumes (see the module docstring); a complete output is left
    as it is unless `overwrite`."""
    return run_batch(config, OpenAIBatchFormat(list(inputs)), output_uri, overwrite=overwrite)


@dataclass
class OpenAIBatchFormat:
    """The OpenAI Batch adapter of pipeline.batch.skeleton."""

    inputs: list[str]
    name: str = "openai-batch"
    error_columns: tuple[str, str] = ("code", "stage")  # pipeline.stages.openai_batch.OUTPUT_SCHEMA
    written_ids: frozenset[str] = frozenset()
    written: Optional[pa.Table] = field(default=None, repr=False)

    def check(self, config: PipelineConfig) -> None:
        """Nothing to check before the output: requests bring their own tools, and no tables are read."""

    def committed_rows(self, output: OutputState) -> int:
        removed = delete_partial_files(output.filesystem, output.path)
        if removed:
            logger.info("deleted %d partial files a killed writer left under %s", removed, output.uri)
        self.written_ids = frozenset(read_written(output.filesystem, output.path)["id"].to_pylist())
        return len(self.written_ids)

    def plan(self, config: PipelineConfig) -> RequestFilesPlan:
        return plan_requests(config, self.inputs)

    def build(self, config: PipelineConfig, plan: RequestFilesPlan, model: ModelPlan, guard: EngineGuardSettings,
              output: OutputState):
        return build_openai_batch_dataset(config, plan, model, guard, self.written_ids)

    def write(self, config: PipelineConfig, dataset, output: OutputState, attempt: dict[str, Any]) -> None:
        from pipeline.batch.openai_batch_sink import OpenAIBatchSink

        dataset.write_datasink(OpenAIBatchSink(config.storage, output.uri, config.batch.rows_per_file,
                                               attempt=attempt["attempt"]))

    def manifest(self, config: PipelineConfig, plan: RequestFilesPlan, model: ModelPlan, output: OutputState,
                 started: float, finished: float) -> tuple[dict[str, Any], dict[str, Any]]:
        """Counted from every line under the prefix (all attempts' files), as a reader will find them."""
        import pyarrow.compute as pc

        self.written = written = read_written(output.filesystem, output.path)
        failed = written.filter(written["failed"])
        names = sorted(set(written["file"].to_pylist()))
        files = [join(output.uri, name) for name in names]
        ids = written["id"]
        manifest = assemble_manifest(
            config=config, input_uri=plan.inputs if len(plan.inputs) > 1 else plan.inputs[0], output_uri=output.uri,
            files=files, rows_in=plan.num_lines, rows_out=written.num_rows, errors=failed.num_rows,
            errors_by_kind=collections.Counter(c for c in failed["code"].to_pylist() if c is not None),
            # An error line does not say at which stage it failed (the API's format has no place for it);
            # the status line and the metrics count stages while the run goes.
            errors_by_stage={},
            prompt_tokens=pc.sum(written["prompt_tokens"]).as_py() or 0,
            completion_tokens=pc.sum(written["completion_tokens"]).as_py() or 0,
            checkpoint=model.checkpoint.as_dict(), started=started, finished=finished,
            format="openai-batch", input_files=plan.files,
            output_files=[f for f in files if f.rsplit("/", 1)[-1].startswith(OUTPUT_PREFIX + "-")],
            error_files=[f for f in files if f.rsplit("/", 1)[-1].startswith(ERRORS_PREFIX + "-")])
        distinct = len(pc.unique(ids)) if len(ids) else 0
        exactly_once = {"row_key": "id", "rows_out": written.num_rows, "distinct_row_keys": distinct,
                        "exactly_once": written.num_rows == distinct == plan.num_lines and ids.null_count == 0}
        return manifest, exactly_once

    def report(self, config: PipelineConfig, output_uri: str, manifest: dict[str, Any]) -> Optional[str]:
        from pipeline.report.openai_batch import write_openai_batch_report

        return write_openai_batch_report(config, output_uri, manifest, self.written)

