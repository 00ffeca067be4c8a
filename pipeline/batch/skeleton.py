"""The batch job's skeleton, one for every input format: what a run does around the rows themselves.

    plan the model -> claim the output (writer lease) -> decide fresh / resume / complete
      -> plan the input -> record the attempt -> build the dataset (crash-isolated engine)
      -> progress (status line, metrics) -> write -> manifest -> attempt record -> report

A format plugs in as a `BatchFormat` adapter: how its input is planned, how its dataset is built and
written, how a resumed output tells which rows are done, how its manifest counts what was written and how
its report reads it. pipeline.batch.caption (parquet records, `run_caption`) and pipeline.batch.openai_batch (OpenAI
Batch request files, `run_openai_batch`) are such adapters; everything else lives here once, so both
formats resume, isolate engine crashes, print the status line, record metrics and write the report alike.

The order is what makes a run safe to kill and rerun: nothing is read or changed before the lease is
held (a second job is refused before it touches anything), the attempt is recorded before any row is
processed, and the manifest, which says `complete`, is written after every row is (pipeline.batch.resume).
"""
from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Optional, Protocol, Union

import pyarrow as pa

from pipeline.engine.checkpoint import CheckpointInfo, check_checkpoint, check_loadable, inspect_checkpoint, read_checkpoint_file
from pipeline.engine.checkpoint import CheckpointError
from pipeline.config import PipelineConfig
from pipeline.engine.args import GEMMA3_ARCHITECTURE
from pipeline.stages.crash_isolation import EngineGuardSettings, start_row_ledger, stop_row_ledger
from pipeline.io.images import ImageTarget, image_target
from pipeline.batch.output_lease import OutputLease, interrupt_driver
from pipeline.batch.progress import RunProgress
from pipeline.batch.resume import (MANIFEST_NAME, OutputState, begin_attempt, check_output_apart, end_attempt, fail_attempt,
                     finish_manifest, finish_output, prepare_output)
from pipeline.ops.runtime import init_ray
from pipeline.io.storage import join, write_json

logger = logging.getLogger(__name__)

# One file or prefix, or an explicit list of files (all local or all s3://).
InputUri = Union[str, list[str]]

# Inputs up to these sizes have their ids counted in the driver: well under a second, where Ray Data's
# distributed groupby spends 10-20 s on scheduling even for a handful of rows. Larger inputs, or many
# files (each needs opening), go to Ray's CPU workers (`count_ids_on_ray`).
DRIVER_ID_SCAN_MAX_FILES = 64


class InputError(ValueError):
    """The input as a whole cannot be processed (missing contract columns, no files)."""


# ------------------------------------------------------------------------------------------------ plan
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


def count_ids(ids: pa.ChunkedArray) -> tuple[int, frozenset[str], int]:
    """(values, values seen more than once, nulls) of a string column held here."""
    import pyarrow.compute as pc

    counts = pc.value_counts(pc.drop_null(ids))
    duplicates = frozenset(v.as_py() for v, n in zip(counts.field("values"), counts.field("counts")) if n.as_py() > 1)
    return len(ids), duplicates, ids.null_count


def count_ids_on_ray(ids, column: str, n_files: int) -> tuple[int, frozenset[str], int]:
    """The same as `count_ids`, for a Ray dataset's string column, by a distributed groupby.

    Only a summary per block of groups comes back to the driver (its rows, its duplicated ids, its rows
    without id), never the groups themselves: one group per distinct id is the whole input, and 10M of
    them as Python rows would take the driver gigabytes (docs/scale.md)."""
    # Ray's default of 200 shuffle partitions is meant for big data; one per input file is plenty here
    # and keeps small inputs from spawning hundreds of tasks.
    groups = ids.groupby(column, num_partitions=max(1, min(200, n_files))).count()
    summaries = groups.map_batches(functools.partial(_summarize_groups, column=column), batch_format="pyarrow",
                                   zero_copy_batch=True).take_all()
    duplicates = frozenset(i for s in summaries for i in s["duplicates"])
    return sum(s["rows"] for s in summaries), duplicates, sum(s["missing"] for s in summaries)


def _summarize_groups(groups: pa.Table, column: str) -> pa.Table:
    """One row for a block of (id, count()) groups: rows counted, ids seen more than once, rows without id."""
    import pyarrow.compute as pc

    counts, values = groups["count()"], groups[column]
    duplicated = pc.filter(values, pc.and_(pc.greater(counts, 1), pc.is_valid(values)))
    return pa.table({"rows": [pc.sum(counts).as_py() or 0],
                     "duplicates": pa.array([duplicated.to_pylist()], pa.list_(pa.string())),
                     "missing": [pc.sum(pc.filter(counts, pc.is_null(values))).as_py() or 0]})


# -------------------------------------------------------------------------------------------- adapter
def prepare_on_cpu_pool(dataset, udf: type, config: PipelineConfig, target: ImageTarget,
                        duplicate_ids: frozenset[str]):
    """`udf` (fetch, decode, resize: each format's record preparation) on the CPU actor pool of
    batch.prepare_replicas, batch.prepare_batch_size rows a call, for either format."""
    import ray

    from pipeline.engine.args import fixed_or_range

    low, high = fixed_or_range(config.batch.prepare_replicas)
    return dataset.map_batches(
        udf,
        fn_constructor_kwargs={"config": config, "target": target, "duplicate_ids": duplicate_ids},
        batch_size=config.batch.prepare_batch_size,
        batch_format="pyarrow",
        num_cpus=config.batch.prepare_num_cpus,
        compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high),
    )


