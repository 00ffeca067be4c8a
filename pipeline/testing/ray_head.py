"""A real local Ray head (`ray start --head`) for tests, started and stopped without touching other Ray
clusters on the machine.

`ray stop` is not an option: in Ray 2.60 it has no --address and terminates every Ray process of every
user on the machine (it matches process names: raylet, gcs_server, ...). Instead:

- the head runs as `ray start --head --block` in a session of its own, with its own `--temp-dir` and free
  ports for everything that would otherwise take a fixed one (GCS 6379, client server 10001, dashboard
  8265, dashboard agent 52365), so it neither collides with nor is found by another cluster
  (`ray.init("auto")` elsewhere reads /tmp/ray, not our temp dir);
- stopping sends SIGTERM to that `ray start` process, which (with --block) shuts down the processes of
  its node; then whatever is left of its process tree, and any process whose command line names our
  temp dir (workers re-parented elsewhere), is terminated by PID.

    with LocalRayHead(num_cpus=8, env={...}) as head:
        JobSubmissionClient(head.dashboard_url).submit_job(...)

`ClusterHeadStart.load("cluster.yaml")` reads how the cluster launcher starts the head (the `ray start`
flags of head_start_ray_commands and the container's `--env` settings) so that a test can start this head
the same way: `LocalRayHead(env=start.env, extra_args=start.local_args())`.
"""
from __future__ import annotations

import logging
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pipeline.testing.ports import free_ports

logger = logging.getLogger(__name__)


