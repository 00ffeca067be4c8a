"""The ledger on the real S3 server (SeaweedFS): conditional creates under a race, listing with ETags, and
two overlapping ticks on one S3 output prefix. No engine: the caption run is FakeS3CaptionRunner (the
real one is in test_ops_cluster.py); what is tested is what S3 makes of the claims."""
import threading

import pytest

from pipeline.config import StorageSection
from pipeline.ops.ledger import Ledger, S3LedgerStore, list_input_files, open_store
from pipeline.ops.schedule import TickRequest, run_tick

pytestmark = pytest.mark.integration


@pytest.fixture
def storage(s3_env):
    return StorageSection(endpoint_url=s3_env["AWS_ENDPOINT_URL"], region=s3_env["AWS_REGION"])


def test_conditional_create_has_one_winner(storage, s3_server):
    store = open_store(storage, "s3://data/race/out")
    assert isinstance(store, S3LedgerStore)
    Ledger(store, lease_s=60).check_exclusive_create()
    assert store.list("probes/") == [], "the probe is removed"
    for round_no in range(5):
        barrier, wins = threading.Barrier(8), []

        def contend(index):
            barrier.wait()
            if store.create(f"claims/k{round_no}/000001.json", f"writer {index}".encode()):
                wins.append(index)

        threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(wins) == 1, f"round {round_no}: {wins}"
        assert store.get(f"claims/k{round_no}/000001.json") == f"writer {wins[0]}".encode()


def test_s3_listing_uses_etags_and_skips_hidden_names(storage, s3_server):
    client = s3_server.client()
    for key in ["list/in/a.parquet", "list/in/day=2/b.parquet", "list/in/_tmp/c.parquet", "list/in/readme.txt"]:
        client.put_object(Bucket="data", Key=key, Body=b"PAR1 " + key.encode())
    files = list_input_files(storage, "s3://data/list/in")
    assert [f.uri for f in files] == ["s3://data/list/in/a.parquet", "s3://data/list/in/day=2/b.parquet"]
    assert list_input_files(storage, "s3://data/list/in/a.parquet") == files[:1]
    client.put_object(Bucket="data", Key="list/in/a.parquet", Body=b"PAR1 changed")
    assert list_input_files(storage, "s3://data/list/in")[0].key != files[0].key, "a new ETag is a new version"


class FakeS3CaptionRunner:
    """Writes a manifest where the caption job would; blocks on `gate` to hold its claims."""

    mode = "fake"

    def __init__(self, client, gate=None):
        self.client, self.gate, self.runs, self.started = client, gate, [], threading.Event()

    def run(self, run, on_submitted):
        listed = self.client.get_object(Bucket="data", Key=run.input_list_uri[len("s3://data/"):])["Body"].read()
        assert listed.decode().split() == [f.uri for f in run.files]
        self.runs.append(sorted(f.uri.rsplit("/", 1)[-1] for f in run.files))
        self.started.set()
        if self.gate is not None:
            self.gate.wait(30)
        self.client.put_object(Bucket="data", Key=run.output_uri[len("s3://data/"):] + "/_manifest.json", Body=b"{}")
        return {}


def test_overlapping_ticks_on_s3(storage, s3_server):
    client = s3_server.client()
    for name in ("a", "b"):
        client.put_object(Bucket="data", Key=f"overlap/in/{name}.parquet", Body=b"PAR1")
    request = TickRequest("s3://data/overlap/in", "s3://data/overlap/out", storage)
    gate = threading.Event()
    slow, results = FakeS3CaptionRunner(client, gate), {}
    thread = threading.Thread(target=lambda: results.update(slow=run_tick(request, slow)))
    thread.start()
    assert slow.started.wait(30)
    client.put_object(Bucket="data", Key="overlap/in/c.parquet", Body=b"PAR1")
    quick = FakeS3CaptionRunner(client)
    assert run_tick(request, quick).in_flight == 2
    gate.set()
    thread.join(30)
    assert results["slow"].status == "succeeded"
    assert slow.runs == [["a.parquet", "b.parquet"]] and quick.runs == [["c.parquet"]]
    assert run_tick(request, FakeS3CaptionRunner(client)).status == "idle"
    assert len(Ledger(open_store(storage, "s3://data/overlap/out"), lease_s=900).done_keys()) == 3
