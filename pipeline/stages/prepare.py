"""CPU stage: validate each record, fetch and decode its image, and hand the engine ready pixels.

Runs as a Ray Data actor pool ahead of the engine. A bad record is never dropped and never raises: it
leaves this stage with `_error*` columns set and no pixels, and every later stage lets it through
untouched until it is written as an error row.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any

import pyarrow as pa

from pipeline.io import records as R
from pipeline.config import PipelineConfig
from pipeline.io.fetch import Fetcher
from pipeline.report.gallery import ThumbnailSampler, sample_keys, sampler_size
from pipeline.io.images import ImageTarget, describe_image, prepare_image, thumbnail_jpeg

logger = logging.getLogger(__name__)

# Columns this stage reads and writes, like Ray's get_required_input_keys().
READS = (R.ID, R.IMAGE, R.IMAGE_URI, R.PROMPT, R.SYSTEM)
WRITES = (R.PIXELS, R.ROW_ERROR, R.ROW_ERROR_KIND, R.ROW_ERROR_STAGE)
# The report gallery's thumbnail: made here, from the decoded image, for a sample of rows (R.THUMBNAIL).
WRITES_THUMBNAIL = (R.THUMBNAIL,)
# Written only when the image_metadata tool is configured: what the stored file was (size, format, EXIF).
WRITES_FOR_TOOLS = (R.IMAGE_INFO,)


class PrepareRecords:
    """Ray Data callable class: one instance per CPU worker, holding its fetcher (and S3 client)."""

    def __init__(self, config: PipelineConfig, target: ImageTarget, duplicate_ids: frozenset[str]):
        self.config = config
        self.target = target
        self.duplicate_ids = duplicate_ids
        self.fetcher = Fetcher(config.fetch, config.storage, max_bytes=config.images.max_bytes)
        self.describe = "image_metadata" in config.tools.builtins
        # Per worker: the k smallest sample keys of decoded rows get a thumbnail (pipeline/report/gallery.py).
        self.thumbnails = ThumbnailSampler(sampler_size(config.report.gallery_size))

    def __call__(self, batch: pa.Table) -> pa.Table:
        started = time.perf_counter()
        present = [c for c in READS if c in batch.column_names]
        rows = batch.select(present).to_pylist()
        pixels: list[bytes | None] = []
        thumbnails: list[bytes | None] = []
        keys = sample_keys(batch[R.ROW_HASH].to_pylist() if R.ROW_HASH in batch.column_names else [None] * len(rows),
                           [row.get(R.ID) for row in rows], self.config.report.gallery_seed)
        infos: list[str | None] = []
        errors: dict[str, list[str | None]] = {c: [] for c in WRITES[1:]}
        for row, key in zip(rows, keys):
            try:
                image, data = self.prepare_one(row)
                pixels.append(image.tobytes())
                # Only a row whose image decoded here: a rejected record (refused path, not an image...)
                # never has a thumbnail, so the report shows nothing of it beyond its error message.
                thumbnails.append(thumbnail_jpeg(image, self.config.report.thumbnail_px)
                                  if self.thumbnails.take(key) else None)
                infos.append(json.dumps(describe_image(data), default=str) if self.describe else None)
                for column in errors:
                    errors[column].append(None)
            except R.RecordError as exc:
                pixels.append(None)
                thumbnails.append(None)
                infos.append(None)
                for column, value in exc.as_columns().items():
                    errors[column].append(value)
        batch = batch.drop_columns([c for c in (R.IMAGE, R.THUMBNAIL) if c in batch.column_names])
        batch = batch.append_column(R.THUMBNAIL, pa.array(thumbnails, type=pa.binary()))
        batch = batch.append_column(R.PIXELS, pa.array(pixels, type=pa.large_binary()))
        for column, values in errors.items():
            batch = batch.append_column(column, pa.array(values, type=pa.string()))
        if self.describe:
            batch = batch.append_column(R.IMAGE_INFO, pa.array(infos, type=pa.string()))
        failed = sum(v is not None for v in errors[R.ROW_ERROR])
        logger.info("prepared %d records (%d errors) in %.2fs", len(rows), failed, time.perf_counter() - started)
        return batch

    def prepare_one(self, row: dict[str, Any]):
        """(the prepared image, the encoded bytes it came from)."""
        R.validate_record(row, self.duplicate_ids)
        data = row.get(R.IMAGE)
        if data is None:
            data = self.fetcher.fetch(row[R.IMAGE_URI])
        return prepare_image(data, self.config.images, self.target), data
