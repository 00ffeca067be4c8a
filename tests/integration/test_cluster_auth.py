"""A real Ray head started the way cluster.yaml starts it (the `ray start` flags of head_start_ray_commands
and the container's environment from docker.run_options) refuses job submissions without the cluster's
token and runs them with it.

What differs from the cloud head, and why: its own temp dir, free ports and the loopback address (so that
it never meets another Ray cluster on this machine; pipeline/testing/ray_head.py), the token file in its
temp dir instead of /home/ray/.ray/auth_token, and no --autoscaling-config (the AWS autoscaler's config
that `ray up` writes on the head; there is no cloud here). One head start, stopped by PID.
"""
import json
import time
import urllib.error
import urllib.request

import psutil
import pytest

from pipeline.testing.ray_head import ClusterHeadStart, LocalRayHead
from tests.conftest import ROOT, run_job

pytestmark = pytest.mark.integration

MARKER = "job-ran-with-the-token"


@pytest.fixture(scope="module")
def cluster_head():
    start = ClusterHeadStart.load(ROOT / "cluster.yaml")
    # Never bind beyond loopback on this machine (test_cluster_config.py checks cluster.yaml says so too).
    assert start.flag("--dashboard-host") in ("127.0.0.1", "localhost"), start.args
    head = LocalRayHead(num_cpus=1, env=dict(start.env), extra_args=start.local_args())
    assert "RAY_AUTH_TOKEN_PATH" in start.env, "cluster.yaml gives the nodes a token file"
    head.env["RAY_AUTH_TOKEN_PATH"] = str(head.token_path)  # the node's path, here in the head's temp dir
    head.start()
    try:
        # The dashboard answers before the head is healthy (503); a loaded machine takes a while.
        deadline = time.monotonic() + 120
        while not healthy(head.dashboard_url):
            assert time.monotonic() < deadline, "the head never became healthy"
            time.sleep(1)
        yield head
    finally:
        head.stop()


def healthy(url: str) -> bool:
    try:
        return http("GET", f"{url}/api/gcs_healthz")[0] == 200
    except urllib.error.URLError:  # not listening yet
        return False


def http(method: str, url: str, body: dict | None = None, token: str | None = None) -> tuple[int, str]:
    """Plain HTTP, as an attacker on the network would send it (no Ray client involved)."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                     headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_jobs_without_the_token_are_refused_and_with_it_run(cluster_head, tmp_path):
    url = cluster_head.dashboard_url
    pwned = tmp_path / "pwned"
    attack = {"entrypoint": f"touch {pwned}", "runtime_env": {}}

    # The job API is there (its health probe is public) ...
    assert http("GET", f"{url}/api/gcs_healthz")[0] == 200
    # ... and refuses to run a job, list jobs (their runtime_env) or say its version without the token.
    status, body = http("POST", f"{url}/api/jobs/", attack)
    assert (status, "Missing authentication token" in body) == (401, True), body
    assert http("POST", f"{url}/api/jobs/", attack, token="not-the-token")[0] == 403
    assert http("GET", f"{url}/api/jobs/")[0] == 401
    assert http("GET", f"{url}/api/version")[0] == 401

    # jobs.submit without a token (a home with no ~/.ray/auth_token, no RAY_AUTH_TOKEN*) exits 2.
    no_token = {"HOME": str(tmp_path), "RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "", "RAY_AUTH_TOKEN_PATH": ""}
    refused = run_job("jobs.submit", "--address", url, "--no-wait", "--", "touch", str(pwned), env=no_token,
                      timeout_s=120)
    assert refused.returncode == 2 and "refused" in refused.stderr, refused.stderr[-2000:]

    # With the token (found where cluster.yaml's operator keeps it) the job runs.
    accepted = run_job("jobs.submit", "--address", url, "--submission-id", "with-token", "--timeout-s", "180", "--",
                       "python", "-c", f"print('{MARKER}')", env={**cluster_head.client_env(), "HOME": str(tmp_path)},
                       timeout_s=300)
    assert accepted.returncode == 0, accepted.stderr[-3000:]
    assert MARKER in accepted.stdout, "the job's log streams back"

    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(url, headers={"Authorization": f"Bearer {cluster_head.token}"})
    jobs = client.list_jobs()
    assert [(j.submission_id, j.status) for j in jobs] == [("with-token", "SUCCEEDED")], "no refused job ran"
    assert cluster_head.token not in json.dumps([j.runtime_env for j in jobs]), "the token is not in the job"
    assert not pwned.exists()


def test_the_job_api_listens_on_loopback_only(cluster_head):
    """cluster.yaml's --dashboard-host reaches the head: nothing listens on the dashboard's port beyond
    127.0.0.1 (`ray dashboard cluster.yaml` forwards it over SSH)."""
    listening = {c.laddr.ip for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == cluster_head.dashboard_port}
    assert listening == {"127.0.0.1"}
