"""One writer per output prefix, end to end: `python -m jobs.caption` processes on the real S3 server
(SeaweedFS), the tiny Gemma 3 on the real vLLM CPU engine, embedded Ray.

One job starts the engine; every other job here is refused before it starts Ray or an engine:

- while the first job writes (its driver paused with SIGSTOP once rows are committed, so that it cannot
  finish while the others run; its lease stays live, as a slow job's would), a second job on the same
  prefix, and then one with --overwrite, are refused with exit 4 and one line naming the holder, and
  change nothing; resumed, the first job completes with every input row exactly once, in one attempt;
- over the complete output, a rerun with another default prompt is refused (exit 2) naming the setting;
- --overwrite with the input under the output prefix is refused (exit 2) and the input is intact.
"""
from __future__ import annotations

import io
import signal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import TINY_CPU_CONFIG, run_job
from tests.integration.test_faults import SCHEMA, Job, Output, assert_exactly_once, build_records, upload

pytestmark = pytest.mark.integration

ROWS = 40


def listing(s3_server, prefix: str) -> dict[str, str]:
    """Every object under the prefix with its ETag: what a refused job must leave as it is."""
    pages = s3_server.client().get_paginator("list_objects_v2").paginate(Bucket="data", Prefix=prefix)
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}


def caption(s3_server, tiny_model, *args: str):
    return run_job("jobs.caption", "--config", str(TINY_CPU_CONFIG), "--model", str(tiny_model), *args,
                   env=s3_server.env(), timeout_s=300)


def test_a_second_job_on_a_running_jobs_prefix_is_refused_and_the_first_completes_once(s3_server, s3_env,
                                                                                      tiny_model, tmp_path):
    records = build_records(ROWS)
    input_uri = upload(s3_server, "writers/input", records)
    output = Output(s3_server, "s3://data/writers/output")
    first = Job(s3_server, tiny_model, input_uri, output.uri, tmp_path / "first.log")
    paused = False
    try:
        first.wait_for(lambda: output.committed_rows() > 0, "rows written by the first job")
        first.process.send_signal(signal.SIGSTOP)  # the driver only: it holds the lease and writes the manifest
        paused = True
        assert output.json("_manifest.json") is None and output.committed_rows() < ROWS, \
            "the first job must still be running when the others start"
        before = listing(s3_server, "writers/output/")
        assert any(key.startswith("writers/output/_lease/") for key in before)
        lease = output.json(next(k for k in before if "/_lease/" in k).split("writers/output/", 1)[1])
        assert lease["pid"] == first.process.pid

        for extra in ([], ["--overwrite"]):
            second = caption(s3_server, tiny_model, "--input", input_uri, "--output", output.uri, *extra)
            assert second.returncode == 4, second.stderr[-4000:]
            (line,) = [entry for entry in second.stderr.splitlines() if "in use by another job" in entry]
            assert f"output {output.uri} is in use by another job (job {lease['job_id']}" in line
            assert f"pid {first.process.pid}" in line and "nothing was changed" in line
            assert "starting embedded local Ray" not in second.stderr
            assert listing(s3_server, "writers/output/") == before, f"{extra}: the refused job changed nothing"
        assert [a["status"] for a in output.json("_attempts.json")["attempts"]] == ["running"]

        first.process.send_signal(signal.SIGCONT)
        paused = False
        assert first.wait() == 0, first.log()
    finally:
        if paused:
            first.process.send_signal(signal.SIGCONT)
        if first.process.poll() is None:
            first.kill()
    assert_exactly_once(output.table(), records)
    manifest = output.json("_manifest.json")
    assert manifest["status"] == "complete" and manifest["resume"]["exactly_once"]
    (attempt,) = manifest["attempts"]
    assert attempt["status"] == "complete" and attempt["mode"] == "fresh"
    assert attempt["engine_requests"] <= ROWS, "no row went to the engine twice"
    assert not [k for k in listing(s3_server, "writers/output/") if "/_lease/" in k], "the lease was released"

    # A rerun with another prompt over the complete output: refused, naming what differs.
    changed = caption(s3_server, tiny_model, "--input", input_uri, "--output", output.uri,
                      "--set", "batch.default_prompt=Describe only the colours.")
    assert changed.returncode == 2, changed.stderr[-4000:]
    assert (f"{output.uri} is complete made with other model, sampling, image, tool or prompt settings "
            "(batch.default_prompt differ)") in changed.stderr
    assert "starting embedded local Ray" not in changed.stderr
    assert output.json("_manifest.json") == manifest
    same = caption(s3_server, tiny_model, "--input", input_uri, "--output", output.uri)
    assert same.returncode == 0 and "is already complete" in same.stderr, same.stderr[-4000:]


def test_overwrite_refuses_an_output_prefix_that_holds_the_input(s3_server, s3_env, tiny_model):
    client = s3_server.client()
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(build_records(16), schema=SCHEMA), buffer)
    client.put_object(Bucket="data", Key="nested/out/records/part-0.parquet", Body=buffer.getvalue())
    before = listing(s3_server, "nested/")
    result = caption(s3_server, tiny_model, "--input", "s3://data/nested/out/records", "--output",
                     "s3://data/nested/out", "--overwrite")
    assert result.returncode == 2, result.stderr[-4000:]
    assert ("the output prefix s3://data/nested/out contains the input s3://data/nested/out/records: refused "
            "(--overwrite would delete the input)") in result.stderr
    assert listing(s3_server, "nested/") == before, "the input is intact"
