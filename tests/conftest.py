"""Shared fixtures: the tiny random-weight Gemma 3 (built once per run) and a real S3 server process.

Prerequisites that are missing make tests fail, never skip: a test that cannot run its real parts is a
red test.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_CPU_CONFIG = ROOT / "configs" / "tiny-cpu.yaml"
# The quantize environment (llm-compressor; it cannot share one with vLLM, docs/notes.md: Versions): `make quantize-env`.
QUANTIZE_PYTHON = ROOT / ".venv-quantize" / "bin" / "python"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny Gemma 3 checkpoint; $TINY_GEMMA3_DIR reuses a prebuilt one across runs."""
    from pipeline.testing.tiny_gemma3 import build_gemma3

    prebuilt = os.environ.get("TINY_GEMMA3_DIR")
    if prebuilt and (Path(prebuilt) / "config.json").exists():
        return Path(prebuilt)
    return build_gemma3(tmp_path_factory.mktemp("models") / "tiny-gemma3")


@pytest.fixture(scope="session")
def tiny_model_transformers_layout(tmp_path_factory) -> Path:
    """A tiny Gemma 3 as a fine-tune saved today has it: SigLIP under transformers 5's `vision_tower.*`
    names (not Google's), and shapes unlike `tiny_model`'s (TINY_ALT: 3 text layers, 2 vision layers)."""
    from pipeline.testing.tiny_gemma3 import TINY_ALT, build_gemma3

    return build_gemma3(tmp_path_factory.mktemp("models") / "tiny-gemma3-transformers", TINY_ALT, seed=1,
                        layout="transformers")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    from pipeline.testing.s3_server import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3")).start()
    server.create_bucket("data")
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point this process (boto3, config loading) at the test S3 server."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server.env()


@pytest.fixture(scope="session")
def quantize_python() -> Path:
    """The quantize environment's interpreter; missing, the test fails (CI builds it with `make test`)."""
    assert QUANTIZE_PYTHON.exists(), f"{QUANTIZE_PYTHON} is missing: run `make quantize-env`"
    return QUANTIZE_PYTHON


def run_job(module: str, *args: str, env: dict[str, str] | None = None, timeout_s: int = 900,
            cwd: Path = ROOT, python: str | Path = sys.executable) -> subprocess.CompletedProcess:
    """Run `python -m module args...` as its own process, as a user or `ray job submit` would."""
    full_env = {**os.environ, **OFFLINE_ENV, **(env or {})}
    full_env.pop("RAY_ADDRESS", None)
    return subprocess.run([str(python), "-m", module, *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout_s)


class BackgroundJob:
    """`python -m module args...` as run_job runs it, started now and left running while the test goes on;
    `result()` waits for it and returns what run_job would have. Its output goes to files under log_dir."""

    def __init__(self, module: str, *args: str, log_dir: Path, env: dict[str, str] | None = None,
                 cwd: Path = ROOT, python: str | Path = sys.executable):
        full_env = {**os.environ, **OFFLINE_ENV, **(env or {})}
        full_env.pop("RAY_ADDRESS", None)
        self.args = [str(python), "-m", module, *args]
        self.stdout_path, self.stderr_path = log_dir / f"{module}.stdout", log_dir / f"{module}.stderr"
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.process = subprocess.Popen(self.args, cwd=cwd, env=full_env, stdout=out, stderr=err,
                                            start_new_session=True)

    def result(self, timeout_s: int = 900) -> subprocess.CompletedProcess:
        try:
            returncode = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.stop()
            raise
        return subprocess.CompletedProcess(self.args, returncode, self.stdout_path.read_text(errors="replace"),
                                           self.stderr_path.read_text(errors="replace"))

    def stop(self) -> None:
        """SIGKILL its process group, if it still runs (a test that failed before waiting for it)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=60)


def free_port() -> int:
    from pipeline.testing.ports import free_ports

    return free_ports(1)[0]


class Endpoint(str):
    """The base URL of a running endpoint; `log_path` holds what jobs.serve printed (Ray's replica lines too)."""

    log_path: Path


@contextlib.contextmanager
def serve_endpoint(tiny_model: Path, work: Path, api_keys: list[str], *overrides: str, ready_timeout_s: int = 600):
    """`python -m jobs.serve` in its own process, as a user runs it; yields its base URL (an `Endpoint`)
    and stops it with SIGTERM (asserting a clean exit). Keys go through a file, as a mounted secret would."""
    import httpx

    keys_file = work / "api-keys"
    keys_file.write_text("# test keys\n" + "\n".join(api_keys) + "\n")
    port = free_port()
    log_path = work / "serve.log"
    env = {**os.environ, **OFFLINE_ENV}
    env.pop("RAY_ADDRESS", None)
    env.pop("GEMMA_API_KEYS", None)
    command = [sys.executable, "-m", "jobs.serve", "--config", str(TINY_CPU_CONFIG), "--model", str(tiny_model),
               "--set", f"serve.port={port}", "--set", f"serve.api_keys_file={keys_file}"]
    for override in overrides:
        command += ["--set", override]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    base = Endpoint(f"http://127.0.0.1:{port}")
    base.log_path = log_path
    deadline = time.monotonic() + ready_timeout_s
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"jobs.serve exited with {process.returncode}:\n{log_path.read_text()[-6000:]}")
            try:
                if httpx.get(f"{base}/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"not ready after {ready_timeout_s}s:\n{log_path.read_text()[-6000:]}")
            time.sleep(2)
        yield base
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0, log_path.read_text()[-3000:]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
