"""Check a numerics-changing setting against the one you trust, on your own weights and records.

The first --rows records of INPUT are prepared as the caption job prepares them and decoded greedily
twice: once with the config as given (the baseline), once with the --candidate overrides on top. Each
setting runs in its own process, one after the other, so one GPU is enough:

    python -m jobs.parity --input s3://b/in --config configs/gpu-fp8.yaml \
        --candidate engine.kv_cache_dtype=fp8 --rows 256 --max-tokens 128 --output parity.json

What it prints (docs/parity.md says how to read it): the share of outputs that are identical, the mean
token agreement (the share of each output the two settings share before they first differ), the mean
and worst |d logprob| of the tokens both chose, and how many of the outputs that differ did so at a near
tie (the baseline's margin between the two tokens under 0.1 nats). --output keeps every record's pair of
texts and numbers (local path or s3://).

Exit codes: 0 compared (and --min-agreement met), 2 invalid config or input, or a setting that did not
run (its log is printed above), 3 the mean token agreement is below --min-agreement.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from pipeline.config import ConfigError, PipelineConfig

logger = logging.getLogger("jobs.parity")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.parity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="parquet file or prefix of records, local or s3://")
    parser.add_argument("--config", help="YAML config file: the baseline setting")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field for both settings (repeatable)")
    parser.add_argument("--candidate", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field for the candidate only, e.g. engine.kv_cache_dtype=fp8 "
                        "(repeatable; none: the baseline against itself, a determinism check)")
    parser.add_argument("--rows", type=int, default=64, help="records to compare, from the start of INPUT")
    parser.add_argument("--max-tokens", type=int, help="tokens per output (default: sampling.max_tokens)")
    parser.add_argument("--top-logprobs", type=int, default=5,
                        help="log-probabilities kept per position: the near-tie check needs both tokens in it")
    parser.add_argument("--output", help="write the full report as JSON here (local path or s3://)")
    parser.add_argument("--min-agreement", type=float,
                        help="exit 3 when the mean token agreement is below this (0..1), e.g. for a release check")
    args = parser.parse_args(argv)
    if args.rows < 1 or args.top_logprobs < 1:
        parser.error("--rows and --top-logprobs must be at least 1")
    return args


def format_summary(report: dict) -> str:
    s = report["summary"]
    changed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in report["settings_diff"].items()) or "nothing"
    margin = s["median_divergence_margin"]
    lines = [
        f"parity of {s['prompts']} records ({len(report['refused_records'])} refused by preparation), "
        f"changed: {changed}",
        f"  identical outputs   {s['identical_outputs']}/{s['prompts']} ({s['identical_share']:.1%})",
        f"  token agreement     mean {s['mean_agreement']:.3f}, worst {s['min_agreement']:.3f}",
        f"  |d logprob| shared  mean {s['mean_abs_logprob_delta']:.4f}, p95 {s['p95_abs_logprob_delta']:.4f}, "
        f"max {s['max_abs_logprob_delta']:.4f} nats",
        f"  outputs that differ {s['diverged']}, at a near tie {s['diverged_at_near_tie']}"
        + (f", median margin {margin:.3f} nats" if margin is not None else ""),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pipeline.io.storage import write_json
    from pipeline.parity.run import ParityError, run_parity

    try:
        baseline = PipelineConfig.load(args.config, args.overrides).with_absolute_paths()
        candidate = PipelineConfig.load(args.config, args.overrides + args.candidate).with_absolute_paths()
        max_tokens = args.max_tokens or baseline.sampling.max_tokens
        report = run_parity(baseline, candidate, args.input, rows=args.rows, max_tokens=max_tokens,
                            top_logprobs=args.top_logprobs)
    except (ConfigError, ParityError) as exc:
        logger.error("%s", exc)
        return 2
    print(format_summary(report))
    if args.output:
        write_json(baseline.storage, args.output, report)
        logger.info("report: %s", args.output)
    if args.min_agreement is not None and report["summary"]["mean_agreement"] < args.min_agreement:
        logger.error("mean token agreement %.3f is below --min-agreement %.3f",
                     report["summary"]["mean_agreement"], args.min_agreement)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
