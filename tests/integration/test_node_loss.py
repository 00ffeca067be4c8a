"""Losing a Ray node mid-run, as a spot/preemptible GPU node is lost: a real multi-node Ray cluster on this
machine (a head started with `ray start --head` plus worker nodes joined with `ray start --address`, each
with its own temp dir, ports and the head's auth token: pipeline/testing/ray_nodes.py), the batch job
`python -m jobs.caption` as its own process joining it, the tiny Gemma 3 on the real vLLM CPU engine, and
the real S3 server for input and output.

The engine is pinned to "engine nodes" (engine.ray_resources={engine: 1}; only they offer the resource)
while image preparation, the row ledger, the driver, and online the Serve controller, proxy and ingress stay
on the head. Engine nodes are lost while their engines generate (timed on rows committed or requests
answered, never on the clock), and replacement engine nodes join.

- Batch, one job (three engine starts): a graceful drain first (`ray drain-node --reason
  DRAIN_NODE_REASON_PREEMPTION`, what the autoscaler does on a spot interruption notice), the node
  terminated once its engine is idle: Ray Data sends no new batch to a replica on a draining node, the
  batches it holds finish, and no row is generated twice; then SIGKILL of the next engine node (its raylet
  and every process under it, at once): the in-flight batches are redone on the replacement's engine, in
  the same job, and every input row has exactly one output row.
- Online (test_node_loss_online.py, on this module's head and engine nodes).

Engine starts cost a minute or more each here, so the rows are few and short and the online load lasts
seconds.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import psutil
import pytest

from pipeline.stages.crash_isolation import LEDGER_NAMESPACE
from pipeline.testing.ray_head import LocalRayHead
from pipeline.testing.ray_nodes import LocalRayNode, running_tasks
from tests.conftest import OFFLINE_ENV
from tests.integration.test_faults import Job, Output, _is_engine_core, assert_exactly_once, build_records, upload

pytestmark = pytest.mark.integration

ENGINE_RESOURCE = {"engine": 1}


def busy_engine(max_tokens: int) -> list[str]:
    """One engine batch (8 rows) at a time, each row generating max_tokens (no early stop): when the first
    rows are committed, the next batch is being generated on the engine node and another waits for it."""
    return ["--set", f"sampling.max_tokens={max_tokens}", "--set", "sampling.ignore_eos=true",
            "--set", "batch.max_concurrent_batches=1"]


# build_records makes 3 error rows (no id, a duplicated id twice) that never reach the engine.
ERROR_ROWS = 3


@pytest.fixture(scope="module")
def head(s3_server):
    """The head: the driver's node, with CPUs for every CPU stage (logical: it runs on 2 cores) and no
    engine resource. Nodes hold the S3 credentials in their environment, as cloud nodes do."""
    head = LocalRayHead(num_cpus=16, env=node_env(s3_server)).start()
    yield head
    head.stop()


def node_env(s3_server) -> dict[str, str]:
    # RAY_SERVE_ENABLE_TASK_EVENTS: Serve's actors report their tasks to the state API (off by default),
    # so the online test sees which engine replica is answering requests (test_node_loss_online.py).
    return {**OFFLINE_ENV, **s3_server.env(), "RAY_SERVE_ENABLE_TASK_EVENTS": "1"}


@pytest.fixture
def add_engine_node(s3_server, head):
    """Starts an engine node (named `name`) on the head; this test's nodes are all stopped at its end, so
    the next test's engine cannot land on them."""
    nodes: list[LocalRayNode] = []

    def add(name: str, num_cpus: int = 1) -> LocalRayNode:
        # As many CPUs as the engine replica's bundle takes (batch: 1; Serve: 2, its replica actor's CPU
        # is added to the engine's), so nothing else lands on the engine node.
        node = LocalRayNode(head, name, num_cpus=num_cpus, resources=ENGINE_RESOURCE, env=node_env(s3_server))
        nodes.append(node)
        return node.start()

    yield add
    for node in nodes:
        node.remove()


@pytest.fixture(autouse=True)
def job_env(s3_server, head, monkeypatch):
    """The job (Job reads this process's environment) joins the head with its token; the test reads the
    output with the S3 server's credentials."""
    for key, value in {**s3_server.env(), **head.client_env()}.items():
        monkeypatch.setenv(key, value)


def on_cluster(head: LocalRayHead) -> list[str]:
    return ["--set", f"runtime.ray_address={head.address}", "--set", "engine.ray_resources={engine: 1}"]


def engine_cores(processes) -> list[psutil.Process]:
    return [p for p in processes if _is_engine_core(p)]


def assert_status_line_survived(job: Job, rows: int) -> None:
    """The status line's counter lives on the driver's node: losing an engine node leaves it counting."""
    log = job.log_path.read_text()
    assert "status unavailable" not in log, job.log()
    assert f"progress: done: {rows}/{rows} rows" in log, job.log()


