"""Caption new input files on a schedule: each tick captions only files no earlier tick captioned.

    # every 15 minutes, each tick submitted as a Ray job to a running cluster:
    python -m jobs.schedule --cron '*/15 * * * *' --input s3://b/incoming --output s3://b/captions \\
        --config configs/gpu-fp8.yaml --submit-to http://head:8265 --working-dir .
    # one tick, captioning in this process (embedded Ray, or the cluster this runs on): for cron,
    # a Kubernetes CronJob or a KubeRay RayCronJob, which do the scheduling themselves
    python -m jobs.schedule --once --input s3://b/incoming --output s3://b/captions --config configs/gpu-fp8.yaml

Each tick writes its captions to OUTPUT/runs/<run_id>/ (parquet + _manifest.json) and keeps its ledger in
OUTPUT/_ledger/ (claims, done markers, run records). Overlapping ticks (two schedulers, a slow tick and
the next) never caption a file twice; a failed tick's files are captioned by the next tick. A file is
identified by its path and S3 ETag (locally mtime and size): rewriting it captions it again.
Cron expressions are evaluated in UTC.

Exit codes: 0 (--once: nothing new, or the tick succeeded; --cron: stopped), 1 the tick's caption run
failed (--once), 2 invalid arguments, config or prefixes.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import signal
import sys
from dataclasses import asdict
from pathlib import Path

from pipeline.config import ConfigError, PipelineConfig

logger = logging.getLogger("jobs.schedule")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.schedule", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    when = parser.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", metavar="EXPR", help="cron expression (UTC), e.g. '0 * * * *'")
    when.add_argument("--once", action="store_true", help="run one tick and exit (external scheduler)")
    parser.add_argument("--input", required=True, help="prefix (or file) of parquet inputs, local or s3://")
    parser.add_argument("--output", required=True, help="output prefix: runs/<run_id>/ and _ledger/ go here")
    parser.add_argument("--config", help="YAML config file (see configs/)")
    parser.add_argument("--model", help="checkpoint (model.source)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field (repeatable)")
    parser.add_argument("--max-files", type=int, help="caption at most this many files per tick")
    parser.add_argument("--lease-s", type=float, default=900.0,
                        help="a run without a heartbeat for this long is taken for dead (default 900)")
    job = parser.add_argument_group("submitting each tick as a Ray job (default: caption in this process)")
    job.add_argument("--submit-to", metavar="URL", help="Ray job API of the cluster, e.g. http://head:8265")
    job.add_argument("--working-dir", help="uploaded as the caption job's working directory (e.g. .)")
    job.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
                     help="environment variable for the caption job (NAME alone copies it from this shell)")
    job.add_argument("--pip", action="append", default=[], metavar="SPEC", help="pip requirement for the job")
    job.add_argument("--entrypoint-num-cpus", type=float, help="CPUs reserved for the caption job's driver")
    job.add_argument("--entrypoint-python", default="python", help="interpreter the job runs (default: python)")
    return parser.parse_args(argv)


def build_runner(args: argparse.Namespace, config: PipelineConfig):
    from pipeline.ops.schedule import InProcessRunner, SubmittedRunner
    from pipeline.ops.submit import JobRequest, find_auth_token

    if not args.submit_to:
        return InProcessRunner(config)
    env_vars = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep and name not in os.environ:
            raise ValueError(f"--env {name}: not set in this shell")
        env_vars[name] = value if sep else os.environ[name]
    caption_args = (["--config", args.config] if args.config else []) + (["--model", args.model] if args.model else [])
    for override in args.overrides:
        caption_args += ["--set", override]
    template = JobRequest(entrypoint=[], working_dir=os.path.abspath(args.working_dir) if args.working_dir else None,
                          env_vars=env_vars, pip=list(args.pip), entrypoint_num_cpus=args.entrypoint_num_cpus)
    return SubmittedRunner(args.submit_to, template, caption_args, python=args.entrypoint_python,
                           token=find_auth_token(os.environ, Path.home()))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pipeline.ops.schedule import (ScheduleError, TickRequest, check_cron, check_prefixes, query_job_state,
                                   run_schedule, run_tick)
    from pipeline.ops.submit import find_auth_token

    overrides = list(args.overrides) + ([f"model.source={args.model}"] if args.model else [])
    try:
        config = PipelineConfig.load(args.config, overrides)
        check_prefixes(args.input, args.output)
        if args.cron:
            check_cron(args.cron)
        if args.max_files is not None and args.max_files < 1:
            raise ValueError("--max-files must be >= 1")
        runner = build_runner(args, config)
    except (ConfigError, ScheduleError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    request = TickRequest(args.input, args.output, config.storage, lease_s=args.lease_s, max_files=args.max_files)

    token = find_auth_token(os.environ, Path.home())

    def tick():
        result = run_tick(request, runner, job_state=functools.partial(query_job_state, token=token))
        logger.info("tick: %s", json.dumps(asdict(result)))
        return result

    if args.once:
        return 1 if tick().status == "failed" else 0
    signal.signal(signal.SIGTERM, _interrupt)  # stop like Ctrl-C: a running tick records its failure
    try:
        run_schedule(args.cron, tick)
    except KeyboardInterrupt:
        logger.info("stopped")
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    sys.exit(main())
