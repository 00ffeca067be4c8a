"""Shared fixtures: the tiny random-weight Gemma 3 (built once per run) and a real S3 server process.

Prerequisites that are missing make tests fail, never skip: a test that cannot run its real parts is a
red test.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_CPU_CONFIG = ROOT / "configs" / "tiny-cpu.yaml"
# The quantize environment (llm-compressor; it cannot share one with vLLM, NOTES §1): `make quantize-env`.
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
