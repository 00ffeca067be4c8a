"""The writer lease of an output prefix (pipeline.batch.output_lease): create, refuse, heartbeat, stale takeover,
release, on a local directory and on the real S3 server (SeaweedFS, the session's `s3_server`); and the
caption job's refusals that come before any engine (lease held: exit 4; input inside the output: exit 2)."""
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import caption
from pipeline.config import StorageSection
from pipeline.batch.output_lease import LEASE_DIR, OutputInUseError, OutputLease, pid_namespace

TTL = 60.0


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["local", "s3"])
def place(request, tmp_path):
    """(storage, output URI) on a local directory or in a bucket of the real S3 server."""
    if request.param == "local":
        return StorageSection(), str(tmp_path / "out")
    server = request.getfixturevalue("s3_server")
    monkeypatch = request.getfixturevalue("monkeypatch")
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    return (StorageSection(endpoint_url=server.endpoint_url, region="us-east-1", max_attempts=2),
            f"s3://data/lease-{uuid.uuid4().hex[:8]}/out")


def lease(place, clock, **kwargs) -> OutputLease:
    storage, uri = place
    return OutputLease.for_output(storage, uri, ttl_s=kwargs.pop("ttl_s", TTL), clock=clock, **kwargs)


def objects(place) -> dict[str, bytes]:
    """Every object under the lease folder, with its bytes (what a refused job must leave as it is)."""
    probe = lease(place, Clock())
    return {name: probe.store.get(name) for name in probe.store.list("")}


def test_create_then_refuse_without_writing(place):
    clock = Clock()
    first = lease(place, clock).acquire()
    (name,) = objects(place)
    assert name == "000001.json"
    record = json.loads(objects(place)[name])
    assert record["job_id"] == first.job_id and record["pid"] == os.getpid()
    assert record["host"] == socket.gethostname() and record["ttl_s"] == TTL and record["generation"] == 1
    before = objects(place)
    clock.now += TTL - 1  # not yet stale
    second = lease(place, clock)
    with pytest.raises(OutputInUseError) as refused:
        second.acquire()
    message = str(refused.value)
    assert "\n" not in message and place[1] in message and "in use by another job" in message
    assert f"job {first.job_id}" in message and f"pid {os.getpid()}" in message and "59s ago" in message
    assert "nothing was changed" in message
    assert objects(place) == before, "the refused job wrote nothing"
    assert second.generation is None


