"""Faults and resume, end to end: `python -m jobs.caption` as its own process, the tiny Gemma 3 on the real
vLLM CPU engine, embedded Ray, and a real S3 server (SeaweedFS) for input and output, with faults
injected while the job runs:

- the driver is SIGKILLed (its whole process tree) at ~40% of rows written, and the same command is rerun;
- the vLLM engine core process is SIGKILLed mid-run, and later in the same run (one job for both: each
  costs a couple of minutes here) the S3 server is stopped mid-write and started again;
- a record kills the engine every time it is generated (FakePoison, see tests/fault_injection/fake_poison.py).

The poison-record job runs beside the driver-kill test's jobs (each job spends most of its time starting
processes, which leaves CPU to spare) and has finished before the S3 server is restarted: it has its own
input and output prefixes, its own embedded Ray and its own process tree, so neither job can see the other's
faults.

Each asserts that every input row has exactly one output row, and what the manifest says about it. Faults
are timed on what the output holds (rows committed), never on the clock. Processes are found and stopped
only inside the job's own process tree.
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import StorageSection
from pipeline.io.storage import make_filesystem
from tests.conftest import OFFLINE_ENV, ROOT, TINY_CPU_CONFIG
from tests.fault_injection.fake_poison import FAKE_POISON_ENV

pytestmark = pytest.mark.integration

ROWS = 40
SCHEMA = pa.schema([("id", pa.string()), ("image", pa.binary()), ("prompt", pa.string()), ("n", pa.int32())])
# Blocks of 4 input rows; the engine stage bundles them to its batch of 8, so output is committed 8 rows at a
# time and a 40-row job has several commits to be killed between.
SMALL_BLOCKS = ["--set", "batch.rows_per_block=4", "--set", "batch.rows_per_file=4"]
# For the faults timed on progress: 160 generated tokens per row (the tiny model otherwise stops within a few),
# and one batch of 4 rows at a time in the engine stage, so rows are written a few at a time, one batch after
# another, and the engine is still busy for several batches after the trigger is seen. With every row in
# flight at once, a fast machine generated them all in ~6 s and wrote them together: the job had finished
# when it was killed.
BUSY_ENGINE = ["--set", "sampling.max_tokens=160", "--set", "sampling.ignore_eos=true",
               "--set", "engine.max_num_seqs=4", "--set", "batch.engine_batch_size=4",
               "--set", "batch.max_concurrent_batches=1"]
JOB_TIMEOUT_S = 900


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, size=(48, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


def build_records(count: int) -> list[dict]:
    """`count` records; one without an id and two sharing one, which are written as error rows and must be
    resumed like any other (their key is the row's position, not its id)."""
    records = [{"id": f"rec-{i:02d}", "image": _jpeg(i), "prompt": None if i % 2 else "Caption this.", "n": i}
               for i in range(count)]
    records[5]["id"] = None
    records[11]["id"] = records[12]["id"] = "rec-dup"
    return records


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """This module's own S3 server: one test restarts it, which must not touch the session's server."""
    from pipeline.testing.s3_server import S3Server

    server = S3Server(tmp_path_factory.mktemp("fault-s3")).start()
    server.create_bucket("data")
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def s3_credentials(s3, monkeypatch):
    """This process (pyarrow, boto3) reads the output with the server's credentials from the environment."""
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)


def upload(s3, prefix: str, records: list[dict], files: int = 2) -> str:
    client = s3.client()
    for part in range(files):
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(records[part::files], schema=SCHEMA), buffer)
        client.put_object(Bucket="data", Key=f"{prefix}/part-{part}.parquet", Body=buffer.getvalue())
    return f"s3://data/{prefix}"


