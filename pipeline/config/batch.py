"""The batch job: its stages, the OpenAI Batch format and the run report.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator

from pipeline.config.base import Concurrency, _Section, _check_concurrency


class BatchSection(_Section):
    default_prompt: str = Field(
        default="Describe this image in one detailed paragraph.",
        description="Prompt for records without a `prompt` column value.",
    )
    default_system: Optional[str] = Field(default=None, description="System prompt for records without one.")
    engine_replicas: Concurrency = Field(
        default=(1, 8),
        description="vLLM engine replicas: an int for a fixed pool, or (min, max) to autoscale with the "
        "cluster. Each replica takes tensor_parallel_size x pipeline_parallel_size GPUs.",
    )
    engine_batch_size: int = Field(
        default=64, ge=1,
        description="Rows per engine batch. Larger batches saturate the engine; smaller ones lose less "
        "work when a replica dies.",
    )
    max_concurrent_batches: int = Field(
        default=8, ge=1,
        description="Batches in flight per replica; engine_batch_size x this should exceed max_num_seqs "
        "so the engine never starves between batches.",
    )
    prepare_replicas: Concurrency = Field(
        default=(1, 8),
        description="CPU workers that validate, fetch, decode and resize images: int or (min, max).",
    )
    prepare_batch_size: int = Field(default=16, ge=1, description="Rows per image-preparation batch.")
    prepare_num_cpus: float = Field(default=1.0, gt=0, description="CPUs reserved per preparation worker.")
    prepare_cpu_s_per_image: float = Field(
        default=0.0078, gt=0,
        description="CPU seconds per image of the preparation stages together (parquet read, decode and "
        "resize, the chat template and tokenizer stages), for the CPU budget of --dry-run. The default is "
        "workload W1 (896 x 896 JPEGs in the parquet, 7.8 ms); camera-sized 4032 x 3024 photos (W2) cost "
        "0.061 (docs/batch.md, CPU per GPU). Measure your own images with `python -m bench.prepare_cost`.",
    )
    engine_images_per_s: float = Field(
        default=27.2, gt=0,
        description="Images per second one engine GPU captions, for the CPU budget of --dry-run: the "
        "pipeline's measured W1 rate on an H200 (docs/performance.md). Smaller cards need fewer CPUs per GPU.",
    )
    rows_per_file: int = Field(
        default=10_000, ge=1,
        description="Rows per output parquet file. Smaller files appear sooner and lose less on a crash; "
        "larger ones are cheaper to list and read.",
    )
    passthrough_columns: Optional[list[str]] = Field(
        default=None,
        description="Input columns copied to the output. None copies every column except the image bytes.",
    )
    rows_per_block: int = Field(
        default=256, ge=1,
        description="Input blocks are cut to at most this many rows right after the read; a block is the "
        "unit of resume (its output rows are committed together). Smaller blocks lose less work when a "
        "job dies and show progress sooner; larger ones mean fewer tasks and output files.",
    )
    max_engine_attempts: int = Field(
        default=3, ge=1,
        description="A record whose engine attempts ended this many times in an engine crash is written "
        "as a `poison_record` error row instead of being retried again. After a crash, the records that "
        "were in flight are retried one at a time, so the crash is pinned on the record that causes it.",
    )
    output_lease_ttl_s: float = Field(
        default=300.0, ge=4.0,
        description="One job writes an output prefix at a time: a job holds OUTPUT/_lease, renewing its "
        "heartbeat every ttl/4 seconds, and another job on that prefix is refused (exit 4) until the "
        "heartbeat is older than this (a job that died), or at once when the holder was a process of the "
        "same host that is gone. Must exceed the clock skew between hosts.",
    )

    @field_validator("engine_replicas", "prepare_replicas")
    @classmethod
    def _concurrency(cls, value: Concurrency, info) -> Concurrency:
        return _check_concurrency(value, info.field_name)
InputFormat = Literal["auto", "parquet", "openai-batch"]


class OpenAIBatchSection(_Section):
    """OpenAI Batch API files as the batch job's input and output (pipeline/openai_batch*.py)."""

    input_format: InputFormat = Field(
        default="auto",
        description="'auto' reads JSONL inputs (*.jsonl, *.jsonl.gz, or a prefix holding only those) as "
        "OpenAI Batch request files and anything else as parquet records; or name the format.",
    )
    output_format: InputFormat = Field(
        default="auto",
        description="'auto' writes the input's format: OpenAI Batch output and error files for request "
        "files, parquet rows for parquet records. Other combinations are refused.",
    )
    accepted_model_names: list[str] = Field(
        default_factory=list,
        description="Model names a request's body may name besides model.served_name (e.g. "
        "'gpt-4o-mini', so that files written for OpenAI run unchanged). Any other name is an error "
        "line with code model_not_found.",
    )
    max_request_bytes: int = Field(
        default=48 * 2**20, ge=1024,
        description="Largest request line. Base64 inflates an image by 4/3, so the default leaves room "
        "for one image of images.max_bytes; longer lines become error lines without being parsed.",
    )
    max_tokens_cap: Optional[int] = Field(
        default=None, ge=1,
        description="Largest max_tokens / max_completion_tokens a request may ask for (larger is an error "
        "line). Requests without one get sampling.max_tokens. None means half of engine.max_model_len, or "
        "sampling.max_tokens where that is larger.",
    )


