"""Rebuild a caption run's report from its output prefix: OUTPUT/_report/report.html and charts.

The caption job writes the report at the end of each run; this rebuilds it from the manifest and the
output rows, e.g. with a price the run was not given:

    python -m jobs.report out/captions --gpu-hourly-usd 2.49
    python -m jobs.report s3://bucket/captions --gpu-hourly-usd 2.49 --billed-gpus 8

Exit codes: 0 written, 1 no manifest under OUTPUT (the run did not finish).
"""
from __future__ import annotations

import argparse
import logging
import sys

from pipeline.config import ConfigError, PipelineConfig

logger = logging.getLogger("jobs.report")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="output prefix of a caption run (local path or s3://)")
    parser.add_argument("--gpu-hourly-usd", type=float, help="price of one GPU hour (report.gpu_hourly_usd)")
    parser.add_argument("--billed-gpus", type=int, help="GPUs paid for during the run (report.billed_gpus)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pipeline.batch.caption import MANIFEST_NAME
    from pipeline.report.build import write_report
    from pipeline.io.storage import join, read_json

    storage = PipelineConfig.load().storage  # where to read from: this environment's endpoint
    manifest = read_json(storage, join(args.output, MANIFEST_NAME))
    if manifest is None:
        logger.error("no %s under %s: the run did not finish", MANIFEST_NAME, args.output)
        return 1
    try:
        config = PipelineConfig.model_validate(manifest["config"]).model_copy(update={"storage": storage})
        if args.gpu_hourly_usd is not None:
            config.report.gpu_hourly_usd = args.gpu_hourly_usd
        if args.billed_gpus is not None:
            config.report.billed_gpus = args.billed_gpus
    except (ValueError, ConfigError) as exc:
        logger.error("%s", exc)
        return 2
    logger.info("report: %s", write_report(config, args.output, manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