class Job:
    """`python -m jobs.caption` in its own session, with its log in a file."""

    def __init__(self, s3, tiny_model: Path, input_uri: str, output_uri: str, log_path: Path, *extra: str,
                 env: dict[str, str] | None = None):
        env = {**os.environ, **OFFLINE_ENV, **s3.env(), **(env or {})}
        env.pop("RAY_ADDRESS", None)
        self.log_path = log_path
        command = [sys.executable, "-m", "jobs.caption", "--input", input_uri, "--output", output_uri,
                   "--config", str(TINY_CPU_CONFIG), "--model", str(tiny_model), *SMALL_BLOCKS, *extra]
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def tree(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def log(self, chars: int = 6000) -> str:
        return self.log_path.read_text()[-chars:]

    def wait(self) -> int:
        try:
            return self.process.wait(timeout=JOB_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the job did not finish in {JOB_TIMEOUT_S}s:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL the driver's process group, then whatever of its tree (Ray, vLLM) lives on, by PID."""
        tree = self.tree()
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=60)
        deadline = time.monotonic() + 30
        for process in tree:
            try:
                if time.monotonic() < deadline and process.is_running():
                    process.kill()
            except psutil.NoSuchProcess:
                pass

    def wait_for(self, condition, what: str, timeout_s: float = JOB_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if self.process.poll() is not None:
                pytest.fail(f"the job exited ({self.process.returncode}) before {what}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"no {what} after {timeout_s}s:\n{self.log()}")
            time.sleep(0.5)


class Output:
    """Reads an output prefix on the test's S3 server."""

    def __init__(self, s3, uri: str):
        self.s3, self.uri = s3, uri
        self.fs, self.path = make_filesystem(StorageSection(endpoint_url=s3.endpoint_url, region="us-east-1",
                                                            max_attempts=2), uri)
        self._rows_by_file: dict[str, int] = {}

    def committed_rows(self) -> int:
        """Rows in the data files written so far (0 while the server is unreachable)."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
            for info in infos:
                name = info.path.rsplit("/", 1)[-1]
                if info.type != pafs.FileType.File or not name.endswith(".parquet") or info.path in self._rows_by_file:
                    continue
                self._rows_by_file[info.path] = pq.ParquetFile(info.path, filesystem=self.fs).metadata.num_rows
        except OSError:
            pass
        return sum(self._rows_by_file.values())

    def table(self) -> pa.Table:
        return pads.dataset(self.path, filesystem=self.fs, format="parquet").to_table()

    def json(self, name: str):
        key = f"{self.path.split('/', 1)[1]}/{name}"
        try:
            return json.loads(self.s3.client().get_object(Bucket="data", Key=key)["Body"].read())
        except self.s3.client().exceptions.NoSuchKey:
            return None

    def multipart_uploads(self) -> list[dict]:
        prefix = self.path.split("/", 1)[1] + "/"
        return self.s3.client().list_multipart_uploads(Bucket="data", Prefix=prefix).get("Uploads", [])


def assert_exactly_once(table: pa.Table, records: list[dict], poison_ids: frozenset = frozenset()) -> None:
    """Every input row has exactly one output row: ids as a multiset (None and the duplicate included), and
    one row per row key; good records succeeded."""
    rows = table.to_pylist()
    assert Counter(r["id"] for r in rows) == Counter(r["id"] for r in records)
    assert len({r["row_hash"] for r in rows}) == len(rows) == len(records)
    assert sorted(r["n"] for r in rows) == sorted(r["n"] for r in records)
    errors = Counter(r["error_kind"] for r in rows if r["error_kind"] is not None)
    assert errors == Counter({"missing_id": 1, "duplicate_id": 2, **({"poison_record": len(poison_ids)}
                                                                        if poison_ids else {})}), errors
    for row in rows:
        if row["error_kind"] is None:
            assert row["text"] and row["completion_tokens"] > 0 and row["prompt_tokens"] > 256, row


def test_driver_killed_at_40_percent_and_rerun_resumes(s3, tiny_model, tmp_path, poison_run):
    # poison_run: that job starts first and runs beside these (see the module's docstring).
    records = build_records(ROWS)
    input_uri = upload(s3, "kill-driver/input", records)
    output = Output(s3, "s3://data/kill-driver/output")
    first = Job(s3, tiny_model, input_uri, output.uri, tmp_path / "run1.log", *BUSY_ENGINE)
    first.wait_for(lambda: output.committed_rows() >= 0.4 * ROWS, "40% of rows written")
    first.kill()
    assert output.json("_manifest.json") is None, "killed before it finished"
    done_when_killed = output.committed_rows()
    assert done_when_killed < ROWS
    killed = output.json("_attempts.json")["attempts"]
    assert [a["status"] for a in killed] == ["running"]

    second = Job(s3, tiny_model, input_uri, output.uri, tmp_path / "run2.log", *BUSY_ENGINE)
    assert second.wait() == 0, second.log()
    assert_exactly_once(output.table(), records)
    manifest = output.json("_manifest.json")
    assert manifest["status"] == "complete" and manifest["resume"]["exactly_once"]
    assert manifest["counts"]["rows_in"] == manifest["counts"]["rows_out"] == ROWS
    first_attempt, second_attempt = manifest["attempts"]
    assert first_attempt["status"] == "interrupted" and "finished" not in first_attempt
    assert second_attempt["status"] == "complete" and second_attempt["mode"] == "resume"
    # Rows committed before the kill were not processed again; the rest reached the engine once each.
    assert second_attempt["rows_done_before"] >= 0.4 * ROWS
    assert second_attempt["engine_requests"] <= ROWS - second_attempt["rows_done_before"] < ROWS
    assert second_attempt["rows_written"] == ROWS - second_attempt["rows_done_before"]
    assert output.multipart_uploads() == [], "the rerun aborted what the killed writer left"
    assert output.fs.get_file_info(f"{output.path}/_checkpoint").type == pafs.FileType.NotFound

    files_before = sorted(output.table().column("row_hash").to_pylist())
    third = Job(s3, tiny_model, input_uri, output.uri, tmp_path / "run3.log", *BUSY_ENGINE)
    assert third.wait() == 0, third.log()
    assert "is already complete" in third.log() and "starting embedded local Ray" not in third.log()
    assert output.json("_manifest.json") == manifest, "a rerun over a complete output changes nothing"
    assert sorted(output.table().column("row_hash").to_pylist()) == files_before


def _is_engine_core(process: psutil.Process) -> bool:
    try:
        return "EngineCore" in process.name() or "EngineCore" in " ".join(process.cmdline())
    except psutil.NoSuchProcess:
        return False


@dataclass
class MidRunFaults:
    records: list[dict]
    output: Output
    rows_at_outage: int


@pytest.fixture(scope="module")
def mid_run_faults(s3, tiny_model, tmp_path_factory, poison_run) -> MidRunFaults:
    """One job that survives two faults in turn, since each job costs a couple of minutes here: its engine
    core is SIGKILLed at ~25% of rows written; once the restarted engine writes rows again, the S3 server
    is stopped for 8 s and started again. The output also starts with what a writer killed mid-upload
    leaves behind: parts of an object that never completes. The poison-record job has finished first, so
    that the outage meets this job's writes only."""
    poison_run.finish()
    with pytest.MonkeyPatch.context() as patch:  # s3_credentials, for this module-scoped run
        for key, value in s3.env().items():
            patch.setenv(key, value)
        records = build_records(ROWS)
        input_uri = upload(s3, "mid-run/input", records)
        output = Output(s3, "s3://data/mid-run/output")
        client = s3.client()
        orphan = client.create_multipart_upload(Bucket="data", Key="mid-run/output/killed-writer.parquet")
        client.upload_part(Bucket="data", Key="mid-run/output/killed-writer.parquet", PartNumber=1,
                           UploadId=orphan["UploadId"], Body=b"x" * 1024)
        assert len(output.multipart_uploads()) == 1

        job = Job(s3, tiny_model, input_uri, output.uri, tmp_path_factory.mktemp("mid-run") / "run.log",
                  *BUSY_ENGINE)
        job.wait_for(lambda: output.committed_rows() >= 0.25 * ROWS, "25% of rows written")
        engines = [p for p in job.tree() if _is_engine_core(p)]
        assert len(engines) == 1, [(p.pid, p.name()) for p in job.tree()]
        engines[0].kill()
        # The outage comes once rows written by the restarted engine show up (so it meets writes, not the
        # engine's restart), and before the last of them.
        job.wait_for(lambda: any(_is_engine_core(p) and p.pid != engines[0].pid for p in job.tree()),
                     "a restarted engine core")
        rows_at_restart = output.committed_rows()
        job.wait_for(lambda: output.committed_rows() > rows_at_restart, "rows written by the restarted engine")
        rows_at_outage = output.committed_rows()
        s3.restart(down_s=8)
        assert job.wait() == 0, job.log()
    return MidRunFaults(records, output, rows_at_outage)


def test_engine_core_killed_mid_run_every_row_still_written(mid_run_faults):
    run = mid_run_faults
    assert_exactly_once(run.output.table(), run.records)
    manifest = run.output.json("_manifest.json")
    assert manifest["status"] == "complete"
    (attempt,) = manifest["attempts"]
    assert attempt["engine_starts"] >= 2, "the engine actor was restarted"
    assert attempt["rows_retried_after_crash"] >= 1, "the rows in flight were retried"
    assert attempt["poison_rows"] == 0


def test_s3_server_restarted_mid_write_loses_nothing(mid_run_faults, s3):
    run = mid_run_faults
    assert run.rows_at_outage < ROWS, "the outage must come while rows are still being written"
    assert_exactly_once(run.output.table(), run.records)
    manifest = run.output.json("_manifest.json")
    assert manifest["status"] == "complete"
    assert manifest["attempts"][0]["aborted_multipart_uploads"] == 1
    assert run.output.multipart_uploads() == []
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket="data", Prefix="mid-run/output/")["Contents"]]
    assert "mid-run/output/killed-writer.parquet" not in keys


class PoisonRun:
    """The poison-record job, started when the first test of this module asks for it; `finish` waits for it."""

    def __init__(self, s3, tiny_model: Path, log_path: Path):
        from transformers import AutoTokenizer

        marker = "<mask>"  # a special token: one id, whatever surrounds it
        marker_ids = AutoTokenizer.from_pretrained(tiny_model)(marker, add_special_tokens=False)["input_ids"]
        self.records = build_records(16)
        self.records[9]["prompt"] = f"Describe {marker} this image."
        input_uri = upload(s3, "poison/input", self.records)
        self.output = Output(s3, "s3://data/poison/output")
        # Armed through the job's environment (its embedded Ray's workers and their engine cores inherit it),
        # never through the config: the test-only plugin must be installed (tests/fault_injection, `make test`).
        assert "fake_poison" in {ep.name for ep in entry_points(group="vllm.general_plugins")}, \
            "the test-only fault injector is not installed: pip install -e tests/fault_injection"
        self.job = Job(s3, tiny_model, input_uri, self.output.uri, log_path, "--set", "batch.max_engine_attempts=2",
                       env={FAKE_POISON_ENV: ",".join(map(str, marker_ids))})
        self.returncode: int | None = None

    def finish(self) -> int:
        if self.returncode is None:
            self.returncode = self.job.wait()
        return self.returncode


@pytest.fixture(scope="module")
def poison_run(s3, tiny_model, tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:  # s3_credentials, for this module-scoped run
        for key, value in s3.env().items():
            patch.setenv(key, value)
        run = PoisonRun(s3, tiny_model, tmp_path_factory.mktemp("poison") / "run.log")
    yield run
    if run.job.process.poll() is None:  # a test that failed before waiting for it
        run.job.kill()


def test_poison_record_is_isolated_after_bounded_retries(poison_run):
    run = poison_run
    assert run.finish() == 0, run.job.log()
    records, output = run.records, run.output
    table = output.table()
    assert_exactly_once(table, records, poison_ids=frozenset({records[9]["id"]}))
    (poison,) = [r for r in table.to_pylist() if r["error_kind"] == "poison_record"]
    assert poison["id"] == records[9]["id"] and poison["error_stage"] == "engine" and poison["text"] is None
    assert poison["error"].startswith("poison_record: the engine crashed on each of this record's last 2 attempts")
    manifest = output.json("_manifest.json")
    assert manifest["status"] == "complete" and manifest["counts"]["errors_by_kind"]["poison_record"] == 1
    (attempt,) = manifest["attempts"]
    # Two crashes (once among its batch-mates, once alone), then isolated without touching the engine.
    assert attempt["engine_starts"] == 3 and attempt["poison_rows"] == 1
