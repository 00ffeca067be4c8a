"""jobs.submit: arguments to a Ray job request (runtime_env, resources), the auth token, exit codes."""
import logging
import socket

import pytest

from jobs import submit as submit_cli
from pipeline.ops.submit import DEFAULT_EXCLUDES, JobRequest, find_auth_token


def request_of(argv, environ=None):
    return submit_cli.build_request(submit_cli.parse_args(argv), environ or {})


def test_arguments_become_a_job_request(tmp_path):
    request = request_of(
        ["--working-dir", str(tmp_path), "--exclude", "data/", "--env", "AWS_REGION", "--env", "MODE=batch",
         "--pip", "${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}[gpu]", "--runtime-env-json", '{"env_vars": {"A": "1"}, "config": {"setup_timeout_seconds": 1800}}',
         "--entrypoint-num-cpus", "2", "--entrypoint-num-gpus", "0.5", "--entrypoint-memory", "1000",
         "--entrypoint-resources", '{"accelerator_type:L40S": 0.01}', "--submission-id", "caption-1",
         "--metadata", "team=vision", "--",
         "python", "-m", "jobs.caption", "--input", "s3://b/in dir", "--output", "s3://b/out"],
        environ={"AWS_REGION": "eu-west-1"})
    assert request.command() == "python -m jobs.caption --input 's3://b/in dir' --output s3://b/out"
    env = request.build_runtime_env()
    assert env["working_dir"] == str(tmp_path)
    assert set(DEFAULT_EXCLUDES) | {"data/"} == set(env["excludes"]) and ".venv" in env["excludes"]
    assert env["env_vars"] == {"A": "1", "AWS_REGION": "eu-west-1", "MODE": "batch"}
    assert env["pip"] == ["${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}[gpu]"]
    assert env["config"] == {"setup_timeout_seconds": 1800}
    assert (request.entrypoint_num_cpus, request.entrypoint_num_gpus, request.entrypoint_memory) == (2, 0.5, 1000)
    assert request.entrypoint_resources == {"accelerator_type:L40S": 0.01}
    assert request.submission_id == "caption-1" and request.metadata == {"team": "vision"}


def test_no_working_dir_means_no_upload():
    env = JobRequest(entrypoint=["python", "-V"]).build_runtime_env()
    assert env == {}, "the installed package is used; nothing is uploaded"
    assert JobRequest(entrypoint=["x"], py_executable="/opt/venv/bin/python").build_runtime_env() == {
        "py_executable": "/opt/venv/bin/python"}


@pytest.mark.parametrize("argv, message", [
    pytest.param(["--env", "NOT_SET_ANYWHERE", "--", "true"], "--env NOT_SET_ANYWHERE: not set", id="missing-env"),
    pytest.param(["--runtime-env-json", "{", "--", "true"], "invalid JSON", id="bad-json"),
    pytest.param(["--runtime-env-json", "[1]", "--", "true"], "expected a JSON object", id="not-an-object"),
])
def test_bad_arguments_exit_2(argv, message, caplog):
    with caplog.at_level(logging.ERROR, logger="jobs.submit"):
        assert submit_cli.main(argv) == 2
    assert message in caplog.text


def test_an_unreachable_cluster_exits_2(caplog):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but not listening: connection refused
        with caplog.at_level(logging.ERROR, logger="jobs.submit"):
            assert submit_cli.main(["--address", f"http://127.0.0.1:{port}", "--", "true"]) == 2
    assert "cannot reach the Ray job API" in caplog.text


def test_a_command_is_required():
    with pytest.raises(SystemExit):
        submit_cli.parse_args(["--address", "http://x:8265"])


def test_auth_token_sources_in_order(tmp_path):
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home-token\n")
    custom = tmp_path / "custom-token"
    custom.write_text("path-token")
    assert find_auth_token({"RAY_AUTH_TOKEN": "env-token", "RAY_AUTH_TOKEN_PATH": str(custom)}, tmp_path) == "env-token"
    assert find_auth_token({"RAY_AUTH_TOKEN_PATH": str(custom)}, tmp_path) == "path-token"
    assert find_auth_token({}, tmp_path) == "home-token"
    assert find_auth_token({}, tmp_path / "nowhere") is None


