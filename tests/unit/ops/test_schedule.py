"""Scheduled ticks on a local output prefix: which files each tick captions, failures, overlap, settling.

The caption job itself is replaced by FakeCaptionRunner: it needs a vLLM engine, which the integration
tests run for real (tests/integration/test_ops_cluster.py); what is tested here is the ledger's choice of
files, which does not depend on what captioning writes.
"""
import json
import logging
import threading
from datetime import datetime, timedelta, timezone

import pytest

from jobs import schedule as schedule_cli
from pipeline.config import StorageSection
from pipeline.ops.ledger import FAILED, RUNNING, SUCCEEDED, Ledger, list_input_files, open_store
from pipeline.ops.schedule import (RunFailed, ScheduleError, TickRequest, TickResult, check_cron, check_prefixes,
                               run_schedule, run_tick)


class FakeCaptionRunner:
    """Records the files of each run and writes a manifest like the caption job; can fail or block."""

    mode = "fake"

    def __init__(self, fail: bool = False, gate: threading.Event | None = None):
        self.fail, self.gate, self.runs = fail, gate, []
        self.started = threading.Event()

    def run(self, run, on_submitted):
        self.runs.append(sorted(f.uri.rsplit("/", 1)[-1] for f in run.files))
        listed = open(run.input_list_uri).read().split()
        assert listed == [f.uri for f in run.files], "the job gets exactly the claimed files"
        import os

        os.makedirs(run.output_uri, exist_ok=True)
        with open(os.path.join(run.output_uri, "part-0.parquet"), "wb") as out:
            out.write(b"PAR1")
        self.started.set()
        if self.gate is not None:
            self.gate.wait(timeout=30)
        if self.fail:
            raise RunFailed("caption job exited with 2")
        with open(os.path.join(run.output_uri, "_manifest.json"), "w") as out:
            json.dump({"status": "complete"}, out)
        return {"rows_out": len(run.files)}


def add_input(root, name):
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"PAR1 " + name.encode())
    return path


@pytest.fixture
def prefixes(tmp_path):
    inputs, output = tmp_path / "incoming", tmp_path / "captions"
    for name in ("a.parquet", "b.parquet"):
        add_input(inputs, name)
    return inputs, output


def request(prefixes, **kwargs):
    inputs, output = prefixes
    return TickRequest(str(inputs), str(output), StorageSection(), **kwargs)


def test_second_tick_captions_only_new_files(prefixes):
    inputs, output = prefixes
    runner = FakeCaptionRunner()
    first = run_tick(request(prefixes), runner)
    assert first.status == "succeeded" and first.claimed == 2 and first.listed == 2
    add_input(inputs, "c.parquet")
    second = run_tick(request(prefixes), runner)
    assert second.status == "succeeded" and second.listed == 3 and second.new == 1
    third = run_tick(request(prefixes), runner)
    assert third.status == "idle" and third.run_id is None
    assert runner.runs == [["a.parquet", "b.parquet"], ["c.parquet"]]

    ledger = Ledger(open_store(StorageSection(), str(output)), lease_s=900)
    records = {r["run_id"]: r for r in ledger.runs()}
    assert set(records) == {first.run_id, second.run_id}
    assert records[second.run_id]["status"] == SUCCEEDED and records[second.run_id]["summary"] == {"rows_out": 1}
    assert [f["uri"] for f in records[second.run_id]["files"]] == [str(inputs / "c.parquet")]
    assert (output / "runs" / second.run_id / "_manifest.json").exists()


def test_a_rewritten_file_is_captioned_again(prefixes):
    inputs, _ = prefixes
    runner = FakeCaptionRunner()
    run_tick(request(prefixes), runner)
    add_input(inputs, "a.parquet").write_bytes(b"PAR1 new content, new size")
    assert run_tick(request(prefixes), runner).claimed == 1
    assert runner.runs[-1] == ["a.parquet"]


def test_failed_tick_is_retried_by_the_next(prefixes):
    _, output = prefixes
    failed = run_tick(request(prefixes), FakeCaptionRunner(fail=True))
    assert failed.status == "failed" and "caption job exited with 2" in failed.error
    assert not (output / "runs" / failed.run_id).exists(), "partial output is discarded"
    record = Ledger(open_store(StorageSection(), str(output)), lease_s=900).read_run(failed.run_id)
    assert record["status"] == FAILED and "RunFailed" in record["error"] and record["finished_at"]

    runner = FakeCaptionRunner()
    retry = run_tick(request(prefixes), runner)
    assert retry.status == "succeeded" and runner.runs == [["a.parquet", "b.parquet"]]


def test_overlapping_ticks_never_share_a_file(prefixes):
    inputs, _ = prefixes
    gate = threading.Event()
    slow = FakeCaptionRunner(gate=gate)
    results = {}
    first = threading.Thread(target=lambda: results.update(first=run_tick(request(prefixes), slow)))
    first.start()
    assert slow.started.wait(30)
    add_input(inputs, "c.parquet")
    quick = FakeCaptionRunner()
    overlapping = run_tick(request(prefixes), quick)
    assert overlapping.status == "succeeded" and overlapping.in_flight == 2
    assert quick.runs == [["c.parquet"]], "the running tick's files are left alone"
    nothing = run_tick(request(prefixes), FakeCaptionRunner())
    assert nothing.status == "idle" and nothing.in_flight == 2
    gate.set()
    first.join(30)
    assert results["first"].status == "succeeded" and slow.runs == [["a.parquet", "b.parquet"]]
    assert run_tick(request(prefixes), FakeCaptionRunner()).status == "idle"