class ReportSection(_Section):
    """What an operator sees of a batch run: the status line while it runs, the report after."""

    enabled: bool = Field(
        default=True,
        description="Write `_report/report.html` (self-contained) and PNG charts under the output prefix "
        "after each run. A failure to write them is logged; it never fails the run.",
    )
    status_interval_s: float = Field(
        default=30.0, gt=0,
        description="Seconds between two status lines on the driver (rows/s, tokens/s, errors, ETA). "
        "Each line costs one call to a small Ray actor.",
    )
    gpu_hourly_usd: Optional[float] = Field(
        default=None, ge=0,
        description="Price of one GPU hour, for the report's cost estimate ($ per 1M images). None leaves "
        "the estimate out. With engine.device=cpu it prices one engine worker hour instead.",
    )
    billed_gpus: Optional[int] = Field(
        default=None, ge=1,
        description="GPUs paid for during the run. None counts the engine's: the largest engine_replicas "
        "x tensor_parallel_size x pipeline_parallel_size, held for the whole wall time.",
    )
    example_ids_per_error_kind: int = Field(
        default=5, ge=0, description="Example ids the report lists for each error kind.",
    )
    max_rows_read: int = Field(
        default=1_000_000, ge=1000,
        description="Output rows the report reads whole for its charts and latency figures. A larger output "
        "is read as a uniform 1-in-2^k sample by row key, and the gallery and error examples from the rows "
        "that carry a thumbnail or an error; every count is still the manifest's, exact. 1M rows cost the "
        "driver ~650 MiB and 13 s on one core (docs/scale.md).",
    )
    gallery_size: int = Field(
        default=24, ge=0, le=500,
        description="Answered rows the report's gallery shows (thumbnail, prompt, text, finish reason, "
        "tokens, tool calls), a fixed-seed sample. 0 turns the gallery off and the CPU workers make no "
        "thumbnails. Each thumbnail is a JPEG of a few KB inline in report.html: 24 keep the page well "
        "under 1 MB.",
    )
    gallery_errors_per_kind: int = Field(
        default=3, ge=0, le=20,
        description="Error rows the gallery shows for each error kind: the thumbnail when the image "
        "decoded and is in the sample, otherwise the row's error message only.",
    )
    gallery_seed: int = Field(
        default=0, ge=0,
        description="Seed of the gallery's sample: the same seed picks the same rows on every run and "
        "rebuild over the same input files.",
    )
    thumbnail_px: int = Field(
        default=128, ge=32, le=384,
        description="Side of the gallery's square thumbnails in pixels (made from the image as the model "
        "sees it). Larger ones cost page size: about 4 KB each at 128.",
    )
