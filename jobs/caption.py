"""Caption a parquet dataset of image + prompt records, or run OpenAI Batch request files, with Gemma 3 on Ray.

The same command runs locally (embedded Ray) and on a cluster:

    python -m jobs.caption --input data/records --output out/captions --config configs/tiny-cpu.yaml
    ray job submit --working-dir . -- python -m jobs.caption --input s3://b/in --output s3://b/out
    python -m jobs.caption --input-list s3://b/lists/today.txt --output s3://b/out/today   # listed files only

OpenAI Batch files (*.jsonl, *.jsonl.gz, or prefixes of them; --input may repeat) give OpenAI Batch output
and error files (see docs/openai-batch.md):

    python -m jobs.caption --input s3://b/batch/requests.jsonl --output s3://b/batch/out \
        --set openai_batch.accepted_model_names=[gpt-4o-mini]

See the plan first (stages, replicas, placement, memory per replica; no engine, no GPU):

    python -m jobs.caption --input s3://b/in --output s3://b/out --config configs/gpu-fp8.yaml --dry-run

Examples of overrides (any config field, YAML values):

    --set engine.tensor_parallel_size=4 --set batch.engine_replicas=[1,8] --set sampling.max_tokens=64
    --set report.gpu_hourly_usd=2.49            # cost estimate in the report ($ per 1M images)
    --set runtime.metrics_export_port=8080      # embedded Ray's Prometheus endpoint (/metrics)

While it runs: Ray Data's progress bars, and every report.status_interval_s a line with rows done,
rows/s, generated tokens/s, errors by kind and the ETA. After it: OUTPUT/_manifest.json and
OUTPUT/_report/report.html (self-contained; charts also as OUTPUT/_report/*.png). Rebuild the report, say
with another price: python -m jobs.report OUTPUT --gpu-hourly-usd 3.0

Rerunning the same command after a crash resumes: only records without output are processed, and every
record ends with exactly one output row. Over a complete output it does nothing (exit 0) unless --overwrite.
A rerun with other model, prompt, sampling, image or tool settings over an existing output is refused
(exit 2, naming the settings that differ) unless --overwrite. --overwrite never deletes an input: an
output prefix that holds an input (or lies inside one) is refused.

One job writes an output prefix at a time: the job holds OUTPUT/_lease while it runs, and a second job
on that prefix stops at once (exit 4) without touching it, until the first one ends or its heartbeat is
older than batch.output_lease_ttl_s (it died).

Exit codes: 0 done (bad records are error rows, not failures), 2 invalid config/input/model/output
or an engine that cannot start (one line with vLLM's root error),
3 the run finished but some input rows have no output row (the manifest says incomplete; rerun to finish),
4 another job is writing the output prefix (nothing was changed; retry later or pick another prefix).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from pipeline.config import ConfigError, PipelineConfig

logger = logging.getLogger("jobs.caption")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.caption", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", action="append",
                        help="parquet file or prefix, or OpenAI Batch request files (*.jsonl[.gz]) or prefixes of "
                        "them, local or s3://; repeat for several files")
    source.add_argument("--input-list", metavar="URI",
                        help="text file (local or s3://) naming input files, one per line: process exactly "
                        "those (jobs.schedule passes each tick's files this way)")
    parser.add_argument("--input-format", choices=("auto", "parquet", "openai-batch"),
                        help="input format (openai_batch.input_format); auto decides from the names")
    parser.add_argument("--output-format", choices=("auto", "parquet", "openai-batch"),
                        help="output format (openai_batch.output_format); auto follows the input")
    parser.add_argument("--output", required=True, help="output prefix (local path or s3://)")
    parser.add_argument("--config", help="YAML config file (see configs/)")
    parser.add_argument("--model", help="checkpoint: local dir, s3:// prefix or Hugging Face id (model.source)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field, e.g. engine.max_num_seqs=128 (repeatable)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the output prefix and start over (default: resume a partial output, leave a "
                        "complete one as it is); refused while another job writes there, or when the prefix "
                        "holds an input")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan (input rows and duplicates, stages, replicas, placement, expected "
                        "memory per replica, CPUs per GPU against what preparation needs, with a warning when short) and "
                        "exit; starts no engine and takes no GPU")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pipeline.batch.caption import InputError, OutputExistsError, OutputInUseError, load_input_list
    from pipeline.batch.job import run_batch_job
    from pipeline.engine.checkpoint import CheckpointError
    from pipeline.engine.start import start_failure_in

    overrides = list(args.overrides) + ([f"model.source={args.model}"] if args.model else [])
    overrides += [f"openai_batch.{name}_format={value}" for name, value in
                  (("input", args.input_format), ("output", args.output_format)) if value]
    try:
        config = PipelineConfig.load(args.config, overrides)
        inputs = load_input_list(config, args.input_list) if args.input_list else args.input
        if args.dry_run:
            from pipeline.batch.plan import format_plan, plan_run

            print(format_plan(plan_run(config, inputs[0] if len(inputs) == 1 else inputs, args.output,
                                       overwrite=args.overwrite)))
            return 0
        manifest = run_batch_job(config, inputs, args.output, overwrite=args.overwrite)
    except (ConfigError, InputError, CheckpointError, OutputExistsError) as exc:
        logger.error("%s", exc)
        return 2
    except OutputInUseError as exc:
        logger.error("%s", exc)
        return 4
    except Exception as exc:
        cause = start_failure_in(exc)
        if cause is None:
            raise
        logger.error("the vLLM engine failed to start: %s (the full traces are in the Ray session's worker "
                     "logs); nothing was written as complete", cause)
        return 2
    summary = {"output": manifest["output"], "status": manifest["status"], **manifest["counts"],
               **manifest["throughput"]}
    logger.info("summary: %s", json.dumps(summary))
    return 0 if manifest["status"] == "complete" else 3


if __name__ == "__main__":
    sys.exit(main())