def test_max_files_splits_a_backlog(prefixes):
    inputs, _ = prefixes
    add_input(inputs, "c.parquet")
    runner = FakeCaptionRunner()
    assert run_tick(request(prefixes, max_files=2), runner).claimed == 2
    assert run_tick(request(prefixes, max_files=2), runner).claimed == 1
    assert runner.runs == [["a.parquet", "b.parquet"], ["c.parquet"]]


def _abandoned_run(prefixes, with_manifest: bool, job=None):
    """A tick that claimed a.parquet and b.parquet and vanished without a word (killed), long ago."""
    inputs, output = prefixes
    ledger = Ledger(open_store(StorageSection(), str(output)), lease_s=900, clock=lambda: 1000.0)
    files = list_input_files(StorageSection(), str(inputs))
    assert len(ledger.claim(files, "20200101T000000Z-dead00", run_state=lambda r: None).claimed) == 2
    run_output = output / "runs" / "20200101T000000Z-dead00"
    run_output.mkdir(parents=True)
    (run_output / "part-0.parquet").write_bytes(b"PAR1")
    if with_manifest:
        (run_output / "_manifest.json").write_text("{}")
    ledger.write_run({"run_id": "20200101T000000Z-dead00", "status": RUNNING, "heartbeat_at": 1000.0,
                      "output": str(run_output), "job": job, "files": [f.as_dict() for f in files]})
    return ledger, run_output


def test_a_vanished_run_with_a_manifest_is_settled_as_succeeded(prefixes):
    ledger, _ = _abandoned_run(prefixes, with_manifest=True)
    runner = FakeCaptionRunner()
    result = run_tick(request(prefixes), runner)
    assert result.status == "idle" and runner.runs == []
    assert ledger.read_run("20200101T000000Z-dead00")["status"] == SUCCEEDED
    assert len(ledger.done_keys()) == 2


def test_a_vanished_run_without_output_is_settled_as_failed_and_retried(prefixes):
    ledger, run_output = _abandoned_run(prefixes, with_manifest=False)
    runner = FakeCaptionRunner()
    assert run_tick(request(prefixes), runner).status == "succeeded"
    assert runner.runs == [["a.parquet", "b.parquet"]]
    record = ledger.read_run("20200101T000000Z-dead00")
    assert record["status"] == FAILED and "lease expired" in record["error"]
    assert not run_output.exists()


@pytest.mark.parametrize("job_state, expected_runs", [
    pytest.param(RUNNING, [], id="job-still-running"),
    pytest.param(None, [], id="cluster-cannot-be-asked"),
    pytest.param(FAILED, [["a.parquet", "b.parquet"]], id="job-failed"),
])
def test_a_vanished_submitter_defers_to_its_ray_job(prefixes, job_state, expected_runs):
    job = {"address": "http://head:8265", "submission_id": "caption-x"}
    _abandoned_run(prefixes, with_manifest=False, job=job)
    asked = []
    runner = FakeCaptionRunner()
    run_tick(request(prefixes), runner, job_state=lambda j: asked.append(j) or job_state)
    assert asked == [job], "asked once, although two files name the run"
    assert runner.runs == expected_runs


@pytest.mark.parametrize("source, target", [
    pytest.param("s3://b/data", "s3://b/data/captions", id="output-inside-input"),
    pytest.param("s3://b/data/in", "s3://b/data", id="input-inside-output"),
    pytest.param("/tmp/x", "/tmp/x/", id="same-local"),
])
def test_overlapping_prefixes_are_refused(source, target):
    with pytest.raises(ScheduleError, match="overlap"):
        check_prefixes(source, target)
    check_prefixes("s3://b/data/in", "s3://b/data/input-captions")


def test_cron_loop_runs_at_the_named_times_and_survives_a_failing_tick():
    now = [datetime(2026, 1, 1, 0, 7, 30, tzinfo=timezone.utc)]
    slept, fired = [], []

    def sleep(seconds):
        slept.append(seconds)
        now[0] += timedelta(seconds=seconds)

    def tick():
        fired.append(now[0])
        now[0] += timedelta(seconds=5)
        if len(fired) == 2:
            raise ConnectionError("storage down")
        return TickResult("idle")

    results = run_schedule("*/15 * * * *", tick, max_ticks=3, now=lambda: now[0], sleep=sleep)
    assert [t.strftime("%H:%M:%S") for t in fired] == ["00:15:00", "00:30:00", "00:45:00"]
    assert [r.status for r in results] == ["idle", "failed", "idle"] and "storage down" in results[1].error
    with pytest.raises(ScheduleError, match="not a cron expression"):
        check_cron("every 5 minutes")


@pytest.mark.parametrize("argv, message", [
    pytest.param(["--cron", "61 * * * *"], "not a cron expression", id="bad-cron"),
    pytest.param(["--once", "--max-files", "0"], "--max-files", id="bad-max-files"),
    pytest.param(["--once", "--set", "engine.max_num_seq=1"], "unknown field", id="bad-config"),
])
def test_cli_refuses_bad_arguments_with_exit_2(tmp_path, caplog, argv, message):
    code = schedule_cli.main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), *argv])
    assert code == 2 and message in caplog.text


def test_cli_refuses_overlapping_prefixes(tmp_path, caplog):
    code = schedule_cli.main(["--once", "--input", str(tmp_path), "--output", str(tmp_path / "out")])
    assert code == 2 and "overlap" in caplog.text


def test_cli_once_with_nothing_to_do_exits_0(tmp_path, caplog):
    (tmp_path / "in").mkdir()
    caplog.set_level(logging.INFO)
    code = schedule_cli.main(["--once", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                              "--set", "model.quantization=any"])
    assert code == 0 and "all captioned" in caplog.text
