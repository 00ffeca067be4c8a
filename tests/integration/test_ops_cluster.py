"""Operating on a cluster: a real local Ray head (`ray start --head`), the caption job submitted through
Ray's job API (jobs.submit), and scheduled ticks (jobs.schedule) that caption only new files, with the
ledger on the real S3 server. Real vLLM (CPU build) engine in every caption run.

The head runs with its own temp dir, ports and auth token and is stopped by PID, never with `ray stop`
(which would stop every Ray cluster on the machine): see pipeline/testing/ray_head.py.
"""
import io
import json

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline.config import StorageSection
from pipeline.ops.ledger import SUCCEEDED, Ledger, open_store
from pipeline.io.storage import make_filesystem
from pipeline.testing.ray_head import LocalRayHead
from pipeline.testing.sample_data import sample_images
from tests.conftest import OFFLINE_ENV, ROOT, TINY_CPU_CONFIG, run_job

pytestmark = pytest.mark.integration

# Forwarded by value: nothing secret. The S3 keys are the head node's own (its environment, as a cluster
# node's instance role), and jobs.submit refuses to put a secret's value into a job's runtime_env.
S3_VARIABLES = ["AWS_ENDPOINT_URL", "AWS_REGION"]
CONFIG = str(TINY_CPU_CONFIG.relative_to(ROOT))  # relative: resolved in the uploaded working directory


@pytest.fixture(scope="module")
def ray_head(s3_server):
    # The node's processes hold the S3 credentials, as cluster nodes do through their instance role.
    head = LocalRayHead(num_cpus=8, env={**OFFLINE_ENV, **s3_server.env()}).start()
    yield head
    head.stop()


def put_records(client, key: str, ids: list[str], seed: int) -> None:
    images = sample_images(len(ids), seed=seed)
    table = pa.Table.from_pylist(
        [{"id": record_id, "image": image.data, "prompt": "Describe the image."} for record_id, image in zip(ids, images)],
        schema=pa.schema([("id", pa.string()), ("image", pa.binary()), ("prompt", pa.string())]))
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    client.put_object(Bucket="data", Key=key, Body=buffer.getvalue())


def read_rows(s3_env, uri: str) -> list[dict]:
    fs, path = make_filesystem(StorageSection(endpoint_url=s3_env["AWS_ENDPOINT_URL"], region="us-east-1"), uri)
    return pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["id", "text", "error"]).to_pylist()


def forwarded_env() -> list[str]:
    return [arg for name in S3_VARIABLES for arg in ("--env", name)]


def test_scheduled_ticks_on_a_ray_cluster(ray_head, s3_server, s3_env, tiny_model):
    """Tick 1 is a Ray job submitted with jobs.submit whose driver runs `jobs.schedule --once` (what a
    RayCronJob's RayJob runs) and captions in-process on the cluster; tick 2, after a file was added,
    submits `jobs.caption --input-list` through the job API itself and captions only that file; tick 3
    finds nothing new. Two real engine runs in all (each costs a minute or more here)."""
    client = s3_server.client()
    put_records(client, "sched/in/a.parquet", ["a-0", "a-1"], seed=3)
    put_records(client, "sched/in/b.parquet", ["b-0", "b-1"], seed=4)
    put_records(client, "sched/in/_staging/x.parquet", ["x-0"], seed=6)  # `_` names are never inputs
    tick = ["python", "-m", "jobs.schedule", "--once", "--input", "s3://data/sched/in", "--output",
            "s3://data/sched/out", "--config", CONFIG, "--model", str(tiny_model)]
    env = {**s3_env, **ray_head.client_env()}

    first = run_job("jobs.submit", "--address", ray_head.dashboard_url, "--working-dir", str(ROOT),
                    *forwarded_env(), "--metadata", "tick=1", "--", *tick, env=env)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    assert '"status": "succeeded"' in first.stdout and '"claimed": 2' in first.stdout, "the job's log streams back"

    put_records(client, "sched/in/c.parquet", ["c-0", "c-1", "c-2"], seed=5)
    second = run_job(*tick[2:], "--submit-to", ray_head.dashboard_url, "--working-dir", str(ROOT),
                     *forwarded_env(), env=env)
    assert second.returncode == 0, second.stderr[-6000:]
    third = run_job(*tick[2:], env=env)
    assert third.returncode == 0 and "all captioned" in third.stderr, third.stderr[-3000:]

    ledger = Ledger(open_store(StorageSection(endpoint_url=s3_env["AWS_ENDPOINT_URL"], region="us-east-1"),
                               "s3://data/sched/out"), lease_s=900)
    runs = ledger.runs()
    assert [(r["status"], r["mode"]) for r in runs] == [(SUCCEEDED, "in-process"), (SUCCEEDED, "ray-job")]
    ids_by_run = [sorted(r["id"] for r in read_rows(s3_env, run["output"])) for run in runs]
    assert ids_by_run == [["a-0", "a-1", "b-0", "b-1"], ["c-0", "c-1", "c-2"]], "tick 2 captioned only c"
    assert all(r["error"] is None and r["text"] for run in runs for r in read_rows(s3_env, run["output"]))
    assert len(ledger.done_keys()) == 3
    for run in runs:
        manifest = json.loads(client.get_object(Bucket="data", Key=run["output"][len("s3://data/"):] + "/_manifest.json")["Body"].read())
        assert manifest["status"] == "complete" and manifest["counts"]["errors"] == 0

    from ray.job_submission import JobSubmissionClient

    jobs = JobSubmissionClient(ray_head.dashboard_url, headers={"Authorization": f"Bearer {ray_head.token}"}).list_jobs()
    (schedule_job,) = [j for j in jobs if (j.metadata or {}).get("tick") == "1"]
    (caption_job,) = [j for j in jobs if j.submission_id == runs[1]["job"]["submission_id"]]
    assert schedule_job.status == caption_job.status == "SUCCEEDED"
    assert "jobs.schedule --once" in schedule_job.entrypoint
    assert f"jobs.caption --input-list s3://data/sched/out/_ledger/runs/{runs[1]['run_id']}.inputs.txt" in caption_job.entrypoint
    for job in (schedule_job, caption_job):
        assert ".venv" in job.runtime_env["excludes"] and job.runtime_env["env_vars"]["AWS_REGION"] == s3_env["AWS_REGION"]
        assert s3_env["AWS_SECRET_ACCESS_KEY"] not in json.dumps(job.runtime_env), "no secret in a job"
