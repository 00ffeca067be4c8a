"""Worker nodes for a test's local Ray head: real raylets joined with `ray start --address`, on this machine,
so that a test can lose a node the way a spot instance is lost (every process of it SIGKILLed at once) or
drain it the way a preemption notice does (`ray drain-node`).

Each node is `ray start --address=HEAD --block` in a session of its own, with its own temp dir (Ray allows
one per node), its own free ports (two raylets on one host cannot share the node manager's, object
manager's or agents' ports), the loopback address, a node name to find it by, and the head's auth token.
Custom resources (`resources={"engine": 1}`) let a test put work on one node: an engine pinned by
engine.ray_resources runs only where that resource is.

    with LocalRayHead(num_cpus=4, env=env) as head:
        engine_node = LocalRayNode(head, "engine-1", num_cpus=1, resources={"engine": 1}, env=env).start()
        ...
        engine_node.kill()           # SIGKILL: the raylet and every process under it, by PID
        LocalRayNode(head, "engine-2", num_cpus=1, resources={"engine": 1}, env=env).start()

Nodes are stopped by PID only (never `ray stop`, which stops every Ray cluster on the machine):
pipeline/testing/ray_head.py says why.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Optional

from pipeline.testing.ports import free_ports
from pipeline.testing.ray_head import LocalRayHead

logger = logging.getLogger(__name__)


def cluster_nodes(head: LocalRayHead) -> list[dict[str, Any]]:
    """Every node the head's GCS knows (alive and dead), from the state API, as Ray's own CLI reads it."""
    request = urllib.request.Request(f"{head.dashboard_url}/api/v0/nodes?limit=1000&detail=1",
                                     headers={"Authorization": f"Bearer {head.token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        body = json.loads(response.read())
    return body["data"]["result"]["result"]


def running_tasks(head: LocalRayHead, node_id: str) -> list[dict[str, Any]]:
    """Tasks (actor tasks included) the head's GCS last heard were running on a node. Workers report task
    events about once a second, so this lags by that much."""
    query = urllib.parse.urlencode([("limit", "1000"), ("filter_keys", "node_id"), ("filter_predicates", "="),
                                    ("filter_values", node_id), ("filter_keys", "state"),
                                    ("filter_predicates", "="), ("filter_values", "RUNNING")])
    request = urllib.request.Request(f"{head.dashboard_url}/api/v0/tasks?{query}",
                                     headers={"Authorization": f"Bearer {head.token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["data"]["result"]["result"]


def serve_replicas(head: LocalRayHead, app: str, deployment_contains: str) -> list[dict[str, Any]]:
    """The replicas (state, node_id, ...) of an app's deployments whose name contains `deployment_contains`,
    from Serve's REST API on the head's dashboard (what `serve status` reads); [] while the app is not up."""
    request = urllib.request.Request(f"{head.dashboard_url}/api/serve/applications/",
                                     headers={"Authorization": f"Bearer {head.token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        body = json.loads(response.read())
    deployments = ((body.get("applications") or {}).get(app) or {}).get("deployments") or {}
    return [replica for name, deployment in deployments.items() if deployment_contains in name
            for replica in deployment.get("replicas") or []]


class LocalRayNode:
    def __init__(self, head: LocalRayHead, name: str, num_cpus: float = 1, resources: Optional[dict[str, float]] = None,
                 env: Optional[dict[str, str]] = None):
        self.head, self.name, self.num_cpus = head, name, num_cpus
        self.resources = dict(resources or {})
        # The node's own environment (what a cloud node's instance gives its processes: S3 credentials...);
        # the head's token always comes from the head.
        self.env = dict(env or {})
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rayn-", dir="/tmp"))  # short: unix sockets below it
        ports = free_ports(6)
        self._ports = {"--node-manager-port": ports[0], "--object-manager-port": ports[1],
                       "--metrics-export-port": ports[2], "--dashboard-agent-listen-port": ports[3],
                       "--dashboard-agent-grpc-port": ports[4], "--runtime-env-agent-port": ports[5]}
        self.process: Optional[subprocess.Popen] = None
        self.node_id: Optional[str] = None
        self.log_path = self.temp_dir / "ray-start.log"

    def start(self, timeout_s: float = 120.0, attempts: int = 3) -> "LocalRayNode":
        """`ray start` the node and wait until the head lists it alive, up to `attempts` times. On a machine
        loaded by running engines `ray start` sometimes gives up (after a fixed 30 s, when the GCS has not
        yet listed its raylet) or hangs retrying its first GCS call; a fresh `ray start` then joins."""
        for attempt in range(1, attempts + 1):
            try:
                return self._start_once(timeout_s)
            except (RuntimeError, TimeoutError) as exc:
                if attempt == attempts:
                    raise
                logger.warning("Ray node %s: attempt %d failed, starting it again: %s", self.name, attempt,
                               str(exc)[-300:])
        raise AssertionError("unreachable")

    def _start_once(self, timeout_s: float) -> "LocalRayNode":
        command = [self.head.ray_binary, "start", f"--address={self.head.address}", "--block",
                   f"--num-cpus={self.num_cpus}", "--num-gpus=0", f"--temp-dir={self.temp_dir}",
                   "--node-ip-address=127.0.0.1", f"--node-name={self.name}", "--disable-usage-stats"]
        if self.resources:
            command.append(f"--resources={json.dumps(self.resources)}")
        command += [f"{flag}={port}" for flag, port in self._ports.items()]
        env = {**os.environ, **self.env, **self.head.client_env()}
        env.pop("RAY_ADDRESS", None)
        env.pop("RAY_AUTH_TOKEN", None)
        env["PATH"] = f"{Path(self.head.ray_binary).parent}{os.pathsep}{env.get('PATH', '')}"
        env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # stop() needs no drain (ray_head.py says why)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        try:
            self.node_id = self._wait_alive(timeout_s)
        except BaseException:
            self.kill()
            raise
        logger.info("Ray node %s (pid %d, id %s) joined %s", self.name, self.process.pid, self.node_id,
                    self.head.address)
        return self

    def _wait_alive(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start of node {self.name} exited with {self.process.returncode}: "
                                   f"{self.log_tail()}")
            state = self.state()
            if state and state["state"] == "ALIVE":
                return state["node_id"]
            time.sleep(1)
        raylet = self.temp_dir / "session_latest" / "logs" / "raylet.out"
        raylet_tail = raylet.read_text(errors="replace")[-2000:] if raylet.exists() else "(no raylet log)"
        raise TimeoutError(f"node {self.name} not alive after {timeout_s}s: {self.log_tail()}\nraylet: {raylet_tail}")

    def state(self) -> Optional[dict[str, Any]]:
        """This node's entry in the head's node table (the newest one of its name), or None."""
        try:
            mine = [n for n in cluster_nodes(self.head) if n.get("node_name") == self.name]
        except (urllib.error.URLError, OSError, KeyError, ValueError):
            return None
        return max(mine, key=lambda n: n.get("start_time_ms") or 0) if mine else None

    def processes(self) -> list:
        """This node's processes: `ray start` and everything under it (raylet, agents, workers and what
        they started, such as vLLM's engine core), and any re-parented process naming its temp dir."""
        import psutil

        found = {}
        if self.process is not None:
            try:
                root = psutil.Process(self.process.pid)
                found = {p.pid: p for p in [root, *root.children(recursive=True)]}
            except psutil.NoSuchProcess:
                pass
        marker = str(self.temp_dir)
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if any(marker in part for part in proc.info["cmdline"] or []):
                    found.setdefault(proc.pid, proc)
            except (psutil.Error, TypeError):
                continue
        return list(found.values())

    def kill(self) -> int:
        """Lose the node as a preempted instance is lost: SIGKILL its session and every process of it, by
        PID, with no chance to clean up. Returns how many processes were killed."""
        procs = self.processes()
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _sigkill(procs, timeout_s=30)
        if self.process is not None:
            self.process.wait(timeout=30)
        logger.info("Ray node %s: SIGKILLed %d processes", self.name, len(procs))
        return len(procs)

    def drain(self, reason_message: str, deadline_s: int = 60) -> subprocess.CompletedProcess:
        """Ask the GCS to drain this node, as the autoscaler does on a spot preemption notice: no new work is
        placed on it, and what runs there is told the node goes away in `deadline_s`."""
        env = {**os.environ, **self.head.client_env()}
        env.pop("RAY_ADDRESS", None)
        return subprocess.run([self.head.ray_binary, "drain-node", f"--address={self.head.address}",
                               f"--node-id={self.node_id}", "--reason=DRAIN_NODE_REASON_PREEMPTION",
                               f"--reason-message={reason_message}", f"--deadline-remaining-seconds={deadline_s}"],
                              env=env, capture_output=True, text=True, timeout=120)

    def stop(self, grace_s: float = 30.0) -> None:
        """An orderly stop (SIGTERM to `ray start`), then whatever of the node is left, by PID."""
        if self.process is None:
            return
        procs = self.processes()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        _sigkill([p for p in procs if p.is_running()], timeout_s=10)
        if self.process.poll() is None:
            self.process.wait(timeout=10)
        self.process = None

    def remove(self) -> None:
        """Stop the node (if running) and delete its temp dir."""
        self.stop()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def __enter__(self) -> "LocalRayNode":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.remove()


def _sigkill(procs: list, timeout_s: float) -> None:
    """SIGKILL each process (one already gone is fine) and wait for them to exit."""
    import psutil

    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=timeout_s)
