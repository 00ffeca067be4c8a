"""The manifest's counts, read from a parquet output batch by batch."""
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline.batch.manifest import build_manifest
from pipeline.config import PipelineConfig
from pipeline.io import records as R

SCHEMA = pa.schema([(R.ID, pa.string()), (R.ERROR_KIND, pa.string()), (R.ERROR_STAGE, pa.string()),
                    (R.PROMPT_TOKENS, pa.int64()), (R.COMPLETION_TOKENS, pa.int64())])


def test_counts_add_up_over_files_and_small_row_groups(tmp_path):
    rows = [("a", None, None, 300, 20), ("b", "not_an_image", "image", None, None), ("c", None, None, 310, 21),
            ("d", "engine_error", "engine", None, None), ("e", "not_an_image", "image", None, None)]
    for n, chunk in enumerate((rows[:2], rows[2:])):
        table = pa.Table.from_pylist([dict(zip(SCHEMA.names, r)) for r in chunk], schema=SCHEMA)
        pq.write_table(table, tmp_path / f"part-{n}.parquet", row_group_size=1)
    manifest = build_manifest(config=PipelineConfig.load(environ={}), input_uri="in", output_uri=str(tmp_path),
                              rows_in=5, output=pads.dataset(str(tmp_path), format="parquet"), checkpoint={},
                              started=0.0, finished=10.0)
    counts = manifest["counts"]
    assert counts["rows_out"] == 5 and counts["errors"] == 3 and counts["ok"] == 2
    assert counts["errors_by_kind"] == {"engine_error": 1, "not_an_image": 2}
    assert counts["errors_by_stage"] == {"engine": 1, "image": 2}
    assert manifest["tokens"]["prompt"] == 610 and manifest["tokens"]["completion"] == 41
