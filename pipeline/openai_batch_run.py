"""Run an OpenAI Batch job: request files in, output and error files out, on the batch pipeline's engine.

`plan_requests` lists the input files and finds duplicate custom_ids with one pass over the lines;
`build_openai_batch_dataset` returns the lazy dataset of output lines (pipeline.openai_batch_stages);
`run_openai_batch` writes them (pipeline.openai_batch_sink) and the manifest, and returns the manifest.
The model checks, the processor configuration and the engine are the parquet job's (pipeline.batch).
"""
from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Sequence

import pyarrow.fs as pafs

from .batch import (MANIFEST_NAME, InputError, ModelPlan, OutputExistsError, count_ids, count_ids_on_ray, plan_model,
                    processor_config)
from .config import PipelineConfig
from .engine import fixed_or_range
from .manifest import package_versions
from .openai_batch_stages import (
    CUSTOM_ID,
    URI,
    FinalizeLines,
    LineBuilder,
    PrepareRequests,
    RequestBuilder,
    custom_ids,
    read_request_lines,
)
from .output_lease import OutputLease, interrupt_driver
from .resume import check_output_apart, delete_entries, output_entries
from .runtime import init_ray
from .storage import join, make_filesystem, read_json, write_json

logger = logging.getLogger(__name__)

REQUEST_FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.bz2", ".jsonl.zst")


@dataclass
class RequestFilesPlan:
    inputs: list[str]
    files: list[str]
    num_lines: int
    duplicate_ids: frozenset[str]


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


# As for parquet inputs (pipeline.batch.plan_input): a few small uncompressed files are scanned in the
# driver, where Ray Data's groupby would spend 10-20 s on scheduling; anything larger, or compressed
# (whose size on storage says little of its lines), is read by one Ray task per file.
DRIVER_SCAN_MAX_BYTES = 64 * 1024**2
DRIVER_SCAN_MAX_FILES = 64


def plan_requests(config: PipelineConfig, inputs: Sequence[str],
                  driver_scan_max_bytes: int = DRIVER_SCAN_MAX_BYTES) -> RequestFilesPlan:
    """List the files, count the lines and find duplicate custom_ids before any engine starts."""
    files = list_request_files(config, inputs)
    here = (len(files) <= DRIVER_SCAN_MAX_FILES and all(f.lower().endswith(".jsonl") for f in files)
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
    import pyarrow as pa

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


def build_openai_batch_dataset(config: PipelineConfig, plan: RequestFilesPlan, model: ModelPlan):
    """The lazy dataset of output lines (nothing runs until it is written)."""
    import ray
    from ray.data.llm import build_processor

    from .openai_batch_template import stage_overrides

    low, high = fixed_or_range(config.batch.prepare_replicas)
    dataset = read_lines_dataset(config, plan.files).map_batches(
        PrepareRequests,
        fn_constructor_kwargs={"config": config, "target": model.image_target, "duplicate_ids": plan.duplicate_ids},
        batch_size=config.batch.prepare_batch_size,
        batch_format="pyarrow",
        num_cpus=config.batch.prepare_num_cpus,
        compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high),
    )
    lines = LineBuilder(config.model.served_name, frozenset(model.stop_token_ids))
    processor = build_processor(
        processor_config(config),
        preprocess=RequestBuilder(model.image_target.size_px),
        postprocess=lines,
        builder_kwargs={"override_stage_config_fn": stage_overrides(config)},
    )
    return processor(dataset).map_batches(FinalizeLines(lines), batch_format="pyarrow")


def run_openai_batch(config: PipelineConfig, inputs: Sequence[str], output_uri: str, *,
                     overwrite: bool = False) -> dict[str, Any]:
    """Run every request line of `inputs` into output and error files under `output_uri`; returns the
    manifest it wrote."""
    from .openai_batch_sink import OpenAIBatchSink

    started = time.time()
    config = config.with_absolute_paths()
    check_output_apart(list(inputs), output_uri)
    # One writer per output prefix, as for parquet jobs (pipeline.output_lease).
    lease = OutputLease.for_output(config.storage, output_uri, ttl_s=config.batch.output_lease_ttl_s,
                                   on_lost=interrupt_driver())
    with lease:
        try:
            model = plan_model(config)
            _refuse_or_clear_output(config, output_uri, overwrite)
            init_ray(config)
            plan = plan_requests(config, inputs)
            dataset = build_openai_batch_dataset(config, plan, model)
            sink = OpenAIBatchSink(config.storage, output_uri, config.batch.rows_per_file)
            dataset.write_datasink(sink)
        except KeyboardInterrupt:
            if lease.lost:
                lease.check_held()
            raise
        lease.check_held()
        finished = time.time()
        manifest = build_manifest(config, plan, output_uri, sink.result or {}, model, started, finished)
        write_json(config.storage, join(output_uri, MANIFEST_NAME), manifest)
    logger.info("wrote %d lines (%d errors) to %s in %.1fs", manifest["counts"]["rows_out"],
                manifest["counts"]["errors"], output_uri, finished - started)
    return manifest


def _refuse_or_clear_output(config: PipelineConfig, output_uri: str, overwrite: bool) -> None:
    """As the parquet job does: an output prefix that holds files needs --overwrite, which empties it."""
    filesystem, path = make_filesystem(config.storage, output_uri)
    entries = output_entries(filesystem, path)
    if not entries:
        return
    if not overwrite:
        state = "a finished run" if read_json(config.storage, join(output_uri, MANIFEST_NAME)) else \
            "files from an earlier run"
        raise OutputExistsError(f"{output_uri} already holds {state}; pass --overwrite to replace it")
    logger.warning("overwriting %s (%d entries)", output_uri, len(entries))
    delete_entries(filesystem, entries)


def build_manifest(config: PipelineConfig, plan: RequestFilesPlan, output_uri: str, written: dict[str, Any],
                   model: ModelPlan, started: float, finished: float) -> dict[str, Any]:
    """The parquet job's manifest fields, counted by the write tasks as they wrote each line."""
    ok, errors = written.get("ok", 0), written.get("errors", 0)
    prompt, completion = written.get("prompt_tokens", 0), written.get("completion_tokens", 0)
    wall_s = max(finished - started, 1e-9)
    files = written.get("files", [])
    return {
        "status": "complete" if ok + errors == plan.num_lines else "incomplete",
        "format": "openai-batch",
        "input": plan.inputs if len(plan.inputs) > 1 else plan.inputs[0],
        "input_files": plan.files,
        "output": output_uri,
        "files": files,
        "output_files": [f for f in files if f.rsplit("/", 1)[-1].startswith("output-")],
        "error_files": [f for f in files if f.rsplit("/", 1)[-1].startswith("errors-")],
        "started": _iso(started),
        "finished": _iso(finished),
        "wall_s": round(wall_s, 3),
        "counts": {"rows_in": plan.num_lines, "rows_out": ok + errors, "ok": ok, "errors": errors,
                   "errors_by_kind": written.get("errors_by_kind", {}),
                   "errors_by_stage": written.get("errors_by_stage", {})},
        "tokens": {"prompt": prompt, "completion": completion},
        "throughput": {"rows_per_s": round((ok + errors) / wall_s, 3),
                       "completion_tokens_per_s": round(completion / wall_s, 3),
                       "total_tokens_per_s": round((prompt + completion) / wall_s, 3)},
        "model": model.checkpoint.as_dict(),
        "config": config.model_dump(mode="json"),
        "versions": package_versions(),
        "host": socket.gethostname(),
    }


def _iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, tz=timezone.utc).isoformat(timespec="seconds")
