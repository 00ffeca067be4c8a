"""The batch job's entry point for either input format: parquet records or OpenAI Batch request files.

`input_format` decides from `openai_batch.input_format`, or, when that is 'auto', from the inputs' names:
request files (*.jsonl, *.jsonl.gz...) or a prefix holding only those are OpenAI Batch input, anything
else is parquet (whose reader then reports what is wrong with it). The output follows the input;
asking for the other format is refused.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import pyarrow.fs as pafs

from pipeline.config import ConfigError, PipelineConfig
from pipeline.io.storage import make_filesystem

logger = logging.getLogger(__name__)

OPENAI_BATCH = "openai-batch"
PARQUET = "parquet"


def input_format(config: PipelineConfig, inputs: Sequence[str]) -> str:
    from pipeline.batch.openai_batch import is_request_file

    configured = config.openai_batch.input_format
    if configured != "auto":
        return configured
    if all(is_request_file(uri) or _holds_only_request_files(config, uri) for uri in inputs):
        return OPENAI_BATCH
    return PARQUET


def _holds_only_request_files(config: PipelineConfig, uri: str) -> bool:
    from pipeline.batch.openai_batch import is_request_file

    filesystem, path = make_filesystem(config.storage, uri)
    try:
        if filesystem.get_file_info(path).type != pafs.FileType.Directory:
            return False
        names = [e.base_name for e in filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
                 if e.type == pafs.FileType.File and not e.base_name.startswith(("_", "."))]
    except OSError:
        return False
    return bool(names) and all(is_request_file(name) for name in names)


def run_batch_job(config: PipelineConfig, inputs: Sequence[str], output_uri: str, *,
                  overwrite: bool = False) -> dict[str, Any]:
    """Run the batch job over `inputs` in their format; returns the manifest it wrote."""
    chosen = input_format(config, inputs)
    wanted = config.openai_batch.output_format
    if wanted not in ("auto", chosen):
        raise ConfigError(f"openai_batch.output_format={wanted} with {chosen} input is not supported: the output "
                          f"format follows the input (leave it 'auto' or set it to {chosen!r})")
    logger.info("input format: %s", chosen)
    if chosen == OPENAI_BATCH:
        from pipeline.batch.openai_batch import run_openai_batch

        return run_openai_batch(config, inputs, output_uri, overwrite=overwrite)
    from pipeline.batch.caption import run_caption

    # One file or prefix as given; several are read as one list of files.
    return run_caption(config, inputs[0] if len(inputs) == 1 else list(inputs), output_uri, overwrite=overwrite)