class InputPlanLike(Protocol):
    num_rows: int


class BatchFormat(Protocol):
    """What a format brings to the skeleton. `inputs` as given on the command line (fingerprinted,
    recorded in _attempts.json); `name` names the run's row ledger; `error_columns` are the (kind, stage)
    columns of the rows its dataset yields, which the status line and the metrics count."""

    inputs: InputUri
    name: str
    error_columns: tuple[str, str]

    def check(self, config: PipelineConfig) -> None:
        """Fail before the output is touched when the whole job could not succeed (a tool table)."""

    def committed_rows(self, output: OutputState) -> int:
        """A partial output being resumed: the rows it already holds, which this run must not redo."""

    def plan(self, config: PipelineConfig) -> InputPlanLike:
        """Look at the input (schema, row count, duplicate ids) before any engine starts."""

    def build(self, config: PipelineConfig, plan: Any, model: ModelPlan, guard: EngineGuardSettings,
              output: OutputState):
        """The lazy dataset of output rows still to write (nothing runs until it is written)."""

    def write(self, config: PipelineConfig, dataset, output: OutputState, attempt: dict[str, Any]) -> None:
        """Execute the dataset into the output prefix, so that a rerun resumes what this left."""

    def manifest(self, config: PipelineConfig, plan: Any, model: ModelPlan, output: OutputState,
                 started: float, finished: float) -> tuple[dict[str, Any], dict[str, Any]]:
        """(manifest, exactly-once facts) read back from what the output holds now (all attempts)."""

    def report(self, config: PipelineConfig, output_uri: str, manifest: dict[str, Any]) -> Optional[str]:
        """Write `_report/report.html`; a report that fails is logged, never raised."""


# -------------------------------------------------------------------------------------------- the run
def run_batch(config: PipelineConfig, job: BatchFormat, output_uri: str, *, overwrite: bool = False) -> dict[str, Any]:
    """Run `job` into `output_uri`; returns the manifest it wrote (or the complete one it found).

    Rerunning after a crash resumes: only rows without output are processed, each input row ends with
    exactly one output row; a complete output is left as it is unless `overwrite` (pipeline.batch.resume). The
    job holds the output prefix's writer lease from before it looks at the prefix until after the
    manifest; another live job's lease refuses this one (OutputInUseError) before anything is changed
    (pipeline.batch.output_lease).
    """
    started = time.time()
    config = config.with_absolute_paths()
    check_output_apart(job.inputs, output_uri)
    lease = OutputLease.for_output(config.storage, output_uri, ttl_s=config.batch.output_lease_ttl_s,
                                   on_lost=interrupt_driver())
    with lease:  # first: a job refused here has read nothing else and changed nothing
        try:
            return _run_holding_lease(config, job, output_uri, overwrite, lease, started)
        except KeyboardInterrupt:
            if lease.lost:  # the heartbeat interrupted this run: another job took the prefix over
                lease.check_held()
            raise


def _run_holding_lease(config: PipelineConfig, job: BatchFormat, output_uri: str, overwrite: bool,
                       lease: OutputLease, started: float) -> dict[str, Any]:
    model = plan_model(config)
    job.check(config)
    output = prepare_output(config, job.inputs, output_uri, overwrite=overwrite, committed_rows=job.committed_rows)
    if output.complete:
        return output.manifest
    init_ray(config)
    plan = job.plan(config)
    # ---- one attempt: recorded in _attempts.json (pipeline.batch.resume), engine crashes counted (pipeline.stages.crash_isolation)
    attempt = begin_attempt(config, output, job.inputs)
    ledger, ledger_name = start_row_ledger(job.name)
    try:
        guard = EngineGuardSettings(ledger_name=ledger_name, max_engine_attempts=config.batch.max_engine_attempts)
        dataset = job.build(config, plan, model, guard, output)
        # Status line + counters (pipeline/batch/progress.py), over the rows this attempt still has to do.
        with RunProgress(config, plan.num_rows - output.rows_done, error_columns=job.error_columns) as progress:
            job.write(config, progress.observe(dataset), output, attempt)
    except BaseException as exc:
        engine = stop_row_ledger(ledger)
        if not lease.lost:  # a job that lost the prefix leaves its new owner's _attempts.json alone
            fail_attempt(config, output, job.inputs, attempt, exc, **engine)
        raise
    engine = stop_row_ledger(ledger)
    lease.check_held()
    finished = time.time()
    manifest, exactly_once = job.manifest(config, plan, model, output, started, finished)
    end_attempt(config, output, job.inputs, attempt, "complete" if exactly_once["exactly_once"] else "incomplete",
                rows_written=exactly_once["rows_out"] - output.rows_done, **engine)
    manifest = finish_manifest(manifest, output, exactly_once)
    write_json(config.storage, join(output_uri, MANIFEST_NAME), manifest)
    finish_output(config, output, manifest)
    job.report(config, output_uri, manifest)  # _report/report.html + charts; logs, never raises
    # ----
    logger.info("wrote %d rows (%d errors) to %s in %.1fs", manifest["counts"]["rows_out"],
                manifest["counts"]["errors"], output_uri, finished - started)
    return manifest
