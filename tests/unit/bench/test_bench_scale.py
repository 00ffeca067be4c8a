"""The data-plane scale bench's parts that need no cluster: the STAND-IN engine (no model: a fixed
answer between the job's real RequestBuilder and OutputBuilder), its pacing, and the cost fit."""
import time

import pyarrow as pa
from PIL import Image

from bench.scale import fit, write_records
from pipeline.config import PipelineConfig
from pipeline.io import records as R
from pipeline.stages.engine_rows import INFERENCE_ERROR, FinalizeRows, OutputBuilder, RequestBuilder
from pipeline.testing.standin_engine import STANDIN_TEXT, StandInEngine

CONFIG = PipelineConfig.load(overrides=["sampling.max_tokens=8"], environ={})
SCHEMA = R.output_schema(pa.schema([("id", pa.string()), ("image", pa.binary()), ("prompt", pa.string())]))


def _standin(rows_per_s=0.0):
    outputs = OutputBuilder(CONFIG, SCHEMA, stop_token_ids=[1])
    return StandInEngine(RequestBuilder(CONFIG, 8, SCHEMA), outputs, rows_per_s), outputs


def test_standin_answers_through_the_jobs_own_request_and_output_builders():
    engine, outputs = _standin()
    pixels = Image.new("RGB", (8, 8)).tobytes()
    ok = engine({"id": "a", R.ROW_HASH: 5, R.PIXELS: pixels, "prompt": "Say it."})
    assert ok[R.TEXT] == STANDIN_TEXT and ok[R.FINISH_REASON] == "stop" and ok[R.ID] == "a"
    assert ok[R.PROMPT] == "Say it." and ok[R.ERROR] is None
    bad = engine({"id": "b", R.ROW_HASH: 6, R.ROW_ERROR: "not_an_image: x", R.ROW_ERROR_KIND: "not_an_image",
                  R.ROW_ERROR_STAGE: "image"})
    assert bad[INFERENCE_ERROR] == "not_an_image: x", "an error row passes the engine untouched, as Ray's stages"
    # The job's last map turns it into an error row of the output schema, as it does after Ray's processor.
    error_row = {k: bad[k] for k in (R.ID, R.ROW_HASH, INFERENCE_ERROR, R.ROW_ERROR, R.ROW_ERROR_KIND, R.ROW_ERROR_STAGE)}
    final = FinalizeRows(outputs)(pa.Table.from_pylist([error_row]))
    assert final.column(R.ERROR_KIND).to_pylist() == ["not_an_image"] and final.column(R.TEXT).to_pylist() == [None]


def test_a_paced_standin_answers_at_its_rate():
    engine, _ = _standin(rows_per_s=200)
    pixels = Image.new("RGB", (8, 8)).tobytes()
    started = time.monotonic()
    for i in range(21):
        engine({"id": str(i), R.ROW_HASH: i, R.PIXELS: pixels})
    assert time.monotonic() - started >= 20 / 200


def test_fit_is_linear_for_linear_costs_and_flags_faster_growth():
    linear = fit([(100_000, 11.0), (1_000_000, 101.0), (300_000, 31.0)])
    assert linear == {"a": 1.0, "b_per_million": 100.0, "loglog_slope": 0.963}
    quadratic = fit([(1_000, 1.0), (10_000, 100.0)])
    assert quadratic["loglog_slope"] == 2.0
    assert fit([(1_000, 1.0)]) is None


def test_records_have_distinct_ids_in_files_of_the_given_size(tmp_path):
    import pyarrow.dataset as pads

    write_records(tmp_path, 25, 10)
    table = pads.dataset(tmp_path, format="parquet").to_table()
    assert len(list(tmp_path.glob("*.parquet"))) == 3
    assert table.num_rows == 25 and len(set(table.column("id").to_pylist())) == 25
