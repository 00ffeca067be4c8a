"""Quantize a bf16 Gemma 3 checkpoint (or a fine-tune of it) to FP8-dynamic, verify it, and write a report.

Runs in the quantize environment (`make quantize-env`, or the `quantize` extra in a runtime_env: see
docs/quantize.md), locally or under `ray job submit`:

    .venv-quantize/bin/python -m jobs.quantize --model google/gemma-3-12b-it --output out/gemma-3-12b-it-fp8
    python -m jobs.quantize --model s3://models/my-finetune --output s3://models/my-finetune-fp8

--model and --output take a local directory or an s3:// prefix (--model also a Hugging Face id); S3
endpoints come from the config's storage section (--config / --set storage.endpoint_url=...). The
checkpoint and `quantization_report.{json,md}` appear at --output only once verified.

Exit codes: 0 verified and published; 2 invalid config, source or output; 3 made but failed verification
(nothing published; the error names the directory holding it and its report).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pipeline.config import ConfigError, PipelineConfig

logger = logging.getLogger("jobs.quantize")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.quantize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="bf16 checkpoint: local dir, s3:// prefix or Hugging Face id")
    parser.add_argument("--output", required=True, help="where the FP8 checkpoint goes: local dir or s3:// prefix")
    parser.add_argument("--config", help="YAML config file; only its storage section is used")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field, e.g. storage.endpoint_url=http://minio:9000")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--device", help="cpu, cuda:0, ... (default: every visible GPU, else the CPU)")
    parser.add_argument("--max-workers", type=int, default=1,
                        help="shards quantized at once (each holds one shard in memory)")
    parser.add_argument("--max-layer-error", type=float,
                        help="largest relative error of a dequantized layer that passes (default 2^-4)")
    parser.add_argument("--work-dir", type=Path, help="staging directory (room for the source and output)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pipeline.engine.checkpoint import CheckpointError
    from pipeline.quantize.make import QuantizeError, QuantizeOptions, VerificationError, run_quantize

    options = QuantizeOptions(device=args.device, max_workers=args.max_workers, work_dir=args.work_dir,
                              overwrite=args.overwrite,
                              **({"max_layer_error": args.max_layer_error} if args.max_layer_error else {}))
    try:
        config = PipelineConfig.load(args.config, args.overrides)
        report = run_quantize(args.model, args.output, config.storage, options)
    except (ConfigError, CheckpointError, QuantizeError) as exc:
        logger.error("%s", exc)
        return 2
    except VerificationError as exc:
        logger.error("%s", exc)
        return 3
    check = report["check"]
    summary = {"output": report["output"], "layers": check["quantized_layers"]["count"],
               "max_relative_error": check["quantized_layers"]["relative_error_max"],
               "bytes_before": check["bytes"]["before"], "bytes_after": check["bytes"]["after"],
               "kept_bf16": check["kept_in_source_dtype"]["tensors_by_part"], "wall_s": report["wall_s"]}
    logger.info("summary: %s", json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
