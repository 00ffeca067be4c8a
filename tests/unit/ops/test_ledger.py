"""The ledger on a local directory: exclusive claims, listing, and what a later tick may take over."""
import json
import os
import threading
import time

import pytest

from pipeline.config import StorageSection
from pipeline.ops.ledger import (FAILED, RUNNING, SUCCEEDED, Ledger, LedgerError, LocalLedgerStore, list_input_files,
                             open_store)


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def write_parquet_stub(path, content=b"PAR1"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def test_local_create_is_exclusive_under_a_race(tmp_path):
    store = LocalLedgerStore(tmp_path / "ledger")
    results, barrier = [], threading.Barrier(8)

    def contend(index):
        barrier.wait()
        results.append((index, store.create("claims/k/000001.json", f"writer {index}".encode())))

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [index for index, won in results if won]
    assert len(winners) == 1
    assert store.get("claims/k/000001.json") == f"writer {winners[0]}".encode(), "the winner's content, whole"
    assert store.list("claims/") == ["claims/k/000001.json"], "no temporary files left behind"


def test_store_put_get_list_and_uri(tmp_path):
    store = open_store(StorageSection(), str(tmp_path / "out"))
    assert store.get("runs/x.json") is None and store.list("runs/") == []
    store.put("runs/b.json", b"2")
    store.put("runs/a.json", b"1")
    store.put("runs/a.json", b"3")
    assert store.list("runs/") == ["runs/a.json", "runs/b.json"]
    assert store.get("runs/a.json") == b"3"
    assert store.uri("runs/a.json") == str(tmp_path / "out" / "_ledger" / "runs" / "a.json")


def test_a_store_that_overwrites_is_refused(tmp_path):
    class FakeOverwritingStore(LocalLedgerStore):
        """Behaves like an S3 endpoint that ignores If-None-Match: create always succeeds."""

        def create(self, name, data):
            self.put(name, data)
            return True

    with pytest.raises(LedgerError, match="does not refuse to overwrite"):
        Ledger(FakeOverwritingStore(tmp_path), lease_s=60).check_exclusive_create()
    ledger = Ledger(LocalLedgerStore(tmp_path / "ok"), lease_s=60)
    ledger.check_exclusive_create()
    assert ledger.store.list("probes/") == [], "the probe is removed"


def test_list_input_files_skips_hidden_and_non_parquet_and_versions_by_mtime(tmp_path):
    root = tmp_path / "in"
    write_parquet_stub(root / "a.parquet")
    write_parquet_stub(root / "day=1" / "b.parquet")
    write_parquet_stub(root / "_SUCCESS")
    write_parquet_stub(root / "_tmp" / "c.parquet")
    write_parquet_stub(root / ".d.parquet")
    write_parquet_stub(root / "notes.txt")
    files = list_input_files(StorageSection(), str(root))
    assert [f.uri for f in files] == [str(root / "a.parquet"), str(root / "day=1" / "b.parquet")]
    assert list_input_files(StorageSection(), str(root / "a.parquet"))[0].key == files[0].key, "a single file"
    assert list_input_files(StorageSection(), str(tmp_path / "missing")) == []

    before = files[0]
    write_parquet_stub(root / "a.parquet", b"PAR1 rewritten")
    os.utime(root / "a.parquet", ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    after = list_input_files(StorageSection(), str(root))[0]
    assert after.uri == before.uri and after.key != before.key, "a rewritten file is a new version"


def _claims(tmp_path, clock):
    store = LocalLedgerStore(tmp_path / "ledger")
    root = tmp_path / "in"
    for name in ("a", "b", "c"):
        write_parquet_stub(root / f"{name}.parquet")
    return Ledger(store, lease_s=100, clock=clock), list_input_files(StorageSection(), str(root))


@pytest.mark.parametrize("owner_state, claim_age_s, expected", [
    pytest.param(RUNNING, 0, "in_flight", id="owner-running"),
    pytest.param(SUCCEEDED, 0, "finished", id="owner-succeeded"),
    pytest.param(FAILED, 0, "claimed", id="owner-failed"),
    pytest.param(None, 50, "in_flight", id="no-record-yet-young-claim"),
    pytest.param(None, 500, "claimed", id="no-record-old-claim"),
])
def test_what_a_later_tick_may_take(tmp_path, owner_state, claim_age_s, expected):
    clock = Clock()
    ledger, files = _claims(tmp_path, clock)
    first = ledger.claim(files, "run-1", run_state=lambda run_id: None)
    assert [f.uri for f in first.claimed] == [f.uri for f in files]

    clock.now += claim_age_s
    second = ledger.claim(files, "run-2", run_state=lambda run_id: owner_state if run_id == "run-1" else None)
    counts = {"claimed": len(second.claimed), "in_flight": second.in_flight, "finished": second.finished}
    assert counts[expected] == 3 and sum(counts.values()) == 3
    if expected == "claimed":
        attempt = json.loads(ledger.store.get(f"claims/{files[0].key}/000002.json"))
        assert attempt["run_id"] == "run-2" and attempt["attempt"] == 2 and attempt["uri"] == files[0].uri
    if expected == "finished":
        assert ledger.done_keys() == {f.key for f in files}, "the missing done markers are repaired"


def test_claim_respects_the_limit_and_done_markers(tmp_path):
    ledger, files = _claims(tmp_path, Clock())
    first = ledger.claim(files, "run-1", run_state=lambda run_id: None, limit=2)
    assert [f.uri for f in first.claimed] == [f.uri for f in files[:2]]
    ledger.mark_done(first.claimed, "run-1")
    assert ledger.done_keys() == {f.key for f in files[:2]}
    done = json.loads(ledger.store.get(f"done/{files[0].key}.json"))
    assert done["run_id"] == "run-1" and done["uri"] == files[0].uri


def test_concurrent_ticks_claim_disjoint_sets(tmp_path):
    ledger, _ = _claims(tmp_path, Clock())
    root = tmp_path / "in"
    for index in range(40):
        write_parquet_stub(root / f"many-{index:02d}.parquet")
    files = list_input_files(StorageSection(), str(root))
    claimed: dict[str, list[str]] = {}
    barrier = threading.Barrier(4)

    def tick(run_id):
        barrier.wait()
        claimed[run_id] = [f.uri for f in ledger.claim(files, run_id, run_state=lambda r: None).claimed]

    threads = [threading.Thread(target=tick, args=(f"run-{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = [uri for uris in claimed.values() for uri in uris]
    assert sorted(everything) == sorted(f.uri for f in files), "every file claimed exactly once"


def test_stale_record(tmp_path):
    clock = Clock()
    ledger = Ledger(LocalLedgerStore(tmp_path), lease_s=100, clock=clock)
    record = {"run_id": "r", "status": RUNNING, "heartbeat_at": clock.now}
    assert not ledger.is_stale(record)
    clock.now += 101
    assert ledger.is_stale(record)
    assert not ledger.is_stale({**record, "status": FAILED})


def test_open_store_in_another_folder_of_the_output(tmp_path):
    """The writer lease (pipeline.batch.output_lease) keeps its objects beside the ledger's, with the same store."""
    store = open_store(StorageSection(), str(tmp_path / "out"), "_lease")
    assert store.create("000001.json", b"a") and not store.create("000001.json", b"b")
    assert store.uri("000001.json") == str(tmp_path / "out" / "_lease" / "000001.json")
    assert open_store(StorageSection(), str(tmp_path / "out")).list("") == []


def test_a_file_never_claimed_costs_one_create_and_no_listing(tmp_path):
    """A tick's first claim of a new file is one conditional create; only a file with an earlier attempt is
    listed (100k new files: 100k requests, not 200k)."""
    class Counting(LocalLedgerStore):
        def __init__(self, root):
            super().__init__(root)
            self.calls = {"create": 0, "list": 0}

        def create(self, name, data):
            self.calls["create"] += 1
            return super().create(name, data)

        def list(self, prefix):
            self.calls["list"] += 1
            return super().list(prefix)

    store = Counting(tmp_path / "ledger")
    ledger = Ledger(store, lease_s=60, clock=Clock())
    for i in range(5):
        write_parquet_stub(tmp_path / "in" / f"{i}.parquet")
    files = list_input_files(StorageSection(), str(tmp_path / "in"))
    outcome = ledger.claim(files, "run-1", lambda run_id: None)
    assert len(outcome.claimed) == 5 and store.calls == {"create": 5, "list": 0}
    again = ledger.claim(files, "run-2", lambda run_id: RUNNING)
    assert again.in_flight == 5 and not again.claimed and store.calls == {"create": 10, "list": 5}
