"""Submitting a command to a Ray cluster as a Ray job, and waiting for it: a thin layer over Ray's
`JobSubmissionClient` (the job API of the head's dashboard, port 8265).

What it adds to `ray job submit`: excludes that keep the uploaded working directory small (virtualenvs,
build output and work data never travel), environment variables forwarded from the submitting shell by
name, and one terminal status that callers turn into an exit code. `jobs.submit` is its command line;
`pipeline.ops.schedule` submits each tick's caption job through it.

Secrets never travel in a job: a runtime_env is stored in the cluster's GCS and returned by the job API
(`ray job list`, the dashboard) to anyone who may use the cluster. A variable whose name looks like a
secret (`is_secret_name`) may only carry a reference, `${NODE_VAR}`, which Ray expands on the node when it
starts the job's processes (ray._private.utils.update_envs), from the node's own environment (e.g. a
Kubernetes Secret or the instance role); JobRequest refuses a literal value.
"""
from __future__ import annotations

import asyncio
import logging
import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

logger = logging.getLogger(__name__)

# Never uploaded with the working directory: environments, caches and data (Ray caps a working_dir
# package at 500 MiB, and a checkout with .venv is gigabytes). Patterns are gitignore-style.
DEFAULT_EXCLUDES = [".git", ".venv", ".venv-*", "work/", ".gpu/", ".whl/", "build/", "*.egg-info",
                    "__pycache__", ".pytest_cache", "bench/results/"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(RuntimeError):
    """The job could not be submitted or followed (cluster unreachable, bad runtime_env)."""


# Words that mark a variable as a secret when they are one of its `_`-separated parts (so HF_TOKEN and
# AWS_SECRET_ACCESS_KEY are secrets, TOKENIZERS_PARALLELISM is not).
SECRET_WORDS = frozenset({"SECRET", "SECRETS", "TOKEN", "TOKENS", "PASSWORD", "PASSWD", "PASSPHRASE", "CREDENTIAL",
                          "CREDENTIALS", "KEY", "KEYS", "APIKEY", "PRIVATE"})
# A value that is only a reference to a variable of the node, expanded there by Ray.
_REFERENCE = re.compile(r"\$\{[A-Z0-9_]+\}")


def is_secret_name(name: str) -> bool:
    return any(part in SECRET_WORDS for part in name.upper().split("_"))


def env_reference(node_var: str) -> str:
    """The runtime_env value that Ray replaces, on the node, with the node's `$node_var` ('' if unset)."""
    if not re.fullmatch(r"[A-Z0-9_]+", node_var):
        raise ValueError(f"{node_var!r}: a node variable name is upper-case letters, digits and _ "
                         "(the only names Ray expands in runtime_env env_vars)")
    return "${" + node_var + "}"


def check_no_secret_values(env_vars: Mapping[str, str]) -> None:
    """ValueError for a secret-looking variable given a value instead of a `${NODE_VAR}` reference."""
    for name, value in env_vars.items():
        if is_secret_name(name) and not _REFERENCE.fullmatch(str(value)):
            raise ValueError(
                f"env {name}: looks like a secret, and a job's runtime_env can be read back by anyone who "
                f"may use the cluster's job API; pass it by reference instead (jobs.submit --env-ref "
                f"{name}[=NODE_VAR], i.e. {name}=${{NODE_VAR}}, resolved from the node's environment), or "
                "give the nodes the credential themselves (instance role, Kubernetes Secret)")


@dataclass
class JobRequest:
    """One Ray job: the command and where and with what it runs."""

    entrypoint: list[str]
    working_dir: Optional[str] = None
    excludes: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDES))
    env_vars: dict[str, str] = field(default_factory=dict)
    pip: list[str] = field(default_factory=list)
    py_executable: Optional[str] = None
    runtime_env: dict[str, Any] = field(default_factory=dict)  # merged under the fields above
    entrypoint_num_cpus: Optional[float] = None
    entrypoint_num_gpus: Optional[float] = None
    entrypoint_memory: Optional[int] = None
    entrypoint_resources: Optional[dict[str, float]] = None
    submission_id: Optional[str] = None
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_no_secret_values(self.env_vars)
        check_no_secret_values(self.runtime_env.get("env_vars") or {})

    def command(self) -> str:
        return shlex.join(self.entrypoint)

    def build_runtime_env(self) -> dict[str, Any]:
        """The job's runtime_env: `runtime_env` first, then the explicit fields on top.

        `pip` builds a virtualenv over the cluster's Python on each node that runs the job (once, then
        cached); `${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}[gpu]` installs the uploaded checkout itself, with
        its vLLM plugin entry point. `py_executable` changes the interpreter of Ray workers only; the
        entrypoint's `python` stays the one on the node's PATH.
        """
        env = dict(self.runtime_env)
        if self.working_dir:
            env["working_dir"] = self.working_dir
            env["excludes"] = sorted(set(env.get("excludes", [])) | set(self.excludes))
        if self.env_vars:
            env["env_vars"] = {**env.get("env_vars", {}), **self.env_vars}
        if self.pip:
            env["pip"] = list(self.pip)
        if self.py_executable:
            env["py_executable"] = self.py_executable
        return env


