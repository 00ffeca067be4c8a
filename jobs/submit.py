"""Submit a command to a Ray cluster as a Ray job, follow its log and exit with its outcome.

A scriptable `ray job submit` (Ray's JobSubmissionClient underneath) that keeps the uploaded working
directory small and forwards environment variables by name:

    python -m jobs.submit --address http://head:8265 --working-dir . --env AWS_REGION \\
        --entrypoint-num-cpus 1 -- \\
        python -m jobs.caption --config configs/gpu-fp8.yaml --input s3://b/in --output s3://b/out/run-1

    # the project installed on the fly with its `gpu` extra (vLLM plugin entry point included):
    python -m jobs.submit --working-dir . --pip '${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}[gpu]' -- python -m jobs.caption ...

--address defaults to $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS (http://127.0.0.1:8265 for a local head).
--env NAME copies NAME from this shell; --env NAME=VALUE sets it. Both put the value into the job's
runtime_env, which the job API returns to anyone who may use the cluster, so secrets go by reference:
--env-ref NAME[=NODE_VAR] sets NAME to the node's own $NODE_VAR (default NAME), resolved by Ray on the node
(e.g. from a Kubernetes Secret); a secret-looking NAME (..._TOKEN, ..._SECRET_..., ..._KEY, PASSWORD...)
given a value is refused (exit 2). Credentials are best left to the nodes' instance role.

The cluster's auth token is sent when one is found: $RAY_AUTH_TOKEN, the file $RAY_AUTH_TOKEN_PATH, or
~/.ray/auth_token (cluster.yaml's token; `ray get-auth-token` prints it). The token travels only in the
request's Authorization header, never in the job.

Exit codes: 0 succeeded (or submitted, with --no-wait), 1 failed, 3 stopped, 4 still running when
--timeout-s passed (the job goes on), 2 invalid arguments or the cluster refused the job.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from pipeline.ops.submit import (DEFAULT_EXCLUDES, JobRequest, SubmitError, env_reference, find_auth_token, job_client,
                             submit_job, wait_for_job)

logger = logging.getLogger("jobs.submit")
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.submit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", help="Ray dashboard (job API) URL, e.g. http://head:8265")
    parser.add_argument("--working-dir", help="directory uploaded as the job's working directory (e.g. .)")
    parser.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                        help=f"also exclude from the upload (gitignore-style; always: {' '.join(DEFAULT_EXCLUDES)})")
    parser.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
                        help="environment variable for the job (NAME alone copies it from this shell); its value "
                        "is readable through the job API, so never a secret")
    parser.add_argument("--env-ref", action="append", default=[], metavar="NAME[=NODE_VAR]",
                        help="set NAME to the node's own $NODE_VAR (default NAME), resolved by Ray on the node: "
                        "how secrets reach a job")
    parser.add_argument("--pip", action="append", default=[], metavar="SPEC",
                        help="pip requirement installed into the job's runtime environment")
    parser.add_argument("--py-executable", help="interpreter for the job's Ray workers (runtime_env py_executable)")
    parser.add_argument("--runtime-env-json", default="{}", help="further runtime_env fields, as JSON")
    parser.add_argument("--entrypoint-num-cpus", type=float, help="CPUs reserved for the entrypoint")
    parser.add_argument("--entrypoint-num-gpus", type=float, help="GPUs reserved for the entrypoint")
    parser.add_argument("--entrypoint-memory", type=int, help="memory (bytes) reserved for the entrypoint")
    parser.add_argument("--entrypoint-resources", help="custom resources for the entrypoint, as JSON")
    parser.add_argument("--submission-id", help="job id (default: Ray picks one)")
    parser.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE", help="job metadata")
    parser.add_argument("--no-wait", action="store_true", help="submit and exit 0 without waiting")
    parser.add_argument("--no-logs", action="store_true", help="wait without streaming the job's log")
    parser.add_argument("--timeout-s", type=float, help="stop waiting after this long (the job goes on)")
    parser.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- COMMAND ARGS... run on the cluster")
    args = parser.parse_args(argv)
    if args.entrypoint[:1] == ["--"]:
        args.entrypoint = args.entrypoint[1:]
    if not args.entrypoint:
        parser.error("give the command to run after --")
    return args


def build_request(args: argparse.Namespace, environ: dict[str, str]) -> JobRequest:
    """The JobRequest of the parsed arguments; ValueError names the argument that is wrong."""
    env_vars = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep:
            if name not in environ:
                raise ValueError(f"--env {name}: not set in this shell")
            value = environ[name]
        env_vars[name] = value
    for item in args.env_ref:
        name, _, node_var = item.partition("=")
        env_vars[name] = env_reference(node_var or name)
    metadata = dict(item.partition("=")[::2] for item in args.metadata)
    try:
        runtime_env = json.loads(args.runtime_env_json)
        resources = json.loads(args.entrypoint_resources) if args.entrypoint_resources else None
    except json.JSONDecodeError as exc:
        raise ValueError(f"--runtime-env-json / --entrypoint-resources: invalid JSON: {exc}") from None
    if not isinstance(runtime_env, dict):
        raise ValueError("--runtime-env-json: expected a JSON object")
    working_dir = os.path.abspath(args.working_dir) if args.working_dir else None
    return JobRequest(
        entrypoint=list(args.entrypoint), working_dir=working_dir, excludes=DEFAULT_EXCLUDES + args.exclude,
        env_vars=env_vars, pip=list(args.pip), py_executable=args.py_executable, runtime_env=runtime_env,
        entrypoint_num_cpus=args.entrypoint_num_cpus, entrypoint_num_gpus=args.entrypoint_num_gpus,
        entrypoint_memory=args.entrypoint_memory, entrypoint_resources=resources,
        submission_id=args.submission_id, metadata=metadata)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        request = build_request(args, dict(os.environ))
        client = job_client(args.address, find_auth_token(os.environ, Path.home()))
        submission_id = submit_job(client, request)
    except (ValueError, SubmitError) as exc:
        logger.error("%s", exc)
        return 2
    if args.no_wait:
        logger.info("job %s submitted; not waiting", submission_id)
        return 0
    sink = None if args.no_logs else _write_stdout
    status = wait_for_job(client, submission_id, timeout_s=args.timeout_s, log_sink=sink)
    logger.info("job %s: %s", submission_id, status)
    return EXIT_CODES.get(status, 4)


def _write_stdout(chunk: str) -> None:
    sys.stdout.write(chunk)
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