def test_one_of_racing_jobs_wins(place):
    clock, barrier, outcomes = Clock(), threading.Barrier(6), []
    contenders = [lease(place, clock) for _ in range(6)]

    def contend(candidate):
        barrier.wait()
        try:
            candidate.acquire()
            outcomes.append(("won", candidate.job_id))
        except OutputInUseError:
            outcomes.append(("refused", candidate.job_id))

    threads = [threading.Thread(target=contend, args=(c,)) for c in contenders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [job for outcome, job in outcomes if outcome == "won"]
    assert len(winners) == 1 and len(outcomes) == 6
    (name,) = [n for n in objects(place) if not n.startswith("probes/")]
    assert json.loads(objects(place)[name])["job_id"] == winners[0]


def test_heartbeat_keeps_the_lease_live(place):
    clock = Clock()
    holder = lease(place, clock).acquire()
    for _ in range(3):  # three beats, each within the TTL: never stale, though 3 x 0.9 TTL have passed
        clock.now += 0.9 * TTL
        assert holder.beat()
        with pytest.raises(OutputInUseError):
            lease(place, clock).acquire()
    assert json.loads(objects(place)["000001.json"])["heartbeat_at"] == clock.now


def test_background_heartbeat_thread_renews(place):
    clock = Clock()
    holder = lease(place, clock).acquire()
    holder.start_heartbeat(interval_s=0.05)
    try:
        clock.now += 0.9 * TTL
        deadline = time.monotonic() + 30
        while json.loads(objects(place)["000001.json"])["heartbeat_at"] != clock.now:
            assert time.monotonic() < deadline, "the heartbeat thread did not renew the lease"
            time.sleep(0.05)
    finally:
        holder.release()
    assert objects(place) == {}


def test_stale_lease_is_taken_over_and_its_owner_learns_it(place):
    clock, lost = Clock(), []
    first = lease(place, clock, on_lost=lambda: lost.append(True)).acquire()
    clock.now += TTL + 1
    second = lease(place, clock).acquire()
    assert second.generation == 2
    names = objects(place)
    assert list(names) == ["000002.json"], "the stale generation is deleted"
    record = json.loads(names["000002.json"])
    assert record["job_id"] == second.job_id and f"job {first.job_id}" in record["took_over"]
    # The first job's next beat finds its lease gone: it stops, once, and never writes the lease again.
    assert first.beat() is False and first.beat() is False and lost == [True] and first.lost
    with pytest.raises(OutputInUseError, match="taken over by another job"):
        first.check_held()
    first.release()
    assert objects(place) == names, "a job that lost the lease leaves its new owner's alone"
    second.release()
    assert objects(place) == {}


def test_the_owners_ttl_decides_staleness(place):
    clock = Clock()
    lease(place, clock, ttl_s=10 * TTL).acquire()
    clock.now += 2 * TTL  # stale by the newcomer's TTL, not by the owner's
    with pytest.raises(OutputInUseError, match="goes stale after 600s"):
        lease(place, clock).acquire()


def test_a_dead_process_of_this_host_is_taken_over_at_once(place):
    clock = Clock()
    holder = lease(place, clock).acquire()
    exited = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(exited.stdout)
    record = {**holder.record, "pid": dead_pid}
    holder.store.put("000001.json", json.dumps(record).encode())
    assert pid_namespace() is not None and record["pid_namespace"] == pid_namespace()
    other_host = lease(place, clock)
    holder.store.put("000001.json", json.dumps({**record, "host": "another-host"}).encode())
    with pytest.raises(OutputInUseError):  # a PID of another host says nothing: wait for the TTL
        other_host.acquire()
    holder.store.put("000001.json", json.dumps(record).encode())
    rerun = lease(place, clock).acquire()  # heartbeat fresh, but its driver is gone
    assert rerun.generation == 2 and list(objects(place)) == ["000002.json"]


def test_release_frees_the_prefix(place):
    clock = Clock()
    first = lease(place, clock)
    with first:
        assert list(objects(place)) == ["000001.json"]
    assert objects(place) == {}
    if not place[1].startswith("s3://"):
        assert not os.path.exists(os.path.join(place[1], LEASE_DIR)), "no empty folder left behind"
    second = lease(place, clock).acquire()
    assert second.generation == 1
    second.release()


# ------------------------------------------------------------------ the caption job's refusals
def test_a_second_job_is_refused_with_exit_4_before_touching_the_output(tmp_path, caplog):
    records = tmp_path / "records"
    records.mkdir()
    pq.write_table(pa.table({"id": ["a"]}), records / "part-0.parquet")
    out = tmp_path / "out"
    (out / "_checkpoint").mkdir(parents=True)
    (out / "_checkpoint" / "w_0.parquet").write_bytes(b"first job's")
    (out / "_attempts.json").write_text(json.dumps({"attempts": [{"status": "running"}]}))
    holder = OutputLease.for_output(StorageSection(), str(out), ttl_s=TTL).acquire()  # a live job (this pid)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for extra in ([], ["--overwrite"]):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            code = caption.main(["--input", str(records), "--output", str(out), *extra])
        assert code == 4, caplog.text
        assert f"output {out} is in use by another job (job {holder.job_id}" in caplog.text
        assert "starting embedded local Ray" not in caplog.text and "model " not in caplog.text, "refused first"
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before, "nothing changed"
    holder.release()


@pytest.mark.parametrize("layout", ["under", "equal"])
def test_overwrite_refuses_an_output_that_holds_the_input(tmp_path, caplog, layout):
    out = tmp_path / "out"
    records = out / "records" if layout == "under" else out
    records.mkdir(parents=True)
    pq.write_table(pa.table({"id": ["a", "b"]}), records / "part-0.parquet")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with caplog.at_level(logging.ERROR, logger="jobs.caption"):
        code = caption.main(["--input", str(records), "--output", str(out), "--overwrite"])
    assert code == 2 and f"the output prefix {out} contains the input {records}" in caplog.text
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before, "the input is intact"


def test_an_openai_batch_job_is_refused_too(tmp_path, caplog):
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n')
    out = tmp_path / "out"
    holder = OutputLease.for_output(StorageSection(), str(out), ttl_s=TTL).acquire()
    with caplog.at_level(logging.INFO):
        code = caption.main(["--input", str(requests), "--output", str(out), "--overwrite"])
    assert code == 4 and "input format: openai-batch" in caplog.text
    assert f"output {out} is in use by another job (job {holder.job_id}" in caplog.text
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert written == [LEASE_DIR, f"{LEASE_DIR}/000001.json"], "nothing else was written"
    holder.release()


def test_the_dry_run_names_the_holder(tmp_path):
    import pyarrow.fs as pafs

    from pipeline.config import PipelineConfig
    from pipeline.batch.plan import lease_holder, output_state

    config, out = PipelineConfig.load(environ={}), tmp_path / "out"
    assert lease_holder(config, str(out)) is None
    holder = OutputLease.for_output(config.storage, str(out), ttl_s=TTL).acquire()
    held = lease_holder(config, str(out))
    assert held.startswith(f"job {holder.job_id} on host {socket.gethostname()} pid {os.getpid()}")
    assert output_state(pafs.LocalFileSystem(), str(out), False, held) == \
        f"in use by another job ({held}): the run would be refused (exit 4)"
    holder.release()
    assert output_state(pafs.LocalFileSystem(), str(out), False, lease_holder(config, str(out))).startswith("empty")