def ledger_summary(head: LocalRayHead) -> dict[str, int]:
    """The running job's engine counts, read from its row ledger actor (pipeline/stages/crash_isolation.py): its name from
    the head's state API, its counts by a short Ray driver of its own, as `ray` tooling would."""
    query = urllib.parse.urlencode([("limit", "100"), ("filter_keys", "class_name"), ("filter_predicates", "="),
                                    ("filter_values", "RowLedger"), ("filter_keys", "state"),
                                    ("filter_predicates", "="), ("filter_values", "ALIVE")])
    request = urllib.request.Request(f"{head.dashboard_url}/api/v0/actors?{query}",
                                     headers={"Authorization": f"Bearer {head.token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        (ledger,) = json.loads(response.read())["data"]["result"]["result"]
    script = ("import json, ray\n"
              f"ray.init(address={head.address!r}, log_to_driver=False)\n"
              f"ledger = ray.get_actor({ledger['name']!r}, namespace={LEDGER_NAMESPACE!r})\n"
              "print(json.dumps(ray.get(ledger.summary.remote(), timeout=60)))\n")
    env = {**os.environ, **head.client_env()}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_engine_nodes_drained_then_killed_in_one_job(s3_server, head, add_engine_node, tiny_model, tmp_path):
    """One job, three engine nodes in turn: the first is drained mid-run (a preemption notice) and
    terminated once its engine holds no batch, then a second joins and is SIGKILLed while it generates
    (a preemption without notice), then a third finishes the job.

    - The drain loses no work: the rows the drained engine held finish there, the rest wait for the
      second engine, and until the kill no row has reached an engine twice (the job's row ledger says
      so, read while the job runs).
    - The kill loses no row either: the in-flight batches are redone on the third engine in the same job,
      every input row has exactly one output row, and the redone rows are counted.

    12 engine batches of 8 rows (one at a time, 384 tokens each, no early stop): Ray Data hands the
    drained engine no new batch, but it finishes those it holds, and on a loaded machine the drain itself
    takes seconds: in a clean-clone run the first engine finished 5 of 6 batches, leaving the second one
    batch, written before it could be lost. With 12, about half are left for the later engines."""
    rows = 96
    records = build_records(rows)
    output = Output(s3_server, "s3://data/node-loss/output")
    first = add_engine_node("engine-1")
    job = Job(s3_server, tiny_model, upload(s3_server, "node-loss/input", records), output.uri, tmp_path / "run.log",
              # long enough that a batch outlasts `ray drain-node`'s start (seconds)
              *busy_engine(384), *on_cluster(head))
    job.wait_for(lambda: output.committed_rows() > 0, "the first rows written")
    # The engine runs on the engine node, not beside the driver.
    assert engine_cores(first.processes()), [p.name() for p in first.processes()]
    assert not engine_cores(job.tree())

    # 1. A preemption notice: drain, and terminate the instance once its engine is idle. No replacement
    # yet, so whatever the drained engine did not take is certainly left for later engines.
    drained = first.drain("spot interruption notice", deadline_s=120)
    assert drained.returncode == 0, drained.stdout + drained.stderr
    assert first.state()["state"] == "ALIVE", "draining: still up, taking no new work"
    # Ray's workers report task states about once a second, so idle must be seen over a few seconds.
    idle_since = None

    def idle() -> bool:
        nonlocal idle_since
        busy = running_tasks(head, first.node_id)
        idle_since = None if busy else (idle_since or time.monotonic())
        return idle_since is not None and time.monotonic() - idle_since >= 3

    job.wait_for(idle, "the drained engine finishing its batches", timeout_s=300)
    after_drain = output.committed_rows()
    assert 0 < after_drain < rows, "rows were left for the next engine"
    first.kill()

    # 2. A replacement joins and is lost without notice while it generates.
    second = add_engine_node("engine-2")
    job.wait_for(lambda: engine_cores(second.processes()), "the engine restarted on the second node")
    job.wait_for(lambda: output.committed_rows() > after_drain, "rows written by the second engine")
    assert output.committed_rows() < rows, "the node must be lost while rows are still being generated"
    before_kill = ledger_summary(head)
    assert before_kill["rows_retried_after_crash"] == 0, f"the drain lost work: {before_kill}"
    assert before_kill["engine_starts"] == 2, before_kill
    second.kill()

    third = add_engine_node("engine-3")
    job.wait_for(lambda: engine_cores(third.processes()), "the engine restarted on the third node")
    assert job.wait() == 0, job.log()
    assert first.state()["state"] == second.state()["state"] == "DEAD"

    assert_status_line_survived(job, rows)
    assert_exactly_once(output.table(), records)
    manifest = output.json("_manifest.json")
    assert manifest["status"] == "complete" and manifest["resume"]["exactly_once"]
    assert manifest["counts"]["rows_in"] == manifest["counts"]["rows_out"] == rows
    assert manifest["counts"]["errors"] == ERROR_ROWS
    (attempt,) = manifest["attempts"]
    assert attempt["engine_starts"] == 3, "the engine replica started on each node in turn"
    # The rows in flight on the killed node were sent again; every other row reached an engine once.
    assert attempt["rows_retried_after_crash"] >= 1
    assert attempt["engine_requests"] == rows - ERROR_ROWS + attempt["rows_retried_after_crash"]
    assert attempt["poison_rows"] == 0
