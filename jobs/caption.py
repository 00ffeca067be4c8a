"""Caption a parquet dataset of image + prompt records with Gemma 3 on Ray.

The same command runs locally (embedded Ray) and on a cluster:

    python -m jobs.caption --input data/records --output out/captions --config configs/tiny-cpu.yaml
    ray job submit --working-dir . -- python -m jobs.caption --input s3://b/in --output s3://b/out

Examples of overrides (any config field, YAML values):

    --set engine.tensor_parallel_size=1 --set batch.engine_replicas=[1,8] --set sampling.max_tokens=64

Rerunning the same command after a crash resumes: only records without output are processed, and every
record ends with exactly one output row. Over a complete output it does nothing (exit 0) unless --overwrite.

Exit codes: 0 done (bad records are error rows, not failures), 2 invalid config/input/model/output,
3 the run finished but some input rows have no output row (the manifest says incomplete; rerun to finish).
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
    parser.add_argument("--input", required=True, help="parquet file or prefix (local path or s3://)")
    parser.add_argument("--output", required=True, help="output prefix (local path or s3://)")
    parser.add_argument("--config", help="YAML config file (see configs/)")
    parser.add_argument("--model", help="checkpoint: local dir, s3:// prefix or Hugging Face id (model.source)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field, e.g. engine.max_num_seqs=128 (repeatable)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the output prefix and start over (default: resume a partial output, leave a "
                        "complete one as it is)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pipeline.batch import InputError, OutputExistsError, run_caption
    from pipeline.checkpoint import CheckpointError

    overrides = list(args.overrides) + ([f"model.source={args.model}"] if args.model else [])
    try:
        config = PipelineConfig.load(args.config, overrides)
        manifest = run_caption(config, args.input, args.output, overwrite=args.overwrite)
    except (ConfigError, InputError, CheckpointError, OutputExistsError) as exc:
        logger.error("%s", exc)
        return 2
    summary = {"output": manifest["output"], "status": manifest["status"], **manifest["counts"],
               **manifest["throughput"]}
    logger.info("summary: %s", json.dumps(summary))
    return 0 if manifest["status"] == "complete" else 3


if __name__ == "__main__":
    sys.exit(main())