def test_secrets_go_by_reference_never_by_value():
    """A secret-looking variable becomes `${NODE_VAR}`, which Ray expands on the node; its value never
    enters the runtime_env that the job API hands back to every user of the cluster."""
    request = request_of(["--env-ref", "AWS_SECRET_ACCESS_KEY", "--env-ref", "HF_TOKEN=CLUSTER_HF_TOKEN",
                          "--env", "TOKENIZERS_PARALLELISM=false", "--", "true"],
                         environ={"AWS_SECRET_ACCESS_KEY": "wJalr-secret", "HF_TOKEN": "hf_secret"})
    env = request.build_runtime_env()["env_vars"]
    assert env == {"AWS_SECRET_ACCESS_KEY": "${AWS_SECRET_ACCESS_KEY}", "HF_TOKEN": "${CLUSTER_HF_TOKEN}",
                   "TOKENIZERS_PARALLELISM": "false"}
    assert "secret" not in repr(request)


def test_ray_expands_the_reference_from_the_nodes_environment(monkeypatch):
    """What a job's worker does with the reference (Ray's own function, as each worker starts)."""
    from ray._private.utils import update_envs

    monkeypatch.setenv("CLUSTER_HF_TOKEN", "from-the-node")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    update_envs(request_of(["--env-ref", "HF_TOKEN=CLUSTER_HF_TOKEN", "--", "true"]).build_runtime_env()["env_vars"])
    import os
    assert os.environ["HF_TOKEN"] == "from-the-node"


@pytest.mark.parametrize("argv, environ", [
    pytest.param(["--env", "AWS_SECRET_ACCESS_KEY"], {"AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI-value"}, id="copied-from-shell"),
    pytest.param(["--env", "HF_TOKEN=hf_abc"], {}, id="given-a-value"),
    pytest.param(["--env", "GEMMA_API_KEYS=k1,k2"], {}, id="api-keys"),
    pytest.param(["--env", "DB_PASSWORD=x"], {}, id="password"),
    pytest.param(["--runtime-env-json", '{"env_vars": {"RAY_AUTH_TOKEN": "abc"}}'], {}, id="runtime-env-json"),
    pytest.param(["--env", "AWS_SESSION_TOKEN=${A}x"], {}, id="reference-plus-text"),
])
def test_secret_values_are_refused(argv, environ, caplog, monkeypatch):
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    with caplog.at_level(logging.ERROR, logger="jobs.submit"):
        assert submit_cli.main([*argv, "--", "true"]) == 2
    assert "looks like a secret" in caplog.text and "--env-ref" in caplog.text
    assert all(value not in caplog.text for value in environ.values())


def test_secret_names():
    from pipeline.ops.submit import is_secret_name

    assert all(map(is_secret_name, ["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "HF_TOKEN", "GEMMA_API_KEYS",
                                    "RAY_AUTH_TOKEN", "PG_PASSWORD", "OPENAI_APIKEY"]))
    assert not any(map(is_secret_name, ["AWS_REGION", "AWS_ENDPOINT_URL", "TOKENIZERS_PARALLELISM", "MODE", "KEYBOARD"]))


def test_a_job_request_itself_refuses_secret_values():
    """pipeline.ops.schedule builds its requests directly: the same rule holds there."""
    with pytest.raises(ValueError, match="HF_TOKEN: looks like a secret"):
        JobRequest(entrypoint=["true"], env_vars={"HF_TOKEN": "hf_abc"})
    with pytest.raises(ValueError, match="api-keys"):
        from pipeline.ops.submit import env_reference
        env_reference("api-keys")
    assert JobRequest(entrypoint=["true"], env_vars={"HF_TOKEN": "${HF_TOKEN}"}).env_vars == {"HF_TOKEN": "${HF_TOKEN}"}