def find_auth_token(environ: Mapping[str, str], home: Path) -> Optional[str]:
    """The cluster's auth token where Ray keeps it: $RAY_AUTH_TOKEN, the file $RAY_AUTH_TOKEN_PATH, or
    ~/.ray/auth_token. Ray 2.60 turns token authentication on whenever a token is configured, and its JobSubmissionClient
    sends the token only when $RAY_AUTH_MODE=token in the submitting process; passing it explicitly
    works either way (a cluster without authentication ignores it)."""
    if environ.get("RAY_AUTH_TOKEN"):
        return environ["RAY_AUTH_TOKEN"].strip()
    path = Path(environ["RAY_AUTH_TOKEN_PATH"]) if environ.get("RAY_AUTH_TOKEN_PATH") else home / ".ray" / "auth_token"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def job_client(address: Optional[str], token: Optional[str] = None):
    """Ray's client for the job API; `address` None means $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS, as for
    `ray job submit`."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as exc:
        raise SubmitError(f"the Ray job API at {address or '$RAY_ADDRESS'} refused our token: {exc}") from None
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise SubmitError(f"cannot reach the Ray job API at {address or '$RAY_ADDRESS'}: {exc}") from None


def submit_job(client, request: JobRequest) -> str:
    """Submit and return the submission id (the job runs asynchronously)."""
    kwargs: dict[str, Any] = {"entrypoint": request.command(), "runtime_env": request.build_runtime_env() or None,
                              "submission_id": request.submission_id, "metadata": request.metadata or None}
    for name in ("entrypoint_num_cpus", "entrypoint_num_gpus", "entrypoint_memory", "entrypoint_resources"):
        if getattr(request, name) is not None:
            kwargs[name] = getattr(request, name)
    try:
        submission_id = client.submit_job(**kwargs)
    except RuntimeError as exc:  # the SDK raises RuntimeError for any non-200 answer
        raise SubmitError(f"job submission refused: {exc}") from None
    logger.info("submitted Ray job %s: %s", submission_id, request.command())
    return submission_id


def job_status(client, submission_id: str) -> str:
    """The job's status name: PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
    return str(client.get_job_status(submission_id).value)


def wait_for_job(client, submission_id: str, *, timeout_s: Optional[float] = None, poll_s: float = 2.0,
                 log_sink: Optional[Callable[[str], None]] = None,
                 clock: Callable[[], float] = time.monotonic) -> str:
    """Wait until the job ends (or `timeout_s` passes) and return its last status.

    With `log_sink`, the job's log is streamed to it as it is written (Ray's tail API).
    """
    deadline = None if timeout_s is None else clock() + timeout_s
    if log_sink is not None:
        _follow_logs(client, submission_id, log_sink, deadline, clock)
    while True:
        status = job_status(client, submission_id)
        if status in TERMINAL or (deadline is not None and clock() >= deadline):
            return status
        time.sleep(poll_s)


def _follow_logs(client, submission_id: str, sink: Callable[[str], None], deadline: Optional[float],
                 clock: Callable[[], float]) -> None:
    async def follow() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            sink(chunk)
            if deadline is not None and clock() >= deadline:
                return

    asyncio.run(follow())


def job_failure_summary(client, submission_id: str, lines: int = 40) -> str:
    """The job's status message and the last lines of its log, for an error message."""
    info = client.get_job_info(submission_id)
    try:
        tail = "\n".join(client.get_job_logs(submission_id).splitlines()[-lines:])
    except RuntimeError:
        tail = "(log unavailable)"
    return f"{info.status}: {info.message or ''}\n{tail}"
