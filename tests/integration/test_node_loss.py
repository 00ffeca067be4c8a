"""Losing a Ray node mid-run, as a spot/preemptible GPU node is lost: a real multi-node Ray cluster on this
machine (a head started with `ray start --head` plus worker nodes joined with `ray start --address`, each
with its own temp dir, ports and the head's auth token: pipeline/testing/ray_nodes.py), the batch job
`python -m jobs.caption` as its own process joining it, the tiny Gemma 3 on the real vLLM CPU engine, and
the real S3 server for input and output.

The engine is pinned to an "engine node" (engine.ray_resources={engine: 1}; only that node offers the
resource) while image preparation, the row ledger and the driver stay on the head. The engine node is lost
while its engine is generating (timed on rows committed, never on the clock), and a replacement engine
node joins:

- SIGKILL of the node (its raylet and every process under it, at once): the in-flight batches are redone on
  the replacement's engine, in the same job, and every input row has exactly one output row;
- a graceful drain first (`ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION`, what the autoscaler does
  on a spot interruption notice), and the node terminated once its engine is idle: Ray Data sends no new
  batch to a replica on a draining node, the batches it holds finish, and no row is generated twice.

Each test is one job with two engine starts (a minute or more each here), so the engine node is lost after
the first committed rows, and the rows are few and short.
"""
from __future__ import annotations

import time

import psutil
import pytest

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
    return {**OFFLINE_ENV, **s3_server.env()}


@pytest.fixture
def add_engine_node(s3_server, head):
    """Starts an engine node (named `name`) on the head; this test's nodes are all stopped at its end, so
    the next test's engine cannot land on them."""
    nodes: list[LocalRayNode] = []

    def add(name: str) -> LocalRayNode:
        # One CPU: the engine replica's bundle takes it, so nothing else lands on the engine node.
        node = LocalRayNode(head, name, num_cpus=1, resources=ENGINE_RESOURCE, env=node_env(s3_server))
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


def test_engine_node_killed_mid_run_replacement_finishes_exactly_once(s3_server, head, add_engine_node, tiny_model, tmp_path):
    rows = 24
    first_node = add_engine_node("engine-1")
    records = build_records(rows)
    output = Output(s3_server, "s3://data/node-kill/output")
    job = Job(s3_server, tiny_model, upload(s3_server, "node-kill/input", records), output.uri, tmp_path / "run.log",
              *busy_engine(128), *on_cluster(head))
    job.wait_for(lambda: output.committed_rows() > 0, "the first rows written")
    # The engine runs on the engine node, not beside the driver.
    assert engine_cores(first_node.processes()), [p.name() for p in first_node.processes()]
    assert not engine_cores(job.tree())
    assert output.committed_rows() < rows, "the node must be lost while rows are still being generated"

    first_node.kill()
    replacement = add_engine_node("engine-2")
    job.wait_for(lambda: engine_cores(replacement.processes()), "the engine restarted on the replacement node")
    assert job.wait() == 0, job.log()
    assert first_node.state()["state"] == "DEAD"

    assert_status_line_survived(job, rows)
    assert_exactly_once(output.table(), records)
    manifest = output.json("_manifest.json")
    assert manifest["status"] == "complete" and manifest["resume"]["exactly_once"]
    assert manifest["counts"]["rows_in"] == manifest["counts"]["rows_out"] == rows
    assert manifest["counts"]["errors"] == ERROR_ROWS
    (attempt,) = manifest["attempts"]
    assert attempt["engine_starts"] == 2, "the engine replica started again, on the replacement node"
    # The rows in flight on the lost node were sent again; every other row reached an engine once.
    assert attempt["rows_retried_after_crash"] >= 1
    assert attempt["engine_requests"] == rows - ERROR_ROWS + attempt["rows_retried_after_crash"]
    assert attempt["poison_rows"] == 0


def test_engine_node_drained_then_terminated_loses_no_work(s3_server, head, add_engine_node, tiny_model, tmp_path):
    # 5 engine batches: when the first is committed, the second is generating on the engine node and the
    # third waits in its replica (Ray Data hands an actor 2 x max_concurrent_batches tasks at a time), so
    # the last two are left for the replacement.
    rows = 40
    first_node = add_engine_node("engine-3")
    records = build_records(rows)
    output = Output(s3_server, "s3://data/node-drain/output")
    job = Job(s3_server, tiny_model, upload(s3_server, "node-drain/input", records), output.uri, tmp_path / "run.log",
              # longer: the second batch must outlast `ray drain-node`'s start (seconds)
              *busy_engine(384), *on_cluster(head))
    job.wait_for(lambda: output.committed_rows() > 0, "the first rows written")
    assert engine_cores(first_node.processes())

    drained = first_node.drain("spot interruption notice", deadline_s=120)
    assert drained.returncode == 0, drained.stdout + drained.stderr
    assert first_node.state()["state"] == "ALIVE", "draining: still up, taking no new work"
    replacement = add_engine_node("engine-4")
    # The instance goes away once its engine holds no batch (Ray's workers report task states about once a
    # second, so idle must be seen over a few seconds).
    idle_since = None

    def idle() -> bool:
        nonlocal idle_since
        busy = running_tasks(head, first_node.node_id)
        idle_since = None if busy else (idle_since or time.monotonic())
        return idle_since is not None and time.monotonic() - idle_since >= 3

    job.wait_for(idle, "the drained engine finishing its batches", timeout_s=300)
    assert output.committed_rows() < rows, "rows were left for the replacement"
    first_node.kill()
    job.wait_for(lambda: engine_cores(replacement.processes()), "the engine restarted on the replacement node")
    assert job.wait() == 0, job.log()

    assert_status_line_survived(job, rows)
    assert_exactly_once(output.table(), records)
    manifest = output.json("_manifest.json")
    assert manifest["status"] == "complete" and manifest["resume"]["exactly_once"]
    (attempt,) = manifest["attempts"]
    assert attempt["engine_starts"] == 2
    # No work lost: no row was in flight when the node went, so every row reached an engine exactly once.
    assert attempt["rows_retried_after_crash"] == 0
    assert attempt["engine_requests"] == rows - ERROR_ROWS
