"""The input scan before a job: rows, duplicated ids and rows without id, counted in the driver for small
inputs and by Ray Data's groupby on Ray's workers for large ones (pipeline/batch/caption.py). Both ways must
agree, row for row, on the same files: here a three-file input with a duplicate within a file, one
across files, rows without id, and integer ids (counted as strings, as the job writes them); and the
same for OpenAI Batch request files."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from pipeline.io import records as R
from pipeline.batch.caption import plan_input
from pipeline.config import PipelineConfig


def write_input(directory, id_type):
    files = [["1", "2", "2", None], ["3", "1", None, None], ["4", "5", "6", "7"]]
    directory.mkdir()
    for n, ids in enumerate(files):
        column = pa.array([None if i is None else (int(i) if id_type == "int" else i) for i in ids],
                          type=pa.int64() if id_type == "int" else pa.string())
        pq.write_table(pa.table({R.ID: column, R.IMAGE: pa.array([b"x"] * len(ids), pa.binary())}),
                       directory / f"part-{n}.parquet")
    return str(directory)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("id_type", ["string", "int"])
def test_driver_and_ray_count_the_same_ids(tmp_path, local_ray, id_type, caplog):
    config = PipelineConfig.load(environ={})
    path = write_input(tmp_path / "input", id_type)
    with caplog.at_level("INFO", logger="pipeline.batch.caption"):
        in_driver = plan_input(config, path)
        on_ray = plan_input(config, path, driver_scan_max_rows=0)  # any input is "large": Ray's groupby
    assert [m.split("(counted ")[1] for m in caplog.messages if "(counted " in m] == \
        ["in the driver)", "on Ray's workers)"]
    for plan in (in_driver, on_ray):
        assert plan.num_rows == 12
        assert plan.duplicate_ids == {"1", "2"}
        assert plan.missing_ids == 3


def test_openai_batch_files_driver_and_ray_count_the_same_custom_ids(tmp_path, local_ray, caplog):
    """The same for OpenAI Batch request files (pipeline/batch/openai_batch.py): a duplicate within a file
    and across files, a line that is not JSON, one without custom_id, and a blank line (not a line)."""
    from pipeline.batch.openai_batch import plan_requests

    directory = tmp_path / "requests"
    directory.mkdir()
    line = lambda custom_id: json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions"})
    (directory / "a.jsonl").write_text("\n".join([line("r1"), line("r2"), line("r2"), "{not json", ""]) + "\n")
    (directory / "b.jsonl").write_text("\n".join([line("r3"), line("r1"), json.dumps({"method": "POST"})]) + "\n")
    config = PipelineConfig.load(environ={})
    with caplog.at_level("INFO", logger="pipeline.batch.openai_batch"):
        in_driver = plan_requests(config, [str(directory)])
        on_ray = plan_requests(config, [str(directory)], driver_scan_max_bytes=0)
    assert [m.split("(counted ")[1] for m in caplog.messages if "(counted " in m] == \
        ["in the driver)", "on Ray's workers)"]
    for plan in (in_driver, on_ray):
        assert plan.num_lines == 7
        assert plan.duplicate_ids == {"r1", "r2"}
        assert len(plan.files) == 2