class LocalRayHead:
    def __init__(self, num_cpus: int = 8, env: Optional[dict[str, str]] = None, ray_binary: Optional[str] = None,
                 extra_args: Optional[list[str]] = None):
        self.num_cpus = num_cpus
        # The head's own environment; it wins over client_env(), so a caller can start the head with
        # another auth setting (e.g. cluster.yaml's) than the one its clients use.
        self.env = dict(env or {})
        # More `ray start` flags, after ours (a flag given twice takes the last value).
        self.extra_args = list(extra_args or [])
        self.ray_binary = ray_binary or str(Path(sys.executable).parent / "ray")
        # Short: Ray's unix sockets live under it and must stay below 108 characters.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rayh-", dir="/tmp"))
        ports = free_ports(8)
        self.port, self.dashboard_port = ports[0], ports[1]
        self._extra_ports = {"--ray-client-server-port": ports[2], "--dashboard-agent-listen-port": ports[3],
                             "--dashboard-agent-grpc-port": ports[4], "--runtime-env-agent-port": ports[5],
                             "--metrics-export-port": ports[6], "--node-manager-port": ports[7]}
        self.process: Optional[subprocess.Popen] = None
        self.log_path = self.temp_dir / "ray-start.log"
        # Its own auth token: Ray 2.60's `ray start` turns token authentication on when ~/.ray/auth_token
        # exists, and would then share that token with every other local cluster.
        self.token_path = self.temp_dir / "auth_token"
        self.token_path.write_text(secrets.token_hex(32))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def token(self) -> str:
        return self.token_path.read_text().strip()

    def client_env(self) -> dict[str, str]:
        """Variables that let Ray's clients (and jobs.submit) authenticate to this head."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path)}

    def start(self, timeout_s: float = 180.0) -> "LocalRayHead":
        command = [self.ray_binary, "start", "--head", "--block", f"--port={self.port}",
                   f"--num-cpus={self.num_cpus}", "--num-gpus=0", f"--temp-dir={self.temp_dir}",
                   "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                   f"--dashboard-port={self.dashboard_port}", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
        command += [f"{flag}={port}" for flag, port in self._extra_ports.items()]
        command += self.extra_args
        env = {**os.environ, **self.client_env(), **self.env}
        env.pop("RAY_ADDRESS", None)
        env.pop("RAY_AUTH_TOKEN", None)
        # Jobs run `python ...` from the head's PATH: this interpreter's environment comes first.
        env["PATH"] = f"{Path(self.ray_binary).parent}{os.pathsep}{env.get('PATH', '')}"
        # On SIGTERM, Ray 2.60's `ray start` first drains the node, for up to 30 s (for Serve proxies on
        # Kubernetes). After the ops test's caption jobs the node never reported idle, so stop() waited the
        # whole 30 s and then SIGKILLed it. Nothing here needs draining: 0 gives the immediate, orderly
        # teardown.
        env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        log.close()
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        logger.info("Ray head (pid %d) ready: GCS %s, job API %s", self.process.pid, self.address, self.dashboard_url)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        """Until the job API answers Ray's own client (which also sends the cluster's auth token: Ray 2.60
        uses token authentication whenever a token is configured)."""
        from ray.job_submission import JobSubmissionClient

        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.process.returncode}: {self.log_tail()}")
            try:
                JobSubmissionClient(self.dashboard_url, headers={"Authorization": f"Bearer {self.token}"}).get_version()
                return
            except (ConnectionError, RuntimeError, ValueError):
                pass
            time.sleep(1)
        raise TimeoutError(f"Ray head's job API not up after {timeout_s}s: {self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def stop(self, grace_s: float = 30.0) -> None:
        """Stop this head and only its processes (see the module docstring)."""
        import psutil

        if self.process is None:
            return
        leftovers: list[psutil.Process] = []
        try:
            leftovers = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        marker = str(self.temp_dir)
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if any(marker in part for part in proc.info["cmdline"] or []):
                    leftovers.append(proc)
            except (psutil.Error, TypeError):
                continue
        alive = [p for p in {p.pid: p for p in leftovers}.values() if p.is_running()]
        for proc in alive:
            try:
                proc.terminate()
            except psutil.Error:
                pass
        _, still = psutil.wait_procs(alive, timeout=10)
        for proc in still:
            try:
                proc.kill()
            except psutil.Error:
                pass
        if still or alive:
            logger.info("Ray head: terminated %d leftover processes", len(alive))
        self.process = None
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "LocalRayHead":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# `ray start` flags a test's head must set itself: its ports and temp dir (free ones, so that it never meets
# another cluster), the node address (loopback here) and the autoscaler's config, which the cluster launcher
# writes on the cloud head (~/ray_bootstrap_config.yaml) and which only works against the cloud provider.
OWN_FLAGS = ("--port", "--temp-dir", "--node-ip-address", "--dashboard-port", "--ray-client-server-port",
             "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
             "--metrics-export-port", "--node-manager-port", "--autoscaling-config", "--num-cpus", "--num-gpus",
             "--block", "--head")


@dataclass
class ClusterHeadStart:
    """How a cluster launcher config (cluster.yaml) starts Ray on its head node."""

    args: list[str]        # the `ray start` words after `ray start`
    env: dict[str, str]    # the container's environment (docker run_options --env/-e NAME=VALUE)

    @classmethod
    def load(cls, path) -> "ClusterHeadStart":
        import yaml

        config = yaml.safe_load(Path(path).read_text())
        return cls(args=ray_start_args(config["head_start_ray_commands"]),
                   env=docker_env(config.get("docker", {}).get("run_options", [])
                                  + config.get("docker", {}).get("head_run_options", [])))

    def flag(self, name: str) -> Optional[str]:
        """The value of `--name=value` / `--name value` (last one wins, as in click), or None."""
        value = None
        for i, word in enumerate(self.args):
            if word == name and i + 1 < len(self.args) and not self.args[i + 1].startswith("--"):
                value = self.args[i + 1]
            elif word.startswith(name + "="):
                value = word[len(name) + 1:]
        return value

    def local_args(self) -> list[str]:
        """The flags a LocalRayHead passes on: all of them but those it sets itself (OWN_FLAGS)."""
        kept, skip = [], False
        for word in self.args:
            if skip:
                skip = False
                continue
            name = word.split("=", 1)[0]
            if name in OWN_FLAGS:
                skip = "=" not in word and name not in ("--block", "--head")
                continue
            kept.append(word)
        return kept


def ray_start_args(commands: list[str]) -> list[str]:
    """The words after `ray start` in the one command (of `;`/`&&`-joined shell commands) that starts Ray."""
    found = []
    for command in commands:
        for part in command.replace("&&", ";").split(";"):
            words = shlex.split(part)
            # `export A=B`, `ulimit ...`, `VAR=value ray start ...`: skip to the `ray` word.
            while words and "=" in words[0] and not words[0].startswith("-"):
                words = words[1:]
            if words[:2] == ["ray", "start"]:
                found.append(words[2:])
    if len(found) != 1:
        raise ValueError(f"expected exactly one `ray start` in {commands!r}, found {len(found)}")
    return found[0]


def docker_env(run_options: list[str]) -> dict[str, str]:
    """NAME=VALUE pairs of `--env`/`-e` options (as docker run reads them)."""
    words = [w for option in run_options for w in shlex.split(option)]
    env = {}
    for i, word in enumerate(words):
        if word in ("--env", "-e") and i + 1 < len(words):
            item = words[i + 1]
        elif word.startswith("--env="):
            item = word[len("--env="):]
        else:
            continue
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"docker --env {name}: give NAME=VALUE (a bare name copies the launcher's shell)")
        env[name] = value
    return env
